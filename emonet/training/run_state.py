"""Resuming a training run: the counters a run carries (:class:`FitState`), what it returns
(:class:`FitResult`), the per-epoch checkpoints it writes (:func:`build_checkpoint`,
:func:`save_epoch`), random-state capture and restore, and :func:`resume`, which repairs
``best.pt`` after a kill between the two writes.

The file format itself (writing, safe loading) is :mod:`emonet.models.checkpoint`'s.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from emonet.config import EmoNetConfig, config_to_dict
from emonet.models.checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LAST_CHECKPOINT,
    SERVING_CHECKPOINT,
    read_checkpoint,
    save_checkpoint,
    serving_part,
)
from emonet.schema import NUM_EMOTIONS

logger = logging.getLogger(__name__)

__all__ = [
    "FitResult",
    "FitState",
    "build_checkpoint",
    "capture_rng",
    "read_best",
    "read_fit_result",
    "restore_rng",
    "resume",
    "save_epoch",
    "save_thresholds",
]


class Stateful(Protocol):
    """What a checkpoint saves and restores: a module, an optimizer, a scheduler, a scaler."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> Any: ...


@dataclass(frozen=True, eq=False)
class FitResult:
    """What ``emonet.training.trainer.fit`` returns (or :func:`read_fit_result` reads back);
    ``history`` holds the dicts the callbacks received."""

    best_metric: float  # best val mAP
    best_epoch: int  # 1-based epoch of best_metric
    history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    thresholds: np.ndarray = field(default_factory=lambda: np.full(NUM_EMOTIONS, 0.5))  # (26,)
    stopped_early: bool = False


@dataclass
class FitState:
    """The counters a training run carries from epoch to epoch; every checkpoint holds them."""

    epoch: int = 0  # epochs done
    best_metric: float = -math.inf  # best val mAP so far
    best_epoch: int = 0  # its 1-based epoch; 0 before the first
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # every epoch's metrics

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> FitState:
        """The counters a ``last.pt`` holds."""
        return cls(
            epoch=int(checkpoint["epoch"]),
            best_metric=float(checkpoint["best_metric"]),
            best_epoch=int(checkpoint["best_epoch"]),
            bad_epochs=int(checkpoint["bad_epochs"]),
            stopped_early=bool(checkpoint["stopped_early"]),
            history=[dict(row) for row in checkpoint["history"]],
        )

    def result(self, thresholds: np.ndarray, checkpoint_dir: Path | None) -> FitResult:
        """The :class:`FitResult` of a run that ended in this state, with its tuned thresholds."""
        return FitResult(
            best_metric=self.best_metric,
            best_epoch=self.best_epoch,
            history=self.history,
            thresholds=thresholds,
            stopped_early=self.stopped_early,
            best_checkpoint=checkpoint_dir / BEST_CHECKPOINT if checkpoint_dir is not None else None,
            last_checkpoint=checkpoint_dir / LAST_CHECKPOINT if checkpoint_dir is not None else None,
        )


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


def capture_rng(loaders: Mapping[str, Any]) -> dict[str, Any]:
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


def restore_rng(state: Mapping[str, Any], loaders: Mapping[str, Any]) -> None:
    """Put back the random states :func:`capture_rng` took (CUDA only on as many devices)."""
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


def build_checkpoint(
    *,
    model: Stateful,
    optimizer: Stateful,
    scheduler: Stateful,
    scaler: Stateful,
    state: FitState,
    config: EmoNetConfig,
    rng_ranks: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The contents of a checkpoint after an epoch (the keys in this module's docstring).

    Parameters
    ----------
    model, optimizer, scheduler, scaler : what trains; their ``state_dict()`` is saved.
    state : the run's counters and history after the epoch.
    config : the run config.
    rng_ranks : :func:`capture_rng` of every rank, in rank order (one for a single process).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "bad_epochs": state.bad_epochs,
        "stopped_early": state.stopped_early,
        "rng": rng_ranks[0],
        "rng_ranks": list(rng_ranks),
        "world_size": len(rng_ranks),
        "config": config_to_dict(config),
        "thresholds": None,
    }


def save_epoch(checkpoint: Mapping[str, Any], checkpoint_dir: Path, improved: bool) -> None:
    """Write ``last.pt`` and, when the epoch is a new best, ``best.pt``.

    ``last.pt`` first: it names ``best_epoch``, and when that is this epoch it holds the
    same weights, so a kill before ``best.pt`` is written is repaired on resume.
    """
    save_checkpoint(checkpoint, checkpoint_dir / LAST_CHECKPOINT)
    if improved:
        save_checkpoint(checkpoint, checkpoint_dir / BEST_CHECKPOINT)


def resume(
    path: str | Path,
    config: EmoNetConfig,
    checkpoint_dir: str | Path,
    *,
    model: Stateful,
    optimizer: Stateful,
    scheduler: Stateful,
    scaler: Stateful,
    loaders: Mapping[str, Any],
    rank: int = 0,
    world_size: int = 1,
) -> FitState:
    """Continue a run from its ``last.pt``: restore every state, return the counters.

    The model, optimizer, scheduler and scaler states are loaded in place, and this
    rank's random states (Python, NumPy, torch, CUDA, the loaders' generators) are
    restored, so the resumed run draws what the uninterrupted one would have. Rank 0
    also brings the run's ``best.pt`` into ``checkpoint_dir`` and repairs it if a kill
    left it missing or one best epoch behind.

    Parameters
    ----------
    path : the ``last.pt`` to continue from.
    config : this run's config; the model config and ``train.scheduler`` must match the
        checkpoint's (changed loss or train settings are logged).
    checkpoint_dir : where the resumed run writes its checkpoints.
    model, optimizer, scheduler, scaler : built for this run; restored in place.
    loaders : ``{"train": ..., "val": ...}``, whose generators are restored.
    rank, world_size : this process's rank and the number of processes.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Not an EmoNet checkpoint, a different model config or scheduler, or a
        ``best.pt`` that cannot be repaired.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    _check_resume(checkpoint, config, path)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng(_rng_of_this_rank(checkpoint, rank, world_size), loaders)
    if rank == 0:
        source_best, target_best = path.parent / BEST_CHECKPOINT, Path(checkpoint_dir) / BEST_CHECKPOINT
        best: dict[str, Any] | None = None
        if source_best.resolve() != target_best.resolve() and source_best.is_file():
            best = read_checkpoint(source_best)
            save_checkpoint(best, target_best)
        elif target_best.is_file():
            best = read_checkpoint(target_best)
        _repair_best(checkpoint, path, target_best, int(best["epoch"]) if best is not None else None)
    state = FitState.from_checkpoint(checkpoint)
    logger.info(
        "resumed from %s after epoch %d (best val mAP %.4f at epoch %d)",
        path,
        state.epoch,
        state.best_metric,
        state.best_epoch,
    )
    return state


def read_best(path: Path, best_epoch: int) -> dict[str, Any]:
    """The ``best.pt`` a finished run must have left, holding epoch ``best_epoch``.

    Raises
    ------
    FileNotFoundError
        ``path`` is missing.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; it should hold epoch {best_epoch}, the best one")
    return read_checkpoint(path)


def save_thresholds(best: Mapping[str, Any], thresholds: Sequence[float] | np.ndarray, path: Path) -> None:
    """Write ``best`` back to ``path`` with the decision thresholds tuned on validation,
    then its serving part beside it (``serving.pt``, what a registered model carries)."""
    finished = {**best, "thresholds": [float(t) for t in thresholds]}
    save_checkpoint(finished, path)
    save_checkpoint(serving_part(finished), path.with_name(SERVING_CHECKPOINT))


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
    return FitState.from_checkpoint(last).result(np.asarray(best["thresholds"], dtype=np.float64), checkpoint_dir)


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


def _rng_of_this_rank(checkpoint: Mapping[str, Any], rank: int, world: int) -> Mapping[str, Any]:
    """This rank's saved RNG states; rank 0's (with a warning) if the process count changed."""
    per_rank = checkpoint.get("rng_ranks") or [checkpoint["rng"]]
    if len(per_rank) == world:
        return per_rank[rank]
    logger.warning(
        "resuming on %d processes a run checkpointed on %d: augmentation draws will differ from an uninterrupted run",
        world,
        len(per_rank),
    )
    return checkpoint["rng"]


def _repair_best(last: Mapping[str, Any], last_path: Path, best_path: Path, held: int | None) -> None:
    """Make ``best.pt`` (holding epoch ``held``, None when missing) hold the epoch
    ``last.pt`` names as the best.

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
    if held == best_epoch:
        return
    if best_epoch == last_epoch:
        logger.warning(
            "%s holds epoch %s but %s names epoch %d, its own, as the best (training was stopped between the "
            "two writes): re-saving best.pt from last.pt",
            best_path,
            held,
            last_path,
            best_epoch,
        )
        save_checkpoint(last, best_path)
        return
    raise ValueError(
        f"{best_path} holds epoch {held}, but {last_path} (epoch {last_epoch}) says the best epoch is {best_epoch}; "
        "those weights are in neither file. Resume with the best.pt of the same run beside last.pt."
    )
