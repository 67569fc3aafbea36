"""Training and evaluation loops for EmoNet, with exact-resume checkpoints.

Small functions in the style of torchvision's ``references/classification``: the caller
(a notebook, the CLI or a Prefect task) builds loaders, calls :func:`fit` and logs the
per-epoch dicts it passes to its callbacks. :func:`train_from_csvs` does all of it from
the split CSVs, seeding first; the CLI, the Prefect task and the torchrun worker use it.
Inside a torchrun process group (:mod:`emonet.distributed`) the same functions train
with ``DistributedDataParallel``.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from emonet import parallel
from emonet.annotations import raw_affect
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
from emonet.config import EmoNetConfig, TrainConfig, config_to_dict
from emonet.data import EmoticDataset
from emonet.losses import EmoNetLoss
from emonet.metrics import evaluate_predictions, tune_thresholds
from emonet.models import EmoNet, build_model
from emonet.prediction import Predictions, autocast, predict_split, to_device
from emonet.schema import NUM_EMOTIONS, SCALE_MAX, SCALE_MIN
from emonet.transforms import build_transforms

logger = logging.getLogger(__name__)

__all__ = [
    "FitResult",
    "build_datasets",
    "build_scheduler",
    "evaluate",
    "fit",
    "make_loader",
    "make_loaders",
    "read_fit_result",
    "seed_everything",
    "seed_worker",
    "train_from_csvs",
    "train_one_epoch",
    "use_deterministic_algorithms",
]

MONITOR = "val_mAP"  # model selection, LR schedule and early stopping all follow it

Callback = Callable[[dict[str, float]], Any]


# --------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device).

    CPU runs are then bit-reproducible; CUDA runs may still differ slightly because
    some cuDNN and atomic-add kernels are non-deterministic, unless
    :func:`use_deterministic_algorithms` is on (``train.deterministic``).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_algorithms() -> None:
    """Make CUDA training repeatable run to run, at some speed cost.

    Turns on ``torch.use_deterministic_algorithms``, pins cuDNN to deterministic
    kernels without autotuning, and sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which
    cuBLAS needs for repeatable matrix products (read when its first handle is made, so
    call this before the first CUDA matmul). No effect on CPU results, which are
    already repeatable.

    ``warn_only``: torch flags the CUDA backward of ``AdaptiveAvgPool2d`` as
    non-deterministic and would raise on every backbone here; with the 1 x 1 output
    they use, each input position gets a single gradient contribution, so its result
    does not depend on the order of the atomic adds. Any other flagged op warns.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


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
    sampler: Sampler | Sequence[int] | None = None,
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
    sampler : the indices to draw, e.g. a ``DistributedSampler`` (then ``shuffle`` is
        the sampler's business and must be False here).

    Raises
    ------
    ValueError
        For ``batch_size < 1`` or ``num_workers < 0``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if sampler is not None and shuffle:
        raise ValueError("pass shuffle=False with a sampler; the sampler decides the order")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
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

    Inside a process group (a torchrun worker) each process gets its part of the data:
    a ``DistributedSampler`` over train (one shared permutation per epoch, seeded with
    ``train.seed``; :func:`fit` calls ``set_epoch``) and an unpadded shard of val
    (:func:`emonet.parallel.shard_indices`). ``train.batch_size`` is then per
    process, and each process's loader generator (worker seeds) is offset by its rank.

    Parameters
    ----------
    device : where training runs; defaults to ``config.train.device`` resolved.
    """
    device = resolve_device(config.train.device if device is None else device)
    train_dataset, val_dataset = build_datasets(train, val, img_dir, config)
    tc = config.train
    train_sampler: DistributedSampler | None = None
    val_shard: range | None = None
    if parallel.is_distributed():
        train_sampler = DistributedSampler(train_dataset, shuffle=True, seed=tc.seed)
        val_shard = parallel.shard_indices(len(val_dataset))
    samples_per_process = len(train_sampler) if train_sampler is not None else len(train_dataset)
    loader_seed = tc.seed + parallel.rank()
    train_loader = make_loader(
        train_dataset,
        tc.batch_size,
        shuffle=train_sampler is None,
        num_workers=tc.num_workers,
        device=device,
        seed=loader_seed,
        drop_last=samples_per_process > tc.batch_size,
        sampler=train_sampler,
    )
    val_loader = make_loader(
        val_dataset, tc.batch_size, shuffle=False, num_workers=tc.num_workers, device=device, seed=loader_seed,
        sampler=val_shard,
    )
    return train_loader, val_loader


def build_scheduler(
    optimizer: torch.optim.Optimizer, train_config: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau, bool]:
    """The learning-rate schedule of ``train_config.scheduler`` and whether it steps per batch.

    ``"plateau"``: ReduceLROnPlateau on val mAP (``scheduler_factor``,
    ``scheduler_patience``), stepped once per epoch with the metric. ``"cosine"``: a
    linear rise from 0 to ``lr`` over ``warmup_epochs``, then a cosine decay to 0 at
    the end of ``epochs``, stepped after every optimizer step. Both keep their
    position in ``state_dict()``, so a resumed run continues the same curve.

    Returns
    -------
    (scheduler, per_step) : ``per_step`` is True when ``scheduler.step()`` follows every
        batch, False when ``scheduler.step(val_mAP)`` follows every epoch.
    """
    if train_config.scheduler == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=train_config.scheduler_factor, patience=train_config.scheduler_patience
        )
        return plateau, False
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    warmup_steps = round(train_config.warmup_epochs * steps_per_epoch)
    total_steps = max(train_config.epochs * steps_per_epoch, warmup_steps + 1)

    def lr_factor(step: int) -> float:
        # Step s sets the rate of batch s + 1, so the first batch already trains (lr / warmup_steps).
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor), True


# --------------------------------------------------------------------------- loops


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (which hides its attributes)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _uses_context(model: nn.Module) -> bool:
    return getattr(_unwrap(model), "variant", "body") == "body_context"


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
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
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
    scheduler : a per-step learning-rate schedule (see :func:`build_scheduler`),
        stepped after every optimizer step; None leaves the rate alone.

    Returns
    -------
    dict
        ``train_loss, train_loss_emotion, train_loss_affect``: sample-weighted means
        over the epoch (over every process's samples in a distributed run).

    Raises
    ------
    FloatingPointError
        When a batch's loss is NaN or infinite, naming the epoch and batch. It is
        checked before ``backward()``, so the weights and optimizer state stay as they
        were before that batch. In a distributed run every rank raises together.
        Under AMP a finite loss whose scaled gradients overflow is the GradScaler's
        business, as usual: it skips that step and lowers the scale.
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
        # Before backward and step: one NaN loss would otherwise write NaN into every weight.
        if not parallel.all_ranks_finite(losses.total):
            raise FloatingPointError(
                f"non-finite training loss {losses.total.item()} at epoch {epoch}, batch {step}"
                + (f" (on at least one of {parallel.world_size()} processes)" if parallel.is_distributed() else "")
                + "; no step was taken, the weights are those from before this batch"
            )
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
        if scheduler is not None:
            scheduler.step()

        n = body.shape[0]
        values = {"total": losses.total.item(), "emotion": losses.emotion.item(), "affect": losses.affect.item()}
        for key, value in values.items():
            sums[key] += value * n
        seen += n
        bar.set_postfix(loss=f"{sums['total'] / seen:.4f}", refresh=False)
    bar.close()
    *totals, seen = parallel.all_reduce_sum([sums["total"], sums["emotion"], sums["affect"], seen], device)
    sums = dict(zip(("total", "emotion", "affect"), totals))
    if seen == 0:
        raise ValueError("the training loader yielded no batch (empty dataset, or drop_last with too few samples)")
    return {
        "train_loss": sums["total"] / seen,
        "train_loss_emotion": sums["emotion"] / seen,
        "train_loss_affect": sums["affect"] / seen,
    }


def _predict_gathered(model: nn.Module, loader: DataLoader, **kwargs: Any) -> Predictions:
    """:func:`predict_split` of the bare model on this rank's shard, merged over all ranks."""
    return parallel.gather_predictions(predict_split(_unwrap(model), loader, **kwargs))


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

    In a distributed run ``loader`` holds this process's shard: the predictions of
    every rank are gathered first, so the metrics cover the whole split exactly once
    and every rank returns the same dict.

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
    predictions = _predict_gathered(
        model, loader, device=device, amp=amp, criterion=criterion, progress=progress, desc=f"{prefix}eval"
    )
    losses = predictions.losses
    low, high = affect_bounds if affect_bounds is not None else ((SCALE_MIN,) * 2, (SCALE_MAX,) * 2)
    # The 1..10 errors against the annotated values, when the split's rows are at hand
    # (not against targets clipped by bounds fitted on train).
    annotations = getattr(loader.dataset, "annotations", None)
    raw_true = raw_affect(annotations.iloc[predictions.indices]) if annotations is not None else None
    metrics = evaluate_predictions(
        predictions.emotions_true,
        predictions.emotion_prob,
        predictions.affect_true,
        predictions.affect_pred,
        thresholds=thresholds,
        low=low,
        high=high,
        raw_true=raw_true,
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
    if saved.train.scheduler != config.train.scheduler:
        # One schedule's state (a plateau counter, a step count) cannot drive the other.
        raise ValueError(
            f"cannot resume from {path}: it was trained with train.scheduler {saved.train.scheduler!r}, this run "
            f"sets {config.train.scheduler!r}; resume with {saved.train.scheduler!r} or start a new run"
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

    AdamW (``train.lr``, ``train.weight_decay``); the learning-rate schedule of
    ``train.scheduler`` (see :func:`build_scheduler`); early stopping after
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

    Inside a process group (torchrun; see :mod:`emonet.distributed`) the model is
    wrapped in ``DistributedDataParallel`` (with ``SyncBatchNorm`` if
    ``train.distributed.sync_batchnorm``, CUDA only), the train sampler's epoch is set
    every epoch, validation predictions are gathered from all ranks, and rank 0 alone
    writes checkpoints (with every rank's RNG states), calls the callbacks and shows
    progress. Resuming works the same, on the same number of processes for exact RNG
    streams; the ``resume_from`` file must be readable by every process.

    A kill between the checkpoint writes is repaired on resume: ``last.pt`` is written
    first and names the epoch ``best.pt`` must hold, so a missing or stale ``best.pt``
    is re-saved from it.

    Returns
    -------
    FitResult

    Raises
    ------
    ValueError
        ``resume_from`` holds a different model config, or its ``best.pt`` cannot be
        repaired; ``sync_batchnorm`` on the CPU.
    FileNotFoundError
        ``resume_from`` does not exist.
    FloatingPointError
        A non-finite training loss (see :func:`train_one_epoch`); nothing is written.
    """
    tc = config.train
    world, rank = parallel.world_size(), parallel.rank()
    main_process = rank == 0
    device = parallel.process_device(resolve_device(tc.device))
    use_amp = tc.amp and device.type == "cuda"
    loaders = {"train": train_loader, "val": val_loader}
    callbacks = list(callbacks) if main_process else []
    progress = progress and main_process
    if tc.deterministic:
        use_deterministic_algorithms()
    if resume_from is None:
        # Offset by rank so that processes draw different augmentations (rank 0: train.seed).
        seed_everything(tc.seed + rank)

    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    trained = _distribute(model, config, device)
    criterion = EmoNetLoss.from_config(config.loss).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler, per_step = build_scheduler(optimizer, tc, len(train_loader))
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
        restore_rng(_rng_of_this_rank(checkpoint, rank, world), loaders)
        if checkpoint_dir is None:
            checkpoint_dir = resume_from.parent
        if main_process:
            source_best = resume_from.parent / BEST_CHECKPOINT
            target_best = Path(checkpoint_dir) / BEST_CHECKPOINT
            if source_best.resolve() != target_best.resolve() and source_best.is_file():
                save_checkpoint(read_checkpoint(source_best), target_best)
            _repair_best(checkpoint, resume_from, target_best)
        logger.info("resumed from %s after epoch %d (best val mAP %.4f at epoch %d)",
                    resume_from, start_epoch, best_metric, best_epoch)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    last_path = checkpoint_dir / LAST_CHECKPOINT if checkpoint_dir is not None else None
    best_path = checkpoint_dir / BEST_CHECKPOINT if checkpoint_dir is not None else None
    if world > 1:
        logger.info("%d processes x batch %d = effective batch %d", world, tc.batch_size, world * tc.batch_size)

    patience = tc.early_stopping_patience
    epochs = range(start_epoch, tc.epochs) if not stopped_early else range(0)
    for epoch_index in tqdm(epochs, desc="fit", disable=not progress, dynamic_ncols=True):
        epoch = epoch_index + 1
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch_index)  # a new shared permutation every epoch
        lr = float(optimizer.param_groups[0]["lr"])
        train_metrics = train_one_epoch(
            trained, train_loader, criterion, optimizer, device,
            scaler=scaler, grad_clip_norm=tc.grad_clip_norm, epoch=epoch, progress=progress,
            scheduler=scheduler if per_step else None,
        )
        # Every rank computes the same gathered metrics, so they take the same LR and stopping decisions.
        val_metrics = evaluate(
            model, val_loader, criterion, device, amp=use_amp, progress=progress, affect_bounds=affect_bounds
        )
        monitored = val_metrics[MONITOR]
        if not per_step:
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
            rng_ranks = parallel.all_gather_objects(capture_rng(loaders))
            if main_process:
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
                    "rng": rng_ranks[0],
                    "rng_ranks": rng_ranks,
                    "world_size": world,
                    "config": config_to_dict(config),
                    "thresholds": None,
                }
                # last.pt first: it names best_epoch, and when that is this epoch it holds the
                # same weights, so a kill before best.pt is written is repaired on resume
                # (see _repair_best).
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

    # Restore the best epoch's weights (rank 0 reads them; the others receive them), then
    # tune the decision thresholds on them.
    best_payload: dict[str, Any] | None = None
    if main_process and best_path is not None:
        if not best_path.is_file():
            raise FileNotFoundError(f"{best_path} is missing; it should hold epoch {best_epoch}, the best one")
        best_payload = read_checkpoint(best_path)
        model.load_state_dict(best_payload["model"])
    elif best_state is not None:
        model.load_state_dict(best_state)
    parallel.broadcast_module(model)
    predictions = _predict_gathered(model, val_loader, device=device, amp=use_amp, progress=progress, desc="thresholds")
    thresholds = tune_thresholds(predictions.emotions_true, predictions.emotion_prob)
    if best_payload is not None:
        best_payload["thresholds"] = [float(t) for t in thresholds]
        save_checkpoint(best_payload, best_path)

    return FitResult(
        best_metric=best_metric,
        best_epoch=best_epoch,
        history=history,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        thresholds=thresholds,
        stopped_early=stopped_early,
    )


def _distribute(model: nn.Module, config: EmoNetConfig, device: torch.device) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` inside a process group (with
    SyncBatchNorm if asked), else ``model`` itself."""
    if not parallel.is_distributed():
        return model
    if config.train.distributed.sync_batchnorm:
        if device.type != "cuda":
            raise ValueError(
                f"train.distributed.sync_batchnorm needs CUDA (torch's SyncBatchNorm has no CPU kernels), "
                f"but this run is on {device}; set it to false"
            )
        # Converts the BatchNorm layers in place (EmoNet itself is not one); same state_dict keys.
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _rng_of_this_rank(checkpoint: Mapping[str, Any], rank: int, world: int) -> Mapping[str, Any]:
    """This rank's saved RNG states; rank 0's (with a warning) if the process count changed."""
    per_rank = checkpoint.get("rng_ranks") or [checkpoint["rng"]]
    if len(per_rank) == world:
        return per_rank[rank]
    logger.warning(
        "resuming on %d processes a run checkpointed on %d: augmentation draws will differ from an "
        "uninterrupted run", world, len(per_rank),
    )
    return checkpoint["rng"]


def _repair_best(last: Mapping[str, Any], last_path: Path, best_path: Path) -> None:
    """Make ``best.pt`` hold the epoch ``last.pt`` names as the best.

    ``last.pt`` is written before ``best.pt``, so a kill between the two leaves best.pt
    missing or one best epoch behind; last.pt then names itself as the best epoch and
    holds exactly the weights best.pt should, and is copied over.

    Raises
    ------
    ValueError
        ``best.pt`` holds another epoch and last.pt cannot replace it (the files come
        from different runs, or best.pt was replaced by hand).
    """
    best_epoch, last_epoch = int(last["best_epoch"]), int(last["epoch"])
    held = int(read_checkpoint(best_path)["epoch"]) if best_path.is_file() else None
    if held == best_epoch:
        return
    if best_epoch == last_epoch:
        logger.warning(
            "%s holds epoch %s but %s names epoch %d, its own, as the best (training was stopped between the "
            "two writes): re-saving best.pt from last.pt", best_path, held, last_path, best_epoch,
        )
        save_checkpoint(last, best_path)
        return
    raise ValueError(
        f"{best_path} holds epoch {held}, but {last_path} (epoch {last_epoch}) says the best epoch is {best_epoch}; "
        "those weights are in neither file. Resume with the best.pt of the same run beside last.pt."
    )


def read_fit_result(checkpoint_dir: str | Path) -> FitResult:
    """The :class:`FitResult` of a finished run, read from its ``last.pt`` and ``best.pt``
    (e.g. after a torchrun job, whose processes cannot return one).

    Raises
    ------
    FileNotFoundError
        A checkpoint is missing.
    ValueError
        ``best.pt`` has no tuned thresholds (the run did not finish).
    """
    checkpoint_dir = Path(checkpoint_dir)
    last_path, best_path = checkpoint_dir / LAST_CHECKPOINT, checkpoint_dir / BEST_CHECKPOINT
    last, best = read_checkpoint(last_path), read_checkpoint(best_path)
    if best.get("thresholds") is None:
        raise ValueError(f"{best_path} has no tuned thresholds: the run did not finish")
    return FitResult(
        best_metric=float(last["best_metric"]),
        best_epoch=int(last["best_epoch"]),
        history=[dict(row) for row in last["history"]],
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        thresholds=np.asarray(best["thresholds"], dtype=np.float64),
        stopped_early=bool(last["stopped_early"]),
    )


def train_from_csvs(
    train_csv: pd.DataFrame | str | Path,
    val_csv: pd.DataFrame | str | Path,
    img_dir: str | Path,
    config: EmoNetConfig,
    checkpoint_dir: str | Path | None = None,
    *,
    callbacks: Iterable[Callback] = (),
    resume_from: str | Path | None = None,
    affect_bounds: tuple[Sequence[float], Sequence[float]] | None = None,
    progress: bool = True,
) -> FitResult:
    """Seed, build the model and the loaders, and :func:`fit`: a whole training run.

    The one entry point of ``emonet train``, the Prefect training task and the torchrun
    worker. ``train.seed`` is set before the model is built, so it fixes the initial
    weights as well as the data order, the augmentation and the loader workers' seeds:
    two runs with the same config and seed write bit-identical checkpoints on the CPU
    (with any ``num_workers``). Under torchrun (``WORLD_SIZE`` > 1 in the environment)
    the process joins the job's process group for the run (see :mod:`emonet.distributed`).

    Parameters
    ----------
    train_csv, val_csv : annotation CSVs or DataFrames of the two splits.
    img_dir : folder of the ``.npy`` arrays.
    config : the run config.
    checkpoint_dir, callbacks, resume_from, affect_bounds, progress : see :func:`fit`.
    """
    with parallel.process_group(config):
        seed_everything(config.train.seed)
        model = build_model(config.model)
        train_loader, val_loader = make_loaders(train_csv, val_csv, img_dir, config)
        return fit(
            model, train_loader, val_loader, config,
            callbacks=callbacks, checkpoint_dir=checkpoint_dir, resume_from=resume_from,
            progress=progress, affect_bounds=affect_bounds,
        )
