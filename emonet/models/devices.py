"""The torch device a run or a served model uses, from its ``device`` setting."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


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
