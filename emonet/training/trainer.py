"""Training and evaluation loops for EmoNet; the exact-resume checkpoints they write
and resume from are :mod:`emonet.models.checkpoint`'s, the loaders :mod:`emonet.training.run_loaders`',
the seeds :mod:`emonet.training.seeding`'s and the learning-rate schedules :mod:`emonet.training.schedules`'.

Small functions in the style of torchvision's ``references/classification``: the caller
(a notebook, the CLI or a Prefect task) builds loaders, calls :func:`fit` (a short loop
over :func:`train_one_epoch`, :func:`evaluate` and the checkpoint module) and logs the
per-epoch dicts it passes to its callbacks. :func:`train_from_csvs` does all of it from
the split CSVs, seeding first; the CLI, the Prefect task and the torchrun worker use it.
Inside a torchrun process group (:mod:`emonet.training.launcher`) the same functions train
with ``DistributedDataParallel``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from emonet.config import EmoNetConfig
from emonet.data.annotations import raw_affect
from emonet.data.loaders import close_workers
from emonet.inference.loop import Predictions, autocast, predict_split, to_device
from emonet.metrics import evaluate_predictions, tune_thresholds
from emonet.models.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, check_free_space, remove_stale_temp_files
from emonet.models.devices import resolve_device
from emonet.models.network import EmoNet, build_model
from emonet.schema import SCALE_MAX, SCALE_MIN
from emonet.training import ddp
from emonet.training.losses import EmoNetLoss
from emonet.training.run_loaders import make_loaders
from emonet.training.run_state import (
    FitResult,
    FitState,
    build_checkpoint,
    capture_rng,
    read_best,
    resume,
    save_epoch,
    save_thresholds,
)
from emonet.training.schedules import build_scheduler
from emonet.training.seeding import seed_everything, use_deterministic_algorithms
from emonet.utils.stopping import TrainingStopped, check_stop

logger = logging.getLogger(__name__)

__all__ = ["evaluate", "fit", "train_from_csvs", "train_one_epoch"]

MONITOR = "val_mAP"  # model selection, LR schedule and early stopping all follow it

Callback = Callable[[dict[str, float]], Any]


# --------------------------------------------------------------------------- loops


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (which hides its attributes)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _unpack(
    batch: Mapping[str, Any], device: torch.device, with_context: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Move one collated training batch to ``device``: body, context (or None), emotions, affect."""
    if with_context and "context" not in batch:
        raise ValueError(
            "the model is the body_context variant but the batch has no 'context'; "
            "build the dataset with with_context=True (emonet.training.run_loaders.build_datasets does this)"
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
    model : an :class:`~emonet.models.network.EmoNet` (or a module with the same call).
    loader : yields the dicts of :class:`~emonet.data.dataset.EmoticDataset`, collated.
    criterion : returns ``LossOutput(total, emotion, affect)`` (see ``emonet.training.losses``).
    optimizer : steps the model's parameters.
    device : where the model lives.
    scaler : an enabled ``GradScaler`` turns on float16 autocast (CUDA); None or a
        disabled one trains in float32.
    grad_clip_norm : clip the global gradient norm to this value; None does not clip.
    epoch : shown in the progress bar and in error messages.
    progress : show a tqdm bar with the running loss.
    scheduler : a per-step learning-rate schedule (see :func:`~emonet.training.schedules.build_scheduler`),
        stepped after every optimizer step; None leaves the rate alone.

    Returns
    -------
    dict
        ``train_loss, train_loss_emotion, train_loss_affect``: sample-weighted means
        over the epoch (over every process's samples in a distributed run).

    Raises
    ------
    emonet.utils.stopping.TrainingStopped
        When a stop was requested, checked before each batch.
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
    with_context = _unwrap(model).config.uses_context
    sums = {"total": 0.0, "emotion": 0.0, "affect": 0.0}
    seen = 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        # A safe point: the unfinished epoch is dropped, the last checkpoint is the previous epoch's.
        check_stop(f"during epoch {epoch}, before batch {step}")
        body, context, emotions, affect = _unpack(batch, device, with_context)
        with autocast(device, use_amp):
            output = model(body, context) if with_context else model(body)
            losses = criterion(output, emotions, affect)
        # Before backward and step: one NaN loss would otherwise write NaN into every weight.
        if not ddp.all_ranks_finite(losses.total):
            raise FloatingPointError(
                f"non-finite training loss {losses.total.item()} at epoch {epoch}, batch {step}"
                + (f" (on at least one of {ddp.world_size()} processes)" if ddp.is_distributed() else "")
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
    *totals, seen = ddp.all_reduce_sum([sums["total"], sums["emotion"], sums["affect"], seen], device)
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
    return ddp.gather_predictions(predict_split(_unwrap(model), loader, **kwargs))


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
        :func:`emonet.metrics.evaluate_predictions` with the prefix: ``val_mAP, val_mAP_voc11,
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


@dataclass(frozen=True)
class _Setup:
    """What :func:`fit` trains with, built once by :func:`_set_up`."""

    device: torch.device
    trained: nn.Module  # the model, or its DistributedDataParallel wrapper
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    per_step: bool  # the scheduler steps after every batch, else once per epoch with val mAP
    scaler: torch.amp.GradScaler
    amp: bool  # float16 autocast (CUDA only)
    grad_clip_norm: float | None


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
    ``train.scheduler`` (:func:`~emonet.training.schedules.build_scheduler`); early stopping
    after ``early_stopping_patience`` epochs without a new best (None disables it);
    optional gradient clipping (``grad_clip_norm``). On CUDA: float16 autocast with a
    GradScaler (``train.amp``) and channels_last; on CPU, float32.

    Every epoch, each callback gets a fresh dict: ``epoch`` (1-based), the ``train_``
    losses, the ``val_`` losses and metrics of :func:`evaluate` and ``lr``. Callbacks run
    after the epoch's checkpoints are written, so a logged epoch can always be resumed
    from; an exception raised by a callback ends training there.

    With ``checkpoint_dir``, ``last.pt`` (every epoch) and ``best.pt`` (each new best)
    are written atomically; :mod:`emonet.models.checkpoint` lists what they hold. After
    training the best weights are loaded back into ``model``, and per-emotion thresholds
    tuned on validation (max F1) are stored in ``best.pt``.

    Inside a process group (torchrun; see :mod:`emonet.training.launcher`) the model trains
    under ``DistributedDataParallel`` (``SyncBatchNorm`` if asked, CUDA only), and rank 0
    alone writes checkpoints, calls the callbacks and shows progress.

    Parameters
    ----------
    model : built with :func:`emonet.models.network.build_model`; trained in place.
    train_loader, val_loader : e.g. from :func:`~emonet.training.run_loaders.make_loaders`.
    config : the run config (``train``, ``loss``; ``model`` must describe ``model``).
    callbacks : called with each epoch's metrics dict (e.g. MLflow logging).
    checkpoint_dir : where to write checkpoints; None keeps the best weights in memory.
    resume_from : a ``last.pt`` to continue from (:func:`emonet.training.run_state.resume`);
        ``checkpoint_dir`` then defaults to its folder. With ``num_workers=0`` the run
        ends with the weights of an uninterrupted one (on CPU, on as many processes).
        ``train.epochs`` may be raised to train longer.
    progress : show tqdm bars.
    affect_bounds : see :func:`evaluate`.

    Returns
    -------
    FitResult
        The best epoch and its val mAP, the history, the checkpoints and the thresholds.

    Raises
    ------
    ValueError, FileNotFoundError
        From :func:`emonet.training.run_state.resume`; ``sync_batchnorm`` on the CPU.
    FloatingPointError
        A non-finite training loss (see :func:`train_one_epoch`); nothing is written.
    emonet.models.checkpoint.DiskSpaceError
        Before the first epoch when ``checkpoint_dir`` lacks room for two checkpoints
        (:func:`emonet.models.checkpoint.check_free_space`), or when a write fills the disk.
    emonet.utils.stopping.TrainingStopped
        A stop was requested (:mod:`emonet.utils.stopping`), checked before every batch and
        epoch: the unfinished epoch is dropped, ``last.pt`` holds the last completed one.
    """
    main_process = ddp.rank() == 0
    callbacks, progress = (list(callbacks), progress) if main_process else ([], False)
    setup = _set_up(model, config, len(train_loader), fresh=resume_from is None)
    loaders = {"train": train_loader, "val": val_loader}
    checkpoint_dir = _checkpoint_folder(checkpoint_dir, resume_from)
    state = _start(model, config, setup, loaders, checkpoint_dir, resume_from)
    best_weights: dict[str, torch.Tensor] | None = None  # kept in memory only without a checkpoint_dir

    epochs = range(state.epoch, config.train.epochs) if not state.stopped_early else range(0)
    for epoch_index in tqdm(epochs, desc="fit", disable=not progress, dynamic_ncols=True):
        try:
            check_stop(f"before epoch {epoch_index + 1}")
            metrics = _train_and_validate(model, setup, train_loader, val_loader, epoch_index, progress, affect_bounds)
        except TrainingStopped as stopped:
            logger.warning("%s; %d epochs done%s", stopped, state.epoch, _resume_hint(checkpoint_dir))
            raise
        improved = _record_epoch(state, metrics, config)
        if checkpoint_dir is not None:
            _save_checkpoints(model, setup, state, config, loaders, checkpoint_dir, improved)
        elif improved:
            best_weights = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
        for callback in callbacks:
            callback(dict(metrics))
        if state.stopped_early:
            break

    thresholds = _tune_on_best(model, setup, val_loader, checkpoint_dir, state.best_epoch, best_weights, progress)
    return state.result(thresholds, checkpoint_dir)


def _checkpoint_folder(checkpoint_dir: str | Path | None, resume_from: str | Path | None) -> Path | None:
    """Where :func:`fit` writes checkpoints: ``checkpoint_dir``, or the folder of the run it resumes."""
    if checkpoint_dir is None and resume_from is not None:
        return Path(resume_from).parent
    return Path(checkpoint_dir) if checkpoint_dir is not None else None


def _start(
    model: nn.Module,
    config: EmoNetConfig,
    setup: _Setup,
    loaders: dict[str, DataLoader],
    checkpoint_dir: Path | None,
    resume_from: str | Path | None,
) -> FitState:
    """A fresh :class:`FitState`, or the one resumed from ``resume_from``; the checkpoint
    folder is rid of a killed write's temporary files and checked for room first."""
    if checkpoint_dir is not None and ddp.rank() == 0:
        remove_stale_temp_files(checkpoint_dir)
        check_free_space(checkpoint_dir, model)
    if resume_from is None:
        return FitState()
    return resume(
        resume_from,
        config,
        checkpoint_dir,
        model=model,
        optimizer=setup.optimizer,
        scheduler=setup.scheduler,
        scaler=setup.scaler,
        loaders=loaders,
        rank=ddp.rank(),
        world_size=ddp.world_size(),
    )


def _resume_hint(checkpoint_dir: Path | None) -> str:
    if checkpoint_dir is None or not (checkpoint_dir / LAST_CHECKPOINT).is_file():
        return ""
    return f"; resume from {checkpoint_dir / LAST_CHECKPOINT}"


def _set_up(model: nn.Module, config: EmoNetConfig, steps_per_epoch: int, fresh: bool) -> _Setup:
    """Seed a fresh run, put ``model`` on this process's device (wrapped for a process
    group), and build the loss, optimizer, schedule and scaler."""
    tc = config.train
    if tc.deterministic:
        use_deterministic_algorithms()
    if fresh:  # a resumed run restores its random states instead
        # Offset by rank so that processes draw different augmentations (rank 0: train.seed).
        seed_everything(tc.seed + ddp.rank())
    device = ddp.process_device(resolve_device(tc.device))
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    trained = _distribute(model, config, device)
    # A frozen trunk's parameters are left out (model.freeze_body / freeze_context).
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler, per_step = build_scheduler(optimizer, tc, steps_per_epoch)
    amp = tc.amp and device.type == "cuda"
    if ddp.world_size() > 1:
        world = ddp.world_size()
        logger.info("%d processes x batch %d = effective batch %d", world, tc.batch_size, world * tc.batch_size)
    return _Setup(
        device=device,
        trained=trained,
        criterion=EmoNetLoss.from_config(config.loss).to(device),
        optimizer=optimizer,
        scheduler=scheduler,
        per_step=per_step,
        scaler=torch.amp.GradScaler("cuda", enabled=amp),
        amp=amp,
        grad_clip_norm=tc.grad_clip_norm,
    )


def _distribute(model: nn.Module, config: EmoNetConfig, device: torch.device) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` inside a process group (with
    SyncBatchNorm if asked), else ``model`` itself."""
    if not ddp.is_distributed():
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


def _train_and_validate(
    model: nn.Module,
    setup: _Setup,
    train_loader: DataLoader,
    val_loader: DataLoader,
    epoch_index: int,
    progress: bool,
    affect_bounds: tuple[Sequence[float], Sequence[float]] | None,
) -> dict[str, float]:
    """One epoch of training, then validation and a per-epoch schedule step: the
    epoch's metrics dict (the keys :func:`fit` documents)."""
    if isinstance(train_loader.sampler, DistributedSampler):
        train_loader.sampler.set_epoch(epoch_index)  # a new shared permutation every epoch
    epoch, lr = epoch_index + 1, float(setup.optimizer.param_groups[0]["lr"])
    train_metrics = train_one_epoch(
        setup.trained,
        train_loader,
        setup.criterion,
        setup.optimizer,
        setup.device,
        scaler=setup.scaler,
        grad_clip_norm=setup.grad_clip_norm,
        epoch=epoch,
        progress=progress,
        scheduler=setup.scheduler if setup.per_step else None,
    )
    # Every rank computes the same gathered metrics, so they take the same LR and stopping decisions.
    val_metrics = evaluate(
        model, val_loader, setup.criterion, setup.device, amp=setup.amp, progress=progress, affect_bounds=affect_bounds
    )
    if not setup.per_step:
        setup.scheduler.step(val_metrics[MONITOR])
    return {"epoch": epoch, **train_metrics, **val_metrics, "lr": lr}


def _record_epoch(state: FitState, metrics: dict[str, float], config: EmoNetConfig) -> bool:
    """Add the epoch to ``state`` (history, best epoch, early-stopping count) and log it.

    Returns whether the epoch is a new best.
    """
    epoch, monitored = int(metrics["epoch"]), metrics[MONITOR]
    # The first epoch always counts, so best.pt exists even if mAP is NaN.
    improved = state.best_epoch == 0 or (math.isfinite(monitored) and monitored > state.best_metric)
    if improved:
        state.best_metric, state.best_epoch, state.bad_epochs = monitored, epoch, 0
    else:
        state.bad_epochs += 1
    patience = config.train.early_stopping_patience
    state.stopped_early = patience is not None and state.bad_epochs >= patience
    state.epoch = epoch
    state.history.append(metrics)
    logger.info(
        "epoch %d/%d: train_loss %.4f, val_loss %.4f, val_mAP %.4f%s, lr %.2g",
        epoch,
        config.train.epochs,
        metrics["train_loss"],
        metrics["val_loss"],
        monitored,
        " (best)" if improved else "",
        metrics["lr"],
    )
    if state.stopped_early:
        logger.info("early stopping after epoch %d: no val mAP gain for %d epochs", epoch, patience)
    return improved


def _save_checkpoints(
    model: nn.Module,
    setup: _Setup,
    state: FitState,
    config: EmoNetConfig,
    loaders: Mapping[str, DataLoader],
    checkpoint_dir: Path,
    improved: bool,
) -> None:
    """Rank 0 writes the epoch's ``last.pt`` (and ``best.pt`` if ``improved``) with
    every rank's random states, which all ranks take part in gathering."""
    rng_ranks = ddp.all_gather_objects(capture_rng(loaders))
    if ddp.rank() == 0:
        checkpoint = build_checkpoint(
            model=model,
            optimizer=setup.optimizer,
            scheduler=setup.scheduler,
            scaler=setup.scaler,
            state=state,
            config=config,
            rng_ranks=rng_ranks,
        )
        save_epoch(checkpoint, checkpoint_dir, improved)


def _tune_on_best(
    model: nn.Module,
    setup: _Setup,
    val_loader: DataLoader,
    checkpoint_dir: Path | None,
    best_epoch: int,
    best_weights: Mapping[str, torch.Tensor] | None,
    progress: bool,
) -> np.ndarray:
    """Load the best epoch's weights into ``model`` and tune the decision thresholds on
    them; with ``checkpoint_dir``, rank 0 reads them from ``best.pt`` (the other ranks
    receive them) and stores the thresholds there.

    Returns
    -------
    numpy.ndarray
        (26,) thresholds (max F1 on validation).
    """
    best: dict[str, Any] | None = None
    if ddp.rank() == 0 and checkpoint_dir is not None:
        best = read_best(checkpoint_dir / BEST_CHECKPOINT, best_epoch)
        model.load_state_dict(best["model"])
    elif best_weights is not None:
        model.load_state_dict(best_weights)
    ddp.broadcast_module(model)
    predictions = _predict_gathered(
        model, val_loader, device=setup.device, amp=setup.amp, progress=progress, desc="thresholds"
    )
    thresholds = tune_thresholds(predictions.emotions_true, predictions.emotion_prob)
    if best is not None:
        save_thresholds(best, thresholds, checkpoint_dir / BEST_CHECKPOINT)
    return thresholds


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
    the process joins the job's process group for the run (see :mod:`emonet.training.launcher`).

    Parameters
    ----------
    train_csv, val_csv : annotation CSVs or DataFrames of the two splits.
    img_dir : folder of the ``.npy`` arrays.
    config : the run config.
    checkpoint_dir, callbacks, resume_from, affect_bounds, progress : see :func:`fit`.
    """
    with ddp.process_group(config):
        seed_everything(config.train.seed)
        model = build_model(config)
        train_loader, val_loader = make_loaders(train_csv, val_csv, img_dir, config)
        try:
            return fit(
                model,
                train_loader,
                val_loader,
                config,
                callbacks=callbacks,
                checkpoint_dir=checkpoint_dir,
                resume_from=resume_from,
                progress=progress,
                affect_bounds=affect_bounds,
            )
        finally:
            close_workers(train_loader)
            close_workers(val_loader)
