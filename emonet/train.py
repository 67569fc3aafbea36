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

from emonet.config import EmoNetConfig, TrainConfig, config_to_dict
from emonet.data import EmoticDataset
from emonet.io import atomic_path
from emonet.losses import EmoNetLoss
from emonet.metrics import evaluate_predictions, tune_thresholds
from emonet.models import EmoNet, build_model
from emonet.schema import AFFECT_COLUMNS, NUM_EMOTIONS, SCALE_MAX, SCALE_MIN
from emonet.transforms import build_transforms

logger = logging.getLogger(__name__)

__all__ = [
    "BEST_CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "LAST_CHECKPOINT",
    "FitResult",
    "Predictions",
    "build_datasets",
    "build_scheduler",
    "evaluate",
    "fit",
    "load_checkpoint",
    "make_loader",
    "make_loaders",
    "predict",
    "resolve_device",
    "seed_everything",
    "seed_worker",
    "train_one_epoch",
]

CHECKPOINT_FORMAT = "emonet-checkpoint"  # marks our files, so a stray .pt fails clearly
CHECKPOINT_VERSION = 1
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
MONITOR = "val_mAP"  # model selection, LR schedule and early stopping all follow it

Callback = Callable[[dict[str, float]], Any]


# --------------------------------------------------------------------------- setup


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for ``config.train.device``.

    Parameters
    ----------
    device : ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``, or a ``torch.device``.

    Raises
    ------
    ValueError
        For an unknown device, or CUDA asked for on a machine without it.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu' or 'cuda'") from None
    if resolved.type not in {"cpu", "cuda"}:
        raise ValueError(f"unsupported device {device!r}; expected 'auto', 'cpu' or 'cuda'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use 'auto' or 'cpu'")
    return resolved


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


def _uses_context(model: nn.Module) -> bool:
    return getattr(model, "variant", "body") == "body_context"


def _unpack(
    batch: Mapping[str, Any], device: torch.device, with_context: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Move one collated batch to ``device``: body, context (or None), emotions, affect."""
    # channels_last lets cuDNN use its faster NHWC convolutions (and tensor cores under AMP).
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    body = batch["body"].to(device, non_blocking=True, memory_format=memory_format)  # (B, 3, S, S)
    context = None
    if with_context:
        if "context" not in batch:
            raise ValueError(
                "the model is the body_context variant but the batch has no 'context'; "
                "build the dataset with with_context=True (build_datasets does this)"
            )
        context = batch["context"].to(device, non_blocking=True, memory_format=memory_format)  # (B, 3, S', S')
    emotions = batch["emotions"].to(device, non_blocking=True)  # (B, 26)
    affect = batch["affect"].to(device, non_blocking=True)  # (B, 2)
    return body, context, emotions, affect


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    # float16 with a GradScaler: supported by every CUDA GPU with tensor cores.
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda")


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
        with _autocast(device, use_amp):
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
        if scheduler is not None:
            scheduler.step()

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


@dataclass(frozen=True, eq=False)
class Predictions:
    """Model outputs and targets for every sample of a loader, as NumPy arrays."""

    emotion_prob: np.ndarray  # (N, 26) float32 sigmoid probabilities, schema.EMOTIONS order
    affect_pred: np.ndarray  # (N, 2) float32 valence, arousal in [-1, 1]
    emotions_true: np.ndarray  # (N, 26) float32 multi-hot targets
    affect_true: np.ndarray  # (N, 2) float32 targets in [-1, 1]
    indices: np.ndarray  # (N,) int64 dataset row of each sample

    def __len__(self) -> int:
        return len(self.indices)


def _run_inference(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    criterion: nn.Module | None,
    amp: bool,
    progress: bool,
    desc: str,
) -> tuple[Predictions, dict[str, float]]:
    """Predictions for every sample plus sample-weighted mean losses (when ``criterion``).

    Output arrays are allocated once at the dataset's size and filled in place, so
    memory stays flat in the number of batches: nothing else is kept per batch.
    """
    device = torch.device(device)
    model.eval()
    with_context = _uses_context(model)
    capacity = len(loader.dataset)
    emotion_prob = np.empty((capacity, NUM_EMOTIONS), dtype=np.float32)
    affect_pred = np.empty((capacity, len(AFFECT_COLUMNS)), dtype=np.float32)
    emotions_true = np.empty((capacity, NUM_EMOTIONS), dtype=np.float32)
    affect_true = np.empty((capacity, len(AFFECT_COLUMNS)), dtype=np.float32)
    indices = np.empty(capacity, dtype=np.int64)
    sums = {"total": 0.0, "emotion": 0.0, "affect": 0.0}
    pos = 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            body, context, emotions, affect = _unpack(batch, device, with_context)
            with _autocast(device, amp):
                output = model(body, context) if with_context else model(body)
                losses = criterion(output, emotions, affect) if criterion is not None else None
            n = body.shape[0]
            if pos + n > capacity:
                raise ValueError(f"the loader yielded more than the {capacity} samples its dataset holds")
            emotion_prob[pos : pos + n] = torch.sigmoid(output.emotion_logits.float()).cpu().numpy()
            affect_pred[pos : pos + n] = output.affect.float().cpu().numpy()
            emotions_true[pos : pos + n] = emotions.float().cpu().numpy()
            affect_true[pos : pos + n] = affect.float().cpu().numpy()
            indices[pos : pos + n] = torch.as_tensor(batch["index"]).numpy()
            if losses is not None:
                sums["total"] += losses.total.item() * n
                sums["emotion"] += losses.emotion.item() * n
                sums["affect"] += losses.affect.item() * n
            pos += n
    if pos == 0:
        raise ValueError("the loader yielded no sample")
    # Slices are views: only a loader that skips samples (drop_last) leaves spare rows.
    predictions = Predictions(
        emotion_prob[:pos], affect_pred[:pos], emotions_true[:pos], affect_true[:pos], indices[:pos]
    )
    return predictions, {key: value / pos for key, value in sums.items()}


def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    progress: bool = True,
    amp: bool = False,
) -> Predictions:
    """Emotion probabilities and valence/arousal for every sample, under ``inference_mode``.

    Parameters
    ----------
    model : an :class:`~emonet.models.EmoNet`; put in eval mode.
    loader : yields collated :class:`~emonet.data.EmoticDataset` items (targets are
        returned alongside, so the split must be labelled).
    device : where the model lives.
    progress : show a tqdm bar.
    amp : float16 autocast (CUDA only).

    Returns
    -------
    Predictions
        Arrays in loader order; ``indices`` maps rows back to the dataset.
    """
    predictions, _ = _run_inference(model, loader, device, None, amp, progress, "predict")
    return predictions


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
    predictions, losses = _run_inference(model, loader, device, criterion, amp, progress, f"{prefix}eval")
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


# --------------------------------------------------------------------------- checkpoints


def _numpy_state_to_torch(state: tuple[Any, ...]) -> list[Any]:
    # NumPy's state holds an ndarray, which torch.load(weights_only=True) refuses; a tensor is fine.
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_torch(state: Sequence[Any]) -> tuple[Any, ...]:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _loader_generator(loader: Any) -> torch.Generator | None:
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def _capture_rng(loaders: Mapping[str, Any]) -> dict[str, Any]:
    """Every RNG a training epoch draws from: Python, NumPy, torch (CPU, CUDA), loaders."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_torch(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    for name, loader in loaders.items():
        generator = _loader_generator(loader)
        state[f"{name}_loader"] = generator.get_state() if generator is not None else None
    return state


def _restore_rng(state: Mapping[str, Any], loaders: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_torch(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, loader in loaders.items():
        generator = _loader_generator(loader)
        saved = state.get(f"{name}_loader")
        if generator is not None and saved is not None:
            generator.set_state(saved)
        elif generator is not None or saved is not None:
            logger.warning("the %s loader's generator could not be restored; its batch order will differ", name)


def _save_checkpoint(payload: Mapping[str, Any], path: Path) -> Path:
    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)
    return path


def _read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check one of our checkpoints (tensors and plain types only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: unpickling arbitrary objects from a file could run code.
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated file, not a torch file, pickled objects
        raise ValueError(f"{path} is not a readable EmoNet checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not an EmoNet checkpoint (no format={CHECKPOINT_FORMAT!r} marker; found {found}). "
            "Checkpoints are written by emonet.train.fit."
        )
    version = checkpoint.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {version!r}, this code reads {CHECKPOINT_VERSION}")
    missing = [key for key in ("model", "config", "epoch") if key not in checkpoint]
    if missing:
        raise ValueError(f"{path}: EmoNet checkpoint lacks keys {missing}")
    return checkpoint


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[EmoNet, EmoNetConfig, dict[str, Any]]:
    """Rebuild a trained model from a checkpoint written by :func:`fit`.

    The model is built from the config stored in the checkpoint, never from today's
    defaults, and without ImageNet weights (the checkpoint's weights replace them).

    Parameters
    ----------
    path : a ``best.pt`` or ``last.pt``.
    map_location : where the tensors and the model go.

    Returns
    -------
    model : the :class:`~emonet.models.EmoNet`, in eval mode, on ``map_location``.
    config : the run's :class:`~emonet.config.EmoNetConfig`.
    checkpoint : the raw dict: ``model``, ``optimizer``, ``scheduler``, ``scaler``,
        ``epoch``, ``best_metric``, ``best_epoch``, ``history``, ``bad_epochs``,
        ``stopped_early``, ``rng``, ``config`` and ``thresholds`` (26 floats tuned on
        validation in ``best.pt`` after training, else None).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not an EmoNet checkpoint, or its config or weights do not fit.
    """
    checkpoint = _read_checkpoint(path, map_location)
    try:
        config = EmoNetConfig.model_validate(checkpoint["config"])
    except ValueError as error:
        raise ValueError(f"{path}: the stored config is not valid: {error}") from error
    model = build_model(config.model, pretrained=False)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit the stored model config: {error}") from error
    model.to(map_location)
    model.eval()
    return model, config, checkpoint


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
    scheduler, per_step = build_scheduler(optimizer, tc, len(train_loader))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best_metric, best_epoch, bad_epochs, stopped_early = 0, -math.inf, 0, 0, False
    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None  # only when no checkpoint_dir
    if resume_from is not None:
        resume_from = Path(resume_from)
        checkpoint = _read_checkpoint(resume_from)
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
        _restore_rng(checkpoint["rng"], loaders)
        if checkpoint_dir is None:
            checkpoint_dir = resume_from.parent
        source_best = resume_from.parent / BEST_CHECKPOINT
        target_best = Path(checkpoint_dir) / BEST_CHECKPOINT
        if source_best.resolve() != target_best.resolve() and source_best.is_file():
            _save_checkpoint(_read_checkpoint(source_best), target_best)
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
            scheduler=scheduler if per_step else None,
        )
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
                "rng": _capture_rng(loaders),
                "config": config_to_dict(config),
                "thresholds": None,
            }
            _save_checkpoint(payload, last_path)
            if improved:
                _save_checkpoint(payload, best_path)
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
        best_payload = _read_checkpoint(best_path)
        model.load_state_dict(best_payload["model"])
    elif best_state is not None:
        model.load_state_dict(best_state)
    else:
        logger.warning("no best checkpoint found; tuning thresholds on the current weights")
    predictions = predict(model, val_loader, device, progress=progress, amp=use_amp)
    thresholds = tune_thresholds(predictions.emotions_true, predictions.emotion_prob)
    if best_payload is not None:
        best_payload["thresholds"] = [float(t) for t in thresholds]
        _save_checkpoint(best_payload, best_path)

    return FitResult(
        best_metric=best_metric,
        best_epoch=best_epoch,
        history=history,
        best_checkpoint=best_path if best_payload is not None else None,
        last_checkpoint=last_path if last_path is not None and last_path.is_file() else None,
        thresholds=thresholds,
        stopped_early=stopped_early,
    )
