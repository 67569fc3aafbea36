"""Reading input images for prediction: ``.npy`` arrays, PNG/JPEG files and base64 PNG/JPEG,
each checked to be an ``H x W x 3`` RGB uint8 array."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "check_image", "decode_image_b64", "read_image"]

IMAGE_SUFFIXES: tuple[str, ...] = (".npy", ".png", ".jpg", ".jpeg")


def check_image(image: object, name: str = "image") -> np.ndarray:
    """Return ``image`` as an ``H x W x 3`` uint8 array, or raise ``ValueError`` naming ``name``."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a NumPy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: expected an H x W x 3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {image.dtype}")
    return image


def _decode_pil(data: bytes | io.BytesIO | Path, name: str) -> np.ndarray:
    try:
        with Image.open(data if not isinstance(data, bytes) else io.BytesIO(data)) as image:
            # convert("RGB") also drops alpha and expands grayscale/palette images.
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{name}: cannot decode as a PNG/JPEG image: {error}") from None


def read_image(path: str | Path) -> np.ndarray:
    """Read one image file as an ``H x W x 3`` RGB uint8 array.

    Parameters
    ----------
    path : a ``.npy`` array (as in the EMOTIC archive; memory-mapped, so only the
        pixels used are read) or a ``.png`` / ``.jpg`` / ``.jpeg`` picture (converted
        to RGB).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        An unsupported suffix, an undecodable file, or a ``.npy`` that is not H x W x 3 uint8.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(
            f"unsupported image file type {suffix or '(none)'!r} for {path}; expected one of {IMAGE_SUFFIXES}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ValueError(f"cannot read {path} as a .npy array: {error}") from None
        return check_image(array, str(path))
    return _decode_pil(path, str(path))


def decode_image_b64(text: str) -> np.ndarray:
    """Decode a base64 PNG or JPEG (optionally a ``data:image/...;base64,`` URL) to RGB uint8.

    Raises
    ------
    ValueError
        Not a string, not valid base64, or bytes that are not a PNG/JPEG image.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected a non-empty base64 string, got {type(text).__name__}")
    text = text.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"invalid base64 image data: {error}") from None
    return _decode_pil(data, "base64 image")
