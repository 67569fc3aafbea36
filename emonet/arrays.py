"""Safe, lazy access to the archive's ``.npy`` image arrays.

Kept free of torch and pandas: face-visibility worker processes import it, and each
heavy import would add seconds to every worker's start-up.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def check_file_name(name: object, column: str = "file name") -> str:
    """Return ``name`` if it is a plain file name; raise ``ValueError`` otherwise.

    Array names come from a CSV a user may not control: a path separator, ``..`` or
    an absolute path could make the loader read outside the image folder.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{column} must be a non-empty string, got {name!r}")
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if any(sep in name for sep in separators) or name in {".", ".."} or os.path.isabs(name):
        raise ValueError(f"{column} must be a plain file name inside the image folder, got {name!r}")
    return name


def load_array(img_dir: str | Path, name: str) -> np.ndarray:
    """Open one image array of the archive lazily and check it is H x W x 3 uint8.

    The array is memory-mapped (``mmap_mode="r"``): nothing is read from disk until
    pixels are used, so large splits never sit in memory at once.
    """
    path = Path(img_dir) / check_file_name(name)
    if not path.is_file():
        raise FileNotFoundError(f"image array not found: {path}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"cannot read {path} as a .npy array: {err}") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{path.name}: expected an H x W x 3 image, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"{path.name}: expected dtype uint8, got {array.dtype}")
    return array
