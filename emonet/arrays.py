"""Safe, lazy access to the archive's ``.npy`` image arrays.

Kept free of torch and pandas: face-visibility worker processes import it, and each
heavy import would add seconds to every worker's start-up.
"""

from __future__ import annotations

import math
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


def _check_link_stays_inside(path: Path, img_dir: Path) -> None:
    """Refuse a symbolic link in the image folder whose real path leaves the folder.

    Only links need resolving: ``path`` is a plain name inside ``img_dir``, so a file
    that is not a link lies inside ``img_dir`` by construction.
    """
    target = Path(os.path.realpath(path))
    folder = Path(os.path.realpath(img_dir))
    if not target.is_relative_to(folder):
        raise ValueError(f"{path.name}: a symbolic link that leads outside the image folder {img_dir}; refused")


def load_array(img_dir: str | Path, name: str, mmap_min_bytes: int = 0) -> np.ndarray:
    """Open one image array of the archive lazily and check it is H x W x 3 uint8.

    The array is memory-mapped (``mmap_mode="r"``): nothing is read from disk until
    pixels are used, so large splits never sit in memory at once. Its memory order is
    kept (a Fortran-order file gives a Fortran-order map); callers that hand pixels
    to native code needing C order copy with ``np.ascontiguousarray``.

    Parameters
    ----------
    img_dir : the image folder.
    name : a plain file name in it.
    mmap_min_bytes : files smaller than this are read into memory at once instead,
        after their header is checked: for a small array used right away, reading
        costs about half as much as mapping (face visibility reads thousands of
        small crops per second). The default maps every file.

    Raises
    ------
    ValueError : ``name`` is not a plain file name, is a symbolic link whose target
        lies outside ``img_dir``, or is not an H x W x 3 uint8 ``.npy`` array. The
        message names the file; callers add the row.
    FileNotFoundError : no such file in ``img_dir``.
    """
    path = Path(img_dir) / check_file_name(name)
    if path.is_symlink():
        _check_link_stays_inside(path, Path(img_dir))
    if not path.is_file():
        raise FileNotFoundError(f"image array not found: {path}")
    try:
        size = path.stat().st_size
        if size < mmap_min_bytes:
            array = _read_small(path, size)
        else:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"cannot read {path} as a .npy array: {err}") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{path.name}: expected an H x W x 3 image, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"{path.name}: expected dtype uint8, got {array.dtype}")
    return array


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _read_small(path: Path, size: int) -> np.ndarray:
    """Read a .npy file of ``size`` bytes at once. The size its header declares is
    checked against the file's first: ``np.load`` would allocate whatever a header declares."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version not in _HEADER_READERS:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran_order, dtype = _HEADER_READERS[version](handle)
        count = math.prod(shape)
        if count * dtype.itemsize > size - handle.tell():
            raise ValueError(f"the header declares shape {shape} {dtype}, more than the file holds")
        values = np.fromfile(handle, dtype=dtype, count=count)
    return values.reshape(shape, order="F" if fortran_order else "C")
