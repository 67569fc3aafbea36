"""EmoNet checkpoints: the file format, atomic writing, safe loading (``weights_only``)
and the disk-space check. Resuming a run, repairing ``best.pt`` after a kill and the
random states are :mod:`emonet.training.run_state`'s; the device is
:mod:`emonet.models.devices`'.

Serving code (inference, batch prediction, the MLflow model) loads models through this
module and never imports the training loop. The loop hands it what it trains with
(model, optimizer, scheduler, scaler: anything with ``state_dict`` and
``load_state_dict``), so this module needs none of the training code.

A checkpoint is a dict of tensors and plain types, read with ``weights_only=True``:

- ``format`` : ``"emonet-checkpoint"`` (:data:`CHECKPOINT_FORMAT`), so a stray ``.pt``
  fails clearly; ``format_version`` : 1 (:data:`CHECKPOINT_VERSION`).
- ``model``, ``optimizer``, ``scheduler``, ``scaler`` : their ``state_dict()``.
- ``epoch`` : epochs done (1-based); ``best_metric``, ``best_epoch`` : the best val mAP
  so far and its epoch; ``bad_epochs`` : epochs since then (early stopping);
  ``stopped_early`` : whether early stopping ended the run; ``history`` : every epoch's
  metrics dict so far.
- ``rng`` : rank 0's random states (:func:`~emonet.training.run_state.capture_rng`); ``rng_ranks`` : every rank's,
  in rank order; ``world_size`` : the number of processes that trained.
- ``config`` : the resolved run config (``config_to_dict``), the model is rebuilt from it.
- ``thresholds`` : None, except in ``best.pt`` after training: the 26 decision
  thresholds tuned on validation.

A *serving* checkpoint (``serving.pt``, written beside ``best.pt`` with its thresholds;
the one a registered model carries) keeps only what inference reads: ``format``, ``format_version``, ``model``,
``config``, ``thresholds``, ``epoch``, ``best_metric``, ``best_epoch``, ``history`` and
``world_size``, with ``serving`` set to True. It loads like any other; it cannot resume
a run.

``last.pt`` is written every epoch and ``best.pt`` at each new best, ``last.pt`` first:
it names the epoch ``best.pt`` must hold, so a kill between the two writes is repaired
on resume (:func:`~emonet.training.run_state.resume`).
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from emonet.config import EmoNetConfig
from emonet.models.network import EmoNet, build_model
from emonet.utils.io import atomic_path, atomic_temp_files

logger = logging.getLogger(__name__)

__all__ = [
    "BEST_CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "LAST_CHECKPOINT",
    "SERVING_CHECKPOINT",
    "DiskSpaceError",
    "check_free_space",
    "estimate_checkpoint_bytes",
    "load_checkpoint",
    "read_checkpoint",
    "remove_stale_temp_files",
    "save_checkpoint",
    "serving_checkpoint_of",
    "serving_part",
    "stored_config",
    "write_serving_checkpoint",
]

CHECKPOINT_FORMAT = "emonet-checkpoint"  # marks our files, so a stray .pt fails clearly
CHECKPOINT_VERSION = 1
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
SERVING_CHECKPOINT = "serving.pt"  # best.pt's serving part, written with its thresholds
# What inference reads of a checkpoint; the optimizer, scheduler, scaler and random
# states (twice the weights' size with AdamW) stay with training.
SERVING_KEYS = (
    "format", "format_version", "model", "config", "thresholds", "epoch", "best_metric", "best_epoch", "history",
    "world_size",
)  # fmt: skip


class DiskSpaceError(OSError):
    """A checkpoint folder lacks the room to write checkpoints (``errno`` ENOSPC,
    ``filename`` the folder or file): the CLI prints it as one line."""


# Room kept free beyond the checkpoints themselves (other writers, file system overhead).
FREE_SPACE_MARGIN = 64 * 2**20


def _mib(size: float) -> str:
    return f"{size / 2**20:,.0f} MiB"


def _free_bytes(folder: Path) -> int:
    # The folder may not exist yet: ask about the nearest one that does.
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    return shutil.disk_usage(existing).free


def estimate_checkpoint_bytes(model: torch.nn.Module) -> int:
    """About how large a training checkpoint of ``model`` is on disk.

    The weights plus AdamW's two moment estimates (``exp_avg``, ``exp_avg_sq``) of the
    same size: three times the parameter bytes, plus the buffers (BatchNorm
    statistics) and 1 MiB for the rest (history, random states, config). A ResNet-50
    EmoNet (25.6 M float32 parameters) comes to about 300 MiB.
    """
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    return 3 * parameter_bytes + buffer_bytes + 2**20


def check_free_space(checkpoint_dir: str | Path, model: torch.nn.Module) -> None:
    """Refuse to start training where two checkpoints would not fit.

    ``last.pt`` and ``best.pt``, each written beside the old file before replacing it,
    need two checkpoints' room (:func:`estimate_checkpoint_bytes`) plus
    :data:`FREE_SPACE_MARGIN`, so a full disk stops a run before its first epoch
    rather than after it.

    Raises
    ------
    DiskSpaceError
        Naming the folder, the space needed and the space free.
    """
    checkpoint_dir = Path(checkpoint_dir)
    size = estimate_checkpoint_bytes(model)
    needed = 2 * size + FREE_SPACE_MARGIN
    free = _free_bytes(checkpoint_dir)
    if free < needed:
        raise DiskSpaceError(
            errno.ENOSPC,
            f"not enough free space for checkpoints: {_mib(needed)} needed (two checkpoints of about "
            f"{_mib(size)} and a {_mib(FREE_SPACE_MARGIN)} margin), {_mib(free)} free",
            str(checkpoint_dir),
        )


def remove_stale_temp_files(checkpoint_dir: str | Path) -> list[Path]:
    """Delete the temporary ``last.pt``/``best.pt`` files a killed run left in ``checkpoint_dir``.

    Only the atomic writer's own temporary names for those two files
    (:func:`emonet.utils.io.atomic_temp_files`) are touched. Call it when a run starts or
    resumes in the folder, which belongs to that one run. Returns the files removed.
    """
    removed = []
    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        for path in atomic_temp_files(checkpoint_dir, name):
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            logger.info("removed %s (%s), a temporary checkpoint file left by an interrupted run", path, _mib(size))
            removed.append(path)
    return removed


def save_checkpoint(payload: Mapping[str, Any], path: Path) -> Path:
    """Write ``payload`` to ``path`` atomically (the old file stays whole if this fails).

    Raises
    ------
    DiskSpaceError
        When the disk fills during the write, naming ``path``. torch's zip writer
        reports a short write as a ``RuntimeError`` ("[enforce fail at
        inline_container.cc] ... unexpected pos", "PytorchStreamWriter failed writing
        file"), without the errno; such an error is reported the same way.
    """
    try:
        with atomic_path(path) as tmp:
            torch.save(dict(payload), tmp)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise DiskSpaceError(
            errno.ENOSPC,
            f"no space left on device writing the checkpoint ({_mib(_free_bytes(path.parent))} free)",
            str(path),
        ) from error
    except RuntimeError as error:
        text = str(error)
        if "inline_container" not in text and "PytorchStreamWriter" not in text:
            raise
        first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        raise DiskSpaceError(
            errno.ENOSPC,
            f"could not write the checkpoint, is the disk full? ({_mib(_free_bytes(path.parent))} free; "
            f"torch: {first_line})",
            str(path),
        ) from error
    return path


def read_checkpoint(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> dict[str, Any]:
    """Load and check one of our checkpoints (tensors and plain types only).

    ``mmap=True`` maps the tensors from the file instead of reading them, for a caller
    that needs the config and thresholds but not the weights (ONNX Runtime serving)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: unpickling arbitrary objects from a file could run code.
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # truncated file, not a torch file, pickled objects
        raise ValueError(f"{path} is not a readable EmoNet checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not an EmoNet checkpoint (no format={CHECKPOINT_FORMAT!r} marker; found {found}). "
            "Checkpoints are written by emonet.training.trainer.fit."
        )
    version = checkpoint.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {version!r}, this code reads {CHECKPOINT_VERSION}")
    missing = [key for key in ("model", "config", "epoch") if key not in checkpoint]
    if missing:
        raise ValueError(f"{path}: EmoNet checkpoint lacks keys {missing}")
    return checkpoint


def stored_config(checkpoint: Mapping[str, Any], path: str | Path) -> EmoNetConfig:
    """The run config stored in ``checkpoint`` (read from ``path``, which errors name).

    Raises
    ------
    ValueError
        The stored config is not a valid :class:`~emonet.config.EmoNetConfig`.
    """
    try:
        return EmoNetConfig.model_validate(checkpoint["config"])
    except ValueError as error:
        raise ValueError(f"{path}: the stored config is not valid: {error}") from error


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[EmoNet, EmoNetConfig, dict[str, Any]]:
    """Rebuild a trained model from a checkpoint written by ``emonet.training.trainer.fit``.

    The model is built from the config stored in the checkpoint, never from today's
    defaults, and without ImageNet weights (the checkpoint's weights replace them).

    Parameters
    ----------
    path : a ``best.pt`` or ``last.pt``.
    map_location : where the tensors and the model go.

    Returns
    -------
    model : the :class:`~emonet.models.network.EmoNet`, in eval mode, on ``map_location``.
    config : the run's :class:`~emonet.config.EmoNetConfig`.
    checkpoint : the raw dict, with every key listed in this module's docstring
        (``thresholds``: the 26 floats tuned on validation in ``best.pt``).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not an EmoNet checkpoint, or its config or weights do not fit.
    """
    checkpoint = read_checkpoint(path, map_location)
    config = stored_config(checkpoint, path)
    model = build_model(config, pretrained=False)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit the stored model config: {error}") from error
    model.to(map_location)
    model.eval()
    return model, config, checkpoint


def serving_part(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``checkpoint`` that inference reads (:data:`SERVING_KEYS`), marked ``serving``."""
    return {**{key: checkpoint[key] for key in SERVING_KEYS if key in checkpoint}, "serving": True}


def write_serving_checkpoint(path: str | Path, dest: str | Path) -> Path:
    """Write the serving part of checkpoint ``path`` to ``dest`` (atomically): the
    weights, the config, the thresholds and the run's summary, without the optimizer,
    scheduler, scaler and random states that only resuming needs.

    A finished run already has it: ``serving.pt`` (:data:`SERVING_CHECKPOINT`) is written
    beside ``best.pt`` with the thresholds, and :func:`serving_checkpoint_of` finds it.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`read_checkpoint`: no file, or not an EmoNet checkpoint.
    """
    return save_checkpoint(serving_part(read_checkpoint(path)), Path(dest))


def serving_checkpoint_of(path: str | Path) -> Path | None:
    """The ``serving.pt`` written with checkpoint ``path``'s thresholds, if it is there and
    not older than ``path`` (a run killed between the two writes leaves an older one)."""
    path = Path(path)
    serving = path.with_name(SERVING_CHECKPOINT)
    if path.name != BEST_CHECKPOINT or not serving.is_file():
        return None
    return serving if serving.stat().st_mtime_ns >= path.stat().st_mtime_ns else None
