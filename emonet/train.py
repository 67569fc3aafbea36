"""Training and evaluation loops for EmoNet, with exact-resume checkpoints.

Small functions in the style of torchvision's ``references/classification``: the caller
(a notebook, the CLI or a Prefect task) builds loaders, calls :func:`fit` and logs the
per-epoch dicts it passes to its callbacks.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from emonet.checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LAST_CHECKPOINT,
    capture_rng,
    read_checkpoint,
    resolve_device,
    restore_rng,
    save_checkpoint,
)
from emonet.config import EmoNetConfig, config_to_dict
from emonet.data import EmoticDataset
from emonet.losses import EmoNetLoss
from emonet.metrics import evaluate_predictions, tune_thresholds
from emonet.models import EmoNet
from emonet.prediction import autocast, predict_split, to_device
from emonet.schema import NUM_EMOTIONS, SCALE_MAX, SCALE_MIN
from emonet.transforms import build_transforms

logger = logging.getLogger(__name__)

__all__ = [
    "FitResult",
    "build_datasets",
    "evaluate",
    "fit",
    "make_loader",
    "make_loaders",
    "seed_everything",
    "seed_worker",
    "train_one_epoch",
]

MONITOR = "val_mAP"  # model selection, LR schedule and early stopping all follow it

Callback = Callable[[dict[str, float]], Any]


# --------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device).

    CPU runs are then bit-reproducible; CUDA runs may still differ slightly because
    some cuDNN kernels are non-deterministic.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed a DataLoader worker's NumPy and Python RNGs.

    torch already seeds each worker with ``base_seed + worker_id`` (``base_seed`` is drawn
    from the loader's generator), but not NumPy or ``random``, which would otherwise
    repeat the parent's state in every worker.
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A reproducible ``DataLoader``: seeded generator and workers, pinned memory on CUDA.

    The shuffling order and the workers' seeds come from the loader's own
    ``torch.Generator`` (``loader.generator``), seeded with ``seed``; :func:`fit` saves
    and restores its state, so a resumed run draws the same batches.

    Parameters
    ----------
    dataset : the dataset (e.g. an :class:`~emonet.data.EmoticDataset`).
    batch_size : samples per batch, >= 1.
    shuffle : reshuffle every epoch (the train split).
    num_workers : worker processes; 0 loads in the main process. Workers are
        persistent (kept between epochs), which saves their start-up every epoch.
        With workers, a resumed run gets the same batches but fresh worker RNGs, so its
        augmentation draws differ from an uninterrupted run; with 0 workers the resume
        is exact (see :func:`fit`).
    device : where the batches go; page-locked (pinned) memory on CUDA speeds the copy.
    seed : seed of the loader's generator.
    drop_last : drop the last incomplete batch.

    Raises
    ------
    ValueError
        For ``batch_size < 1`` or ``num_workers < 0``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )


def build_datasets(
    train: pd.DataFrame | str | Path,
    val: pd.DataFrame | str | Path,
    img_dir: str | Path,
    config: EmoNetConfig,
) -> tuple[EmoticDataset, EmoticDataset]:
    """Train and validation datasets with the presets of ``config``.

    Parameters
    ----------
    train, val : validated annotation DataFrames or CSV paths (original or normalized).
    img_dir : folder of the ``.npy`` arrays.
    config : run config; ``train.image_size``, ``train.augment`` and (for the
        ``body_context`` variant, which also loads the full image) ``train.context_size``.

    Returns
    -------
    (train_dataset, val_dataset)
    """
    with_context = config.model.variant == "body_context"
    context_size = config.train.context_size if with_context else None
    train_transform = build_transforms(
        config.train.image_size, train=True, augment=config.train.augment, context_size=context_size
    )
    val_transform = build_transforms(config.train.image_size, train=False, context_size=context_size)
    return (
        EmoticDataset(train, img_dir, transform=train_transform, with_context=with_context),
        EmoticDataset(val, img_dir, transform=val_transform, with_context=with_context),
    )


def make_loaders(
    train: pd.DataFrame | str | Path,
    val: pd.DataFrame | str | Path,
    img_dir: str | Path,
    config: EmoNetConfig,
    device: str | torch.device | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders for :func:`fit` (see :func:`build_datasets`).

    The train loader shuffles and, as timm does, drops the last incomplete batch so
    BatchNorm never normalizes over a batch of one (a split smaller than one batch
    is kept whole). The validation loader keeps every sample, in order.

    Parameters
    ----------
    device : where training runs; defaults to ``config.train.device`` resolved.
    """
    device = resolve_device(config.train.device if device is None else device)
    train_dataset, val_dataset = build_datasets(train, val, img_dir, config)
    tc = config.train
    train_loader = make_loader(
        train_dataset,
        tc.batch_size,
        shuffle=True,
        num_workers=tc.num_workers,
        device=device,
        seed=tc.seed,
        drop_last=len(train_dataset) > tc.batch_size,
    )
    val_loader = make_loader(
        val_dataset, tc.batch_size, shuffle=False, num_workers=tc.num_workers, device=device, seed=tc.seed
    )
    return train_loader, val_loader


# --------------------------------------------------------------------------- loops


def _uses_context(model: nn.Module) -> bool:
    return getattr(model, "variant", "body") == "body_context"


def _unpack(
    batch: Mapping[str, Any], device: torch.device, with_context: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Move one collated training batch to ``device``: body, context (or None), emotions, affect."""
    if with_context and "context" not in batch:
        raise ValueError(
            "the model is the body_context variant but the batch has no 'context'; "
            "build the dataset with with_context=True (build_datasets does this)"
        )
    body = to_device(batch, device, "body")  # (B, 3, S, S)
    context = to_device(batch, device, "context") if with_context else None  # (B, 3, S', S')
    emotions = batch["emotions"].to(device, non_blocking=True)  # (B, 26)
    affect = batch["affect"].to(device, non_blocking=True)  # (B, 2)
    return body, context, emotions, affect


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip_norm: float | None = None,
    epoch: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """One pass over ``loader`` with gradient steps.

    Parameters
    ----------
    model : an :class:`~emonet.models.EmoNet` (or a module with the same call).
    loader : yields the dicts of :class:`~emonet.data.EmoticDataset`, collated.
    criterion : returns ``LossOutput(total, emotion, affect)`` (see ``emonet.losses``).
    optimizer : steps the model's parameters.
    device : where the model lives.
    scaler : an enabled ``GradScaler`` turns on float16 autocast (CUDA); None or a
        disabled one trains in float32.
    grad_clip_norm : clip the global gradient norm to this value; None does not clip.
    epoch : shown in the progress bar and in error messages.
    progress : show a tqdm bar with the running loss.

    Returns
    -------
    dict
        ``train_loss, train_loss_emotion, train_loss_affect``: sample-weighted means
        over the epoch.

    Raises
    ------
    FloatingPointError
        When a batch's loss is NaN or infinite (the weights would be ruined).
    ValueError
        When the loader yields nothing.
    """
    device = torch.device(device)
    model.train()
    use_amp = scaler is not None and scaler.is_enabled()
    with_context = _uses_context(model)
    sums = {"total": 0.0, "emotion": 0.0, "affect": 0.0}
    seen = 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        body, context, emotions, affect = _unpack(batch, device, with_context)
        with autocast(device, use_amp):
            output = model(body, context) if with_context else model(body)
            losses = criterion(output, emotions, affect)
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(losses.total).backward()
            if grad_clip_norm is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            losses.total.backward()
            if grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
            optimizer.step()

        n = body.shape[0]
        values = {"total": losses.total.item(), "emotion": losses.emotion.item(), "affect": losses.affect.item()}
        if not math.isfinite(values["total"]):
            raise FloatingPointError(f"non-finite training loss {values['total']} at epoch {epoch}, batch {step}")
        for key, value in values.items():
            sums[key] += value * n
        seen += n
        bar.set_postfix(loss=f"{sums['total'] / seen:.4f}", refresh=False)
    bar.close()
    if seen == 0:
        raise ValueError("the training loader yielded no batch (empty dataset, or drop_last with too few samples)")
    return {
        "train_loss": sums["total"] / seen,
        "train_loss_emotion": sums["emotion"] / seen,
        "train_loss_affect": sums["affect"] / seen,
    }


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    device: torch.device,
    thresholds: float | Sequence[float] | np.ndarray = 0.5,
    *,
    prefix: str = "val_",
    amp: bool = False,
    progress: bool = False,
    affect_bounds: tuple[Sequence[float], Sequence[float]] | None = None,
) -> dict[str, float]:
    """Loss and metrics of ``model`` on ``loader``, under ``inference_mode``.

    Parameters
    ----------
    thresholds : one decision threshold or one per emotion (26,), for the F1 scores.
    prefix : put before every key (``"test_"`` for the test split).
    amp : float16 autocast (CUDA only).
    progress : show a tqdm bar.
    affect_bounds : ``(low, high)`` per (valence, arousal) if the targets were
        normalized with bounds fitted on train; the 1..10 scale by default. Only the
        ``*_1_10`` errors depend on it.

    Returns
    -------
    dict
        ``{prefix}loss, {prefix}loss_emotion, {prefix}loss_affect`` and every key of
        :func:`emonet.metrics.evaluate_predictions` with the prefix: ``val_mAP,
        val_f1_micro, val_f1_macro, val_f1_samples, val_subset_accuracy,
        val_hamming_loss, val_mae_valence, val_mae_arousal, val_mae_valence_1_10,
        val_mae_arousal_1_10``.
    """
    predictions = predict_split(
        model, loader, device=device, amp=amp, criterion=criterion, progress=progress, desc=f"{prefix}eval"
    )
    losses = predictions.losses
    low, high = affect_bounds if affect_bounds is not None else ((SCALE_MIN,) * 2, (SCALE_MAX,) * 2)
    metrics = evaluate_predictions(
        predictions.emotions_true,
        predictions.emotion_prob,
        predictions.affect_true,
        predictions.affect_pred,
        thresholds=thresholds,
        low=low,
        high=high,
    )
    results = {
        f"{prefix}loss": losses["total"],
        f"{prefix}loss_emotion": losses["emotion"],
        f"{prefix}loss_affect": losses["affect"],
    }
    results.update({f"{prefix}{key}": value for key, value in metrics.items()})
    return results


# --------------------------------------------------------------------------- fit


@dataclass(eq=False)
class FitResult:
    """What :func:`fit` returns; ``history`` holds the dicts the callbacks received."""

    best_metric: float  # best val mAP
    best_epoch: int  # 1-based epoch of best_metric
    history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    thresholds: np.ndarray = field(default_factory=lambda: np.full(NUM_EMOTIONS, 0.5))  # (26,)
    stopped_early: bool = False


def _is_better(value: float, best: float, best_epoch: int) -> bool:
    # The first epoch always counts, so best.pt exists even if mAP is NaN.
    return best_epoch == 0 or (math.isfinite(value) and value > best)


def _check_resume(checkpoint: Mapping[str, Any], config: EmoNetConfig, path: Path) -> None:
    saved = EmoNetConfig.model_validate(checkpoint["config"])
    if saved.model != config.model:
        raise ValueError(
            f"cannot resume from {path}: its model config {saved.model.model_dump(mode='json')} differs from "
            f"this run's {config.model.model_dump(mode='json')}"
        )
    for section in ("loss", "train"):
        before, now = getattr(saved, section).model_dump(), getattr(config, section).model_dump()
        changed = {key: (before[key], now[key]) for key in now if before[key] != now[key]}
        if changed:
            logger.warning("resuming with changed %s settings (before, now): %s", section, changed)


def fit(
    model: EmoNet,
    train_loader: DataLoader,
    val_loader: DataLoader,
    config: EmoNetConfig,
    callbacks: Iterable[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    *,
    progress: bool = True,
    affect_bounds: tuple[Sequence[float], Sequence[float]] | None = None,
) -> FitResult:
    """Train ``model``, keep the best epoch by validation mAP, tune thresholds.

    AdamW (``train.lr``, ``train.weight_decay``); ReduceLROnPlateau on val mAP
    (``scheduler_factor``, ``scheduler_patience``); early stopping after
    ``early_stopping_patience`` epochs without a new best (None disables it); optional
    gradient clipping (``grad_clip_norm``). On CUDA: float16 autocast with a
    GradScaler (``train.amp``) and channels_last; on CPU, float32.

    Every epoch, each callback gets a fresh dict: ``epoch`` (1-based), ``train_loss``,
    ``train_loss_emotion``, ``train_loss_affect``, ``val_loss``, ``val_loss_emotion``,
    ``val_loss_affect``, the ``val_`` metrics of :func:`evaluate` (``val_mAP``,
    ``val_f1_macro``, ``val_mae_valence``, ``val_mae_arousal``, ...) and ``lr`` (the
    learning rate the epoch trained with). Callbacks run after the epoch's checkpoints
    are written, so a logged epoch can always be resumed from; an exception raised by
    a callback ends training there.

    With ``checkpoint_dir``, ``last.pt`` (every epoch) and ``best.pt`` (each new best)
    are written atomically; they hold the model, optimizer, scheduler and scaler
    states, the epoch, best metric and epoch, history, early-stopping counter, every
    RNG state (Python, NumPy, torch, CUDA, both loaders' generators) and the resolved
    config. After training, the best weights are loaded back into ``model``,
    per-emotion thresholds are tuned on the validation set (max F1), and stored in
    ``best.pt`` under ``thresholds``.

    Parameters
    ----------
    model : built with :func:`emonet.models.build_model`; trained in place.
    train_loader, val_loader : e.g. from :func:`make_loaders`.
    config : the run config (``train``, ``loss``; ``model`` must describe ``model``).
    callbacks : called with each epoch's metrics dict (e.g. MLflow logging).
    checkpoint_dir : where to write checkpoints; None keeps the best weights in memory.
    resume_from : a ``last.pt`` to continue from; ``checkpoint_dir`` then defaults to
        its folder. Model, optimizer, scheduler, counters and RNG states are restored,
        so with ``num_workers=0`` the resumed run ends with the same weights as an
        uninterrupted one (on CPU). ``train.epochs`` may be raised to train longer.
    progress : show tqdm bars.
    affect_bounds : see :func:`evaluate`.

    Returns
    -------
    FitResult

    Raises
    ------
    ValueError
        ``resume_from`` holds a different model config.
    FileNotFoundError
        ``resume_from`` does not exist.
    """
    tc = config.train
    device = resolve_device(tc.device)
    use_amp = tc.amp and device.type == "cuda"
    loaders = {"train": train_loader, "val": val_loader}
    callbacks = list(callbacks)
    if resume_from is None:
        seed_everything(tc.seed)

    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    criterion = EmoNetLoss.from_config(config.loss).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=tc.scheduler_factor, patience=tc.scheduler_patience
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best_metric, best_epoch, bad_epochs, stopped_early = 0, -math.inf, 0, 0, False
    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None  # only when no checkpoint_dir
    if resume_from is not None:
        resume_from = Path(resume_from)
        checkpoint = read_checkpoint(resume_from)
        _check_resume(checkpoint, config, resume_from)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = int(checkpoint["epoch"])
        best_metric = float(checkpoint["best_metric"])
        best_epoch = int(checkpoint["best_epoch"])
        bad_epochs = int(checkpoint["bad_epochs"])
        stopped_early = bool(checkpoint["stopped_early"])
        history = [dict(row) for row in checkpoint["history"]]
        restore_rng(checkpoint["rng"], loaders)
        if checkpoint_dir is None:
            checkpoint_dir = resume_from.parent
        source_best = resume_from.parent / BEST_CHECKPOINT
        target_best = Path(checkpoint_dir) / BEST_CHECKPOINT
        if source_best.resolve() != target_best.resolve() and source_best.is_file():
            save_checkpoint(read_checkpoint(source_best), target_best)
        logger.info("resumed from %s after epoch %d (best val mAP %.4f at epoch %d)",
                    resume_from, start_epoch, best_metric, best_epoch)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    last_path = checkpoint_dir / LAST_CHECKPOINT if checkpoint_dir is not None else None
    best_path = checkpoint_dir / BEST_CHECKPOINT if checkpoint_dir is not None else None

    patience = tc.early_stopping_patience
    epochs = range(start_epoch, tc.epochs) if not stopped_early else range(0)
    for epoch_index in tqdm(epochs, desc="fit", disable=not progress, dynamic_ncols=True):
        epoch = epoch_index + 1
        lr = float(optimizer.param_groups[0]["lr"])
        train_metrics = train_one_epoch(
            model, train_loader, criterion, optimizer, device,
            scaler=scaler, grad_clip_norm=tc.grad_clip_norm, epoch=epoch, progress=progress,
        )
        val_metrics = evaluate(
            model, val_loader, criterion, device, amp=use_amp, progress=progress, affect_bounds=affect_bounds
        )
        monitored = val_metrics[MONITOR]
        scheduler.step(monitored)
        improved = _is_better(monitored, best_metric, best_epoch)
        if improved:
            best_metric, best_epoch, bad_epochs = monitored, epoch, 0
        else:
            bad_epochs += 1
        stopped_early = patience is not None and bad_epochs >= patience
        metrics: dict[str, float] = {"epoch": epoch, **train_metrics, **val_metrics, "lr": lr}
        history.append(metrics)
        logger.info(
            "epoch %d/%d: train_loss %.4f, val_loss %.4f, val_mAP %.4f%s, lr %.2g",
            epoch, tc.epochs, metrics["train_loss"], metrics["val_loss"], monitored,
            " (best)" if improved else "", lr,
        )

        if checkpoint_dir is not None:
            payload = {
                "format": CHECKPOINT_FORMAT,
                "format_version": CHECKPOINT_VERSION,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best_metric": best_metric,
                "best_epoch": best_epoch,
                "history": history,
                "bad_epochs": bad_epochs,
                "stopped_early": stopped_early,
                "rng": capture_rng(loaders),
                "config": config_to_dict(config),
                "thresholds": None,
            }
            save_checkpoint(payload, last_path)
            if improved:
                save_checkpoint(payload, best_path)
        elif improved:
            best_state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}

        for callback in callbacks:
            callback(dict(metrics))
        if stopped_early:
            logger.info("early stopping after epoch %d: no val mAP gain for %d epochs", epoch, patience)
            break

    # Restore the best epoch's weights, then tune the decision thresholds on them.
    best_payload: dict[str, Any] | None = None
    if best_path is not None and best_path.is_file():
        best_payload = read_checkpoint(best_path)
        model.load_state_dict(best_payload["model"])
    elif best_state is not None:
        model.load_state_dict(best_state)
    else:
        logger.warning("no best checkpoint found; tuning thresholds on the current weights")
    predictions = predict_split(model, val_loader, device=device, amp=use_amp, progress=progress, desc="thresholds")
    thresholds = tune_thresholds(predictions.emotions_true, predictions.emotion_prob)
    if best_payload is not None:
        best_payload["thresholds"] = [float(t) for t in thresholds]
        save_checkpoint(best_payload, best_path)

    return FitResult(
        best_metric=best_metric,
        best_epoch=best_epoch,
        history=history,
        best_checkpoint=best_path if best_payload is not None else None,
        last_checkpoint=last_path if last_path is not None and last_path.is_file() else None,
        thresholds=thresholds,
        stopped_early=stopped_early,
    )
