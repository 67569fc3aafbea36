"""Safe, lazy access to the archive's ``.npy`` image arrays.

Kept free of torch and pandas: face-visibility worker processes import it, and each
heavy import would add seconds to every worker's start-up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

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
        lies outside ``img_dir``, or is not an H x W x 3 uint8 ``.npy`` array (see
        :func:`open_image_array`). The message names the file; callers add the row.
    FileNotFoundError : no such file in ``img_dir``.
    """
    path = Path(img_dir) / check_file_name(name)
    if path.is_symlink():
        _check_link_stays_inside(path, Path(img_dir))
    if not path.is_file():
        raise FileNotFoundError(f"image array not found: {path}")
    return open_image_array(path, mmap_min_bytes)


def open_image_array(path: Path, mmap_min_bytes: int = 0) -> np.ndarray:
    """An H x W x 3 uint8 ``.npy`` file, memory-mapped (or read, under ``mmap_min_bytes``).

    The header is parsed and checked before any pixel is touched or any memory is
    allocated: exactly three positive integer dimensions, the last 3, dtype uint8, and
    a file long enough for what the header declares. Any malformed file (bad magic,
    a garbled or truncated header, booleans or negative numbers in the shape, pickled
    objects, missing pixels) raises ``ValueError`` naming the file, never another
    exception type.

    Raises
    ------
    ValueError : the file is not such an array.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            shape, fortran_order, dtype, offset = _read_header(handle, path)
            _check_image_header(path, shape, dtype, size - offset)
            order = "F" if fortran_order else "C"
            if size < mmap_min_bytes:
                return np.fromfile(handle, dtype=dtype, count=math.prod(shape)).reshape(shape, order=order)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    except OSError as err:
        raise ValueError(f"cannot read {path} as a .npy array: {err}") from None


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _read_header(handle: Any, path: Path) -> tuple[tuple[Any, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of ``path``, open as ``handle``."""
    try:
        version = np.lib.format.read_magic(handle)
        if version not in _HEADER_READERS:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran_order, dtype = _HEADER_READERS[version](handle)
    # NumPy parses the header with ast.literal_eval and tokenize, so a garbled header
    # raises whatever those raise (TypeError, SyntaxError, tokenize.TokenError,
    # RecursionError, ...): every failure here means "not a .npy file we can read".
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"cannot read {path} as a .npy array: {err}") from None
    return shape, fortran_order, dtype, handle.tell()


def _check_image_header(path: Path, shape: tuple[Any, ...], dtype: np.dtype, data_bytes: int) -> None:
    if dtype.hasobject:
        raise ValueError(f"cannot read {path} as a .npy array: it holds Python objects (pickles are refused)")
    # bool is an int subclass: a header may say (True, 64, 3).
    if (
        not isinstance(shape, tuple)
        or len(shape) != 3
        or any(type(side) is not int or side <= 0 for side in shape)
        or shape[2] != 3
    ):
        raise ValueError(f"{path.name}: expected an H x W x 3 image, got shape {shape}")
    if dtype != np.uint8:
        raise ValueError(f"{path.name}: expected dtype uint8, got {dtype}")
    if math.prod(shape) > data_bytes:
        raise ValueError(
            f"{path.name}: the header declares shape {shape} {dtype}, "
            f"more than the file holds ({data_bytes} bytes of pixels)"
        )
