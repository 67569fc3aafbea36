"""Reading input images for prediction: ``.npy`` arrays, PNG/JPEG files and base64 PNG/JPEG,
each checked to be an ``H x W x 3`` RGB uint8 array of at most ``max_pixels`` pixels.

The pixel limit is checked from the file's header, before any pixel is decoded: a 20 KB
PNG can declare 13000 x 13000 pixels and decode to half a gigabyte, so a server that
decodes first and checks afterwards can be made to run out of memory by one request.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from emonet.data.arrays import open_image_array

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_REQUEST_PIXELS",
    "DEFAULT_MAX_ROWS",
    "IMAGE_SUFFIXES",
    "ImageTooLargeError",
    "check_image",
    "check_max_pixels",
    "check_pixel_limit",
    "confined_image_size",
    "decode_image_b64",
    "image_b64_size",
    "image_file_size",
    "read_confined_image",
    "read_image",
    "resolve_image_root",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".npy", ".png", ".jpg", ".jpeg")
# 40 million pixels: an 8000 x 5000 photo (120 MB as RGB uint8), far above any EMOTIC
# image, while a batch of 32 such images still fits in a server's memory.
DEFAULT_MAX_PIXELS = 40_000_000
# Limits of one REST request, so that a few requests cannot keep the scoring workers busy
# for long: rows, and pixels of all its images together (each image also stays under
# DEFAULT_MAX_PIXELS). 256 rows of 224 px crops with 640 x 480 scenes are 92 Mpx.
DEFAULT_MAX_ROWS = 256
DEFAULT_MAX_REQUEST_PIXELS = 200_000_000


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than the limit; nothing was decoded."""


def check_pixel_limit(height: int, width: int, max_pixels: int | None, name: str = "image") -> None:
    """Raise :class:`ImageTooLargeError` naming ``name`` if ``height * width > max_pixels``.

    ``max_pixels=None`` disables the check (for trusted, local inputs only).
    """
    if max_pixels is not None and int(height) * int(width) > max_pixels:
        raise ImageTooLargeError(
            f"{name}: image of {int(width)} x {int(height)} = {int(height) * int(width):,} pixels is over the "
            f"limit of {max_pixels:,} pixels (max_pixels)"
        )


def check_max_pixels(max_pixels: int | None) -> int | None:
    """Return ``max_pixels`` if it is a positive int or None; raise ``ValueError`` otherwise."""
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    return max_pixels


def check_image(image: object, name: str = "image") -> np.ndarray:
    """Return ``image`` as an ``H x W x 3`` uint8 array, or raise ``ValueError`` naming ``name``."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a NumPy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: expected an H x W x 3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {image.dtype}")
    return image


def _decode_pil(data: bytes | Path, name: str, max_pixels: int | None, *, header_only: bool = False) -> Any:
    """The RGB pixels of a PNG/JPEG, or with ``header_only`` its ``(height, width)``."""
    try:
        # Only the two documented formats: every other Pillow decoder (TIFF, PSD, ...) stays
        # out of reach of a REST client.
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=("PNG", "JPEG")) as image:
            # Image.open reads only the header: the size is known, no pixel is decoded yet.
            if header_only:
                return image.height, image.width
            check_pixel_limit(image.height, image.width, max_pixels, name)
            # convert("RGB") also drops alpha and expands grayscale/palette images.
            return np.asarray(image.convert("RGB"))
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as error:
        # PIL's own limit (about 179 Mpx), met when max_pixels is set above it.
        raise ImageTooLargeError(f"{name}: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{name}: cannot decode as a PNG/JPEG image: {error}") from None


def image_file_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file (as :func:`read_image` reads it), from its header alone.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`read_image`.
    """
    path = _checked_image_file(path)
    if path.suffix.lower() == ".npy":
        return open_image_array(path).shape[:2]
    return _decode_pil(path, str(path), None, header_only=True)


def _checked_image_file(path: str | Path) -> Path:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(
            f"unsupported image file type {suffix or '(none)'!r} for {path}; expected one of {IMAGE_SUFFIXES}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return path


def read_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read one image file as an ``H x W x 3`` RGB uint8 array.

    Parameters
    ----------
    path : a ``.npy`` array (as in the EMOTIC archive; memory-mapped, so only the
        pixels used are read) or a ``.png`` / ``.jpg`` / ``.jpeg`` picture (converted
        to RGB).
    max_pixels : refuse images of more pixels (height x width), checked from the
        file's header before decoding; None for no limit.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ImageTooLargeError
        (a ``ValueError``) more than ``max_pixels`` pixels.
    ValueError
        An unsupported suffix, an undecodable file, or a ``.npy`` that is not H x W x 3 uint8.
    """
    max_pixels = check_max_pixels(max_pixels)
    path = _checked_image_file(path)
    if path.suffix.lower() == ".npy":
        # A memory map reads the header only: the shape is checked before any pixel is read.
        array = open_image_array(path)
        check_pixel_limit(array.shape[0], array.shape[1], max_pixels, str(path))
        return array
    return _decode_pil(path, str(path), max_pixels)


def decode_image_b64(text: str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a base64 PNG or JPEG (optionally a ``data:image/...;base64,`` URL) to RGB uint8.

    Raises
    ------
    ImageTooLargeError
        (a ``ValueError``) the image declares more than ``max_pixels`` pixels (nothing decoded).
    ValueError
        Not a string, not valid base64, or bytes that are not a PNG/JPEG image.
    """
    max_pixels = check_max_pixels(max_pixels)
    return _decode_pil(_b64_bytes(text), "base64 image", max_pixels)


def image_b64_size(text: str) -> tuple[int, int]:
    """``(height, width)`` of a base64 PNG/JPEG (as :func:`decode_image_b64` takes it), from its header alone.

    Raises
    ------
    ValueError
        As :func:`decode_image_b64`.
    """
    return _decode_pil(_b64_bytes(text), "base64 image", None, header_only=True)


def _b64_bytes(text: str) -> bytes:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected a non-empty base64 string, got {type(text).__name__}")
    text = text.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"invalid base64 image data: {error}") from None


# --------------------------------------------------------------------------- confinement


def resolve_image_root(root: str | Path) -> Path:
    """The real path (symlinks resolved) of an image root folder.

    Raises
    ------
    FileNotFoundError
        ``root`` is not an existing folder.
    """
    resolved = Path(root).expanduser().resolve()
    if not resolved.is_dir():
        raise FileNotFoundError(f"image root is not a folder: {root}")
    return resolved


def read_confined_image(path: str, root: Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file only if its real path lies inside ``root``.

    For callers that cannot be trusted with the file system (REST clients). ``path`` is
    taken relative to ``root`` unless absolute; symlinks and ``..`` are resolved before
    the check, so neither can lead outside. A file that does not exist, lies outside
    ``root`` or cannot be read as an image gets one and the same message, which names
    only the path as given: the error tells a client nothing about which files exist.

    Parameters
    ----------
    path : the file, as the caller gave it.
    root : the allowed folder, as returned by :func:`resolve_image_root`.
    max_pixels : see :func:`read_image`. An image over the limit is named as such: it
        lies inside ``root``, where the caller may look.

    Raises
    ------
    ImageTooLargeError
        An image inside ``root`` over the pixel limit.
    ValueError
        Anything else: missing, outside ``root``, not a readable image.
    """
    return _confined(path, root, lambda resolved: read_image(resolved, max_pixels=max_pixels))


def confined_image_size(path: str, root: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file under ``root``, from its header alone; refused as
    :func:`read_confined_image` refuses."""
    return _confined(path, root, image_file_size)


def _confined(path: str, root: Path, read: Callable[[Path], Any]) -> Any:
    refused = ValueError(f"{path!r} is not a readable image file under the image root")
    try:
        resolved = (root / path).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        raise refused from None
    if not resolved.is_relative_to(root):
        raise refused
    try:
        # The resolved path, not the given one: it holds no symlink a client could aim elsewhere.
        return read(resolved)
    except ImageTooLargeError:
        raise
    except (ValueError, OSError):
        raise refused from None
