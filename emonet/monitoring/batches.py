"""A batch of new crops to monitor: a folder of image files, or a CSV that lists them.

Layouts (:func:`open_batch`):

- a folder: every ``.npy``, ``.png``, ``.jpg`` and ``.jpeg`` file in it (not in
  subfolders), in name order; unlabelled;
- a CSV with an ``image_path`` column (relative paths from ``img_dir``, else from the CSV's
  folder), or the archive's ``Crop_name`` column with ``img_dir`` (``body_context`` models
  also need ``context_path`` / ``Arr_name``). With the 26 emotion columns (0/1, named as
  in :data:`emonet.schema.EMOTIONS`) the batch is labelled and its performance is
  checked; a ``Face_Visibility`` column (as the data step writes it) is used as it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from emonet.data.arrays import load_array
from emonet.data.images import DEFAULT_MAX_PIXELS, check_pixel_limit, read_image
from emonet.inference.csv_scoring import CsvImageReader
from emonet.schema import EMOTIONS, FACE_VISIBILITY_COLUMN
from emonet.utils.io import read_csv

__all__ = ["BATCH_CSV", "IMAGE_SUFFIXES", "MonitoringBatch", "batch_label", "open_batch"]

IMAGE_SUFFIXES: tuple[str, ...] = (".npy", ".png", ".jpg", ".jpeg")
# The table of a batch that is a folder with its crops (the demo's and an inbox's layout).
BATCH_CSV = "batch.csv"


def batch_label(path: str | Path) -> str:
    """How runs and reports name a batch: its file or folder name, with the folder for a
    ``batch.csv`` (``shifted/batch.csv``), whose own name says nothing."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.name == BATCH_CSV and path.parent.name else path.name


RowReader = Callable[[int], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True, eq=False)
class MonitoringBatch:
    """The rows of one batch: a name and a reader per row, and what the batch carries.

    ``read(i)`` returns ``(crop, context)`` (``context`` None for body models) and raises
    ``OSError`` or ``ValueError`` for an unreadable or malformed image. ``fingerprint`` is
    the SHA-256 of the batch's content (the CSV and every image file it names, or every
    file of the folder, with their names): the same content gives the same fingerprint
    wherever it lies.
    """

    source: Path
    names: list[str]
    read: RowReader
    fingerprint: str
    labels: np.ndarray | None = None  # (N, 26) multi-hot
    face_visibility: np.ndarray | None = None  # (N,) scores in [0, 100] from the CSV

    def __len__(self) -> int:
        return len(self.names)

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def _digest(paths: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for name, path in paths:
        digest.update(name.encode("utf-8") + b"\0")
        try:
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        except OSError:  # an unreadable file is skipped later; its absence is the content
            digest.update(b"<unreadable>")
    return digest.hexdigest()


def _read_file(path: Path, max_pixels: int | None) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        array = load_array(path.parent, path.name)
        check_pixel_limit(array.shape[0], array.shape[1], max_pixels, path.name)
        return np.asarray(array)
    return read_image(path, max_pixels=max_pixels)


def _open_folder(folder: Path, needs_context: bool, max_pixels: int | None) -> MonitoringBatch:
    if needs_context:
        raise ValueError(
            f"the model is a body_context model, and a folder of crops has no full images: list the crops in a CSV "
            f"with image_path and context_path instead of {folder}"
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"the batch folder {folder} holds no crop ({', '.join(IMAGE_SUFFIXES)} files)")
    return MonitoringBatch(
        source=folder,
        names=[p.name for p in files],
        read=lambda i: (_read_file(files[i], max_pixels), None),
        fingerprint=_digest([(p.name, p) for p in files]),
    )


def _labels(table: pd.DataFrame, csv_path: Path) -> np.ndarray | None:
    present = [emotion for emotion in EMOTIONS if emotion in table.columns]
    if not present:
        return None
    missing = [emotion for emotion in EMOTIONS if emotion not in table.columns]
    if missing:
        raise ValueError(
            f"{csv_path.name} has emotion columns {present[:3]}... but not {missing}: a labelled batch needs all 26 "
            "(named as in emonet.schema.EMOTIONS), an unlabelled one none"
        )
    values = table[list(EMOTIONS)].apply(pd.to_numeric, errors="coerce")
    bad = ~values.isin([0, 1])
    if bad.to_numpy().any():
        row, column = next(zip(*np.nonzero(bad.to_numpy())))
        value = table[EMOTIONS[column]].iloc[row]
        value = value.item() if isinstance(value, np.generic) else value  # 2, not np.int64(2)
        raise ValueError(f"{csv_path.name} row {row}: {EMOTIONS[column]} is {value!r}; emotion labels must be 0 or 1")
    return values.to_numpy(dtype=np.float32)


def _face_visibility(table: pd.DataFrame) -> np.ndarray | None:
    if FACE_VISIBILITY_COLUMN not in table.columns:
        return None
    scores = pd.to_numeric(table[FACE_VISIBILITY_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
    # Missing or out-of-range scores: the column is not trusted and scores are computed again.
    return scores if np.all(np.isfinite(scores) & (scores >= 0) & (scores <= 100)) else None


def _open_csv(csv_path: Path, img_dir: Path | None, needs_context: bool, max_pixels: int | None) -> MonitoringBatch:
    try:
        table = read_csv(csv_path, dtype={"image_path": str, "context_path": str, "Crop_name": str, "Arr_name": str})
    except pd.errors.EmptyDataError:
        raise ValueError(f"the batch CSV {csv_path} is empty (no header)") from None
    if table.empty:
        raise ValueError(f"the batch CSV {csv_path} lists no crop")
    reader = CsvImageReader(list(table.columns), csv_path, img_dir, needs_context, max_pixels=max_pixels)
    records = table.to_dict(orient="records")
    files = [(csv_path.name, csv_path)] + [(str(p), p) for p in reader.listed_files(csv_path)]
    if reader.layout == "archive":  # the crops in img_dir, named by the CSV
        assert img_dir is not None
        names = [reader.image_column] + ([reader.context_column] if needs_context else [])
        files += [(str(r[c]), img_dir / str(r[c])) for r in records for c in names]
    return MonitoringBatch(
        source=csv_path,
        names=[str(record[reader.image_column]) for record in records],
        read=lambda i: reader.read(records[i]),
        fingerprint=_digest(files),
        labels=_labels(table, csv_path),
        face_visibility=_face_visibility(table),
    )


def open_batch(
    path: str | Path,
    *,
    img_dir: str | Path | None = None,
    needs_context: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> MonitoringBatch:
    """The batch at ``path``: a folder of crops or a CSV (see the module docstring).

    Nothing is decoded yet: rows are read by ``MonitoringBatch.read``.

    Raises
    ------
    FileNotFoundError
        No file or folder at ``path``, or no ``img_dir`` folder.
    ValueError
        An empty batch, a CSV without an image column, a labelled CSV without all 26
        emotion columns or with labels other than 0/1, a folder for a ``body_context``
        model: each named in one line.
    """
    path = Path(path)
    if img_dir is not None and not Path(img_dir).is_dir():
        raise FileNotFoundError(f"image folder not found: {img_dir}")
    if path.is_dir():
        return _open_folder(path, needs_context, max_pixels)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise ValueError(f"a batch is a folder of crops or a .csv file, got {path}")
        return _open_csv(path, Path(img_dir) if img_dir is not None else None, needs_context, max_pixels)
    raise FileNotFoundError(f"batch not found: {path} (a folder of crops or a CSV listing them)")
