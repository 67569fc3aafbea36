"""EmoNet checkpoints: the file format, atomic saving, safe loading (``weights_only``),
random-state capture and restore, and device resolution.

Serving code (inference, batch prediction, the MLflow model) loads models through this
module and never imports the training loop.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emonet.config import EmoNetConfig
from emonet.io import atomic_path
from emonet.models import EmoNet, build_model

logger = logging.getLogger(__name__)

__all__ = [
    "BEST_CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "LAST_CHECKPOINT",
    "capture_rng",
    "load_checkpoint",
    "read_checkpoint",
    "resolve_device",
    "restore_rng",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "emonet-checkpoint"  # marks our files, so a stray .pt fails clearly
CHECKPOINT_VERSION = 1
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


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


def save_checkpoint(payload: Mapping[str, Any], path: Path) -> Path:
    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)
    return path


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
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
    checkpoint = read_checkpoint(path, map_location)
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
