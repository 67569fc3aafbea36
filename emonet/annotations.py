"""The EMOTIC annotation CSVs: validated loading, body boxes in the stored arrays' pixels,
and valence/arousal targets. Imports no torch, so pandas-only steps (normalization, face
visibility) stay light; the PyTorch ``Dataset`` lives in :mod:`emonet.data`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from emonet.affect import to_unit_range
from emonet.arrays import check_file_name
from emonet.io import read_csv
from emonet.schema import (
    AFFECT_COLUMNS,
    AFFECT_NORM_COLUMNS,
    ARRAY_COLUMNS,
    BOX_COLUMNS,
    CSV_COLUMNS,
    EMOTIONS,
    SCALE_MAX,
    SCALE_MIN,
    VAD_COLUMNS,
)

logger = logging.getLogger(__name__)


def load_annotations(csv_path: str | Path, *, strict: bool = False) -> pd.DataFrame:
    """Read and validate one split's annotation CSV.

    Parameters
    ----------
    csv_path : path to an ``annot_arrs_<split>.csv`` (or a CSV derived from one).
    strict : if False (default), rows whose valence, arousal or dominance is NaN or
        outside [1, 10] are dropped, counted and logged; if True they raise.

    Returns
    -------
    The validated rows with a fresh ``RangeIndex``. Extra columns are kept. The number
    of rejected rows is in ``df.attrs["rejected_rows"]`` and their reasons in
    ``df.attrs["rejected"]`` (a list of ``{"row": i, "reason": str}``).

    Raises
    ------
    FileNotFoundError : the CSV does not exist.
    ValueError : missing columns (all named), an empty CSV, emotion values other than
        0/1, unsafe array file names, or (with ``strict``) an out-of-range VAD value.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"annotation CSV not found: {csv_path}")
    try:
        df = read_csv(csv_path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"annotation CSV is empty: {csv_path}") from None
    missing = [column for column in CSV_COLUMNS if column not in df.columns]
    if missing:
        raise ValueError(f"{csv_path.name}: missing columns: {missing}")
    if df.empty:
        raise ValueError(f"annotation CSV has a header but no rows: {csv_path}")

    emotions = df[list(EMOTIONS)]
    bad_emotion = ~emotions.isin([0, 1])
    if bad_emotion.to_numpy().any():
        row, col = np.argwhere(bad_emotion.to_numpy())[0]
        raise ValueError(
            f"{csv_path.name}: emotion columns must hold 0 or 1; row {row} has "
            f"{EMOTIONS[col]}={emotions.iat[row, col]!r} ({int(bad_emotion.to_numpy().sum())} such cells)"
        )
    df[list(EMOTIONS)] = emotions.astype(np.float32)

    for column in ARRAY_COLUMNS:
        for row, name in df[column].items():
            try:
                check_file_name(name, column)
            except ValueError as err:
                raise ValueError(f"{csv_path.name}: row {row}: {err}") from None

    for column in VAD_COLUMNS + BOX_COLUMNS + ("Width", "Height"):
        df[column] = pd.to_numeric(df[column], errors="coerce")

    vad = df[list(VAD_COLUMNS)]
    bad_vad = vad.isna() | (vad < SCALE_MIN) | (vad > SCALE_MAX)
    rejected = []
    for row in np.flatnonzero(bad_vad.any(axis=1).to_numpy()):
        values = {c: vad.at[row, c] for c in VAD_COLUMNS if bad_vad.at[row, c]}
        rejected.append({"row": int(row), "reason": f"VAD outside [{SCALE_MIN:g}, {SCALE_MAX:g}] or NaN: {values}"})
    if rejected:
        if strict:
            raise ValueError(f"{csv_path.name}: {len(rejected)} rows with invalid VAD, first: {rejected[0]}")
        shown = "; ".join(f"row {r['row']}: {r['reason']}" for r in rejected[:5])
        more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
        logger.warning("%s: rejected %d rows: %s%s", csv_path.name, len(rejected), shown, more)
        df = df.drop(index=[r["row"] for r in rejected]).reset_index(drop=True)
        if df.empty:
            raise ValueError(f"{csv_path.name}: every row was rejected for invalid VAD")
    df.attrs["rejected_rows"] = len(rejected)
    df.attrs["rejected"] = rejected
    return df


def scaled_box(row: pd.Series | dict[str, Any], array_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The body box of a row in the pixel frame of its (possibly resized) full image.

    The CSV gives the box in original-photo pixels with ``Width``/``Height``; the array
    may be resized, and on some rows Width and Height are swapped. Resizing keeps the
    aspect ratio, so the sizes are swapped back when the swapped aspect matches the
    array's better, or when the box only fits the swapped size. The result is clamped
    to the array and is never empty.
    """
    height, width = int(array_shape[0]), int(array_shape[1])
    orig_w, orig_h = float(row["Width"]), float(row["Height"])
    x0, y0, x1, y1 = (float(row[c]) for c in BOX_COLUMNS)
    if orig_w > 0 and orig_h > 0:
        array_aspect = np.log(width / height)
        stated_error = abs(np.log(orig_w / orig_h) - array_aspect)
        swapped_error = abs(np.log(orig_h / orig_w) - array_aspect)
        fits_stated = x1 <= orig_w and y1 <= orig_h
        fits_swapped = x1 <= orig_h and y1 <= orig_w
        if (swapped_error < stated_error and fits_swapped) or (fits_swapped and not fits_stated):
            orig_w, orig_h = orig_h, orig_w
    sx = width / orig_w if orig_w > 0 else 1.0
    sy = height / orig_h if orig_h > 0 else 1.0
    left = int(np.clip(np.floor(min(x0, x1) * sx), 0, width - 1))
    top = int(np.clip(np.floor(min(y0, y1) * sy), 0, height - 1))
    right = int(np.clip(np.ceil(max(x0, x1) * sx), left + 1, width))
    bottom = int(np.clip(np.ceil(max(y0, y1) * sy), top + 1, height))
    return left, top, right, bottom


def affect_targets(df: pd.DataFrame) -> np.ndarray:
    """Valence and arousal in [-1, 1] for every row, shape ``(N, 2)``.

    Uses ``Valence_norm``/``Arousal_norm`` when the CSV was normalized, otherwise the
    default 1..10 scale bounds.
    """
    if all(column in df.columns for column in AFFECT_NORM_COLUMNS):
        values = df[list(AFFECT_NORM_COLUMNS)].to_numpy(dtype=np.float32)
    else:
        values = to_unit_range(df[list(AFFECT_COLUMNS)].to_numpy(dtype=np.float64))
    return np.clip(values, -1.0, 1.0).astype(np.float32)
