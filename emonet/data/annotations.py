"""The EMOTIC annotation CSVs: validated loading, body boxes in the stored arrays' pixels,
and valence/arousal targets. Imports no torch, so pandas-only steps (normalization, face
visibility) stay light; the PyTorch ``Dataset`` lives in :mod:`emonet.data.dataset`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from emonet.affect import to_unit_range
from emonet.data.arrays import check_file_name
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
from emonet.utils.io import read_csv

logger = logging.getLogger(__name__)


# What load_annotations does with a row whose valence, arousal or dominance is invalid.
INVALID_AFFECT_ACTIONS: tuple[str, ...] = ("mask", "drop")

# What load_annotations does with rows that repeat a crop, or a person box in one image.
DUPLICATE_ACTIONS: tuple[str, ...] = ("refuse", "warn", "allow")

# The switch of load_annotations' duplicates check for commands and flows (refuse, warn, allow).
DUPLICATES_ENV = "EMONET_DUPLICATES"
# Rows are duplicates when they share one of these keys; they agree when these columns do.
DUPLICATE_KEYS: tuple[tuple[str, ...], ...] = (("Crop_name",), ("Arr_name", *BOX_COLUMNS))
LABEL_COLUMNS: tuple[str, ...] = EMOTIONS + VAD_COLUMNS

# Duplicate groups written out in full in a message; the rest are counted.
_SHOWN_GROUPS = 5


def load_annotations(
    csv_path: str | Path, *, strict: bool = False, invalid_affect: str = "mask", duplicates: str | None = None
) -> pd.DataFrame:
    """Read and validate one split's annotation CSV.

    A row whose valence, arousal or dominance is NaN or outside [1, 10] still has valid
    emotion labels; one rule serves every split. By default (``"mask"``) the row is
    kept and only its invalid values become NaN: it counts in the emotion loss and
    metrics, while the affect loss (:class:`~emonet.training.losses.EmoNetLoss`) and errors
    (:func:`~emonet.metrics.affect_errors`) skip it. Dropping such rows, as
    ``"drop"`` does, would remove test rows from the benchmark mAP without a trace in
    the metric.

    Parameters
    ----------
    csv_path : path to an ``annot_arrs_<split>.csv`` (or a CSV derived from one).
    strict : raise on the first split with an invalid VAD value instead.
    invalid_affect : ``"mask"`` (default) or ``"drop"``; rows handled either way are
        counted and logged.
    duplicates : what to do with rows that repeat a ``Crop_name``, or an ``Arr_name``
        with the same body box (``X_min, Y_min, X_max, Y_max``): the same person twice.
        ``"refuse"`` (default) raises when such rows disagree on any emotion label or
        on valence, arousal or dominance (contradictory duplicates), and logs a warning
        for identical ones; ``"warn"`` logs a warning for both kinds and loads them;
        ``"allow"`` loads them without a warning (no check at all). Duplicate
        rows are never dropped: each row keeps its own crop. None (default) reads the
        environment variable ``EMONET_DUPLICATES`` (one of the three; unset means
        ``"refuse"``), the switch for every command and flow that reads annotations.

    Returns
    -------
    The validated rows with a fresh ``RangeIndex``. Extra columns are kept. In
    ``df.attrs``: ``"rejected_rows"`` (count) and ``"rejected"`` (a list of ``{"row":
    i, "reason": str}``, CSV row numbers) for dropped rows; ``"affect_masked_rows"``
    and ``"affect_masked"`` likewise for kept rows whose invalid values were set to NaN;
    ``"duplicate_rows"`` (rows that repeat an earlier row's crop or person box, counted
    once each), ``"contradictory_duplicate_rows"`` (those of them whose labels differ)
    and ``"duplicates"`` (a list of ``{"key": columns, "value": ..., "rows": [i, ...],
    "differing": [columns]}``, one per group of rows sharing a key, CSV row numbers).
    Row numbers everywhere are 0-based data rows (the header is not counted), as pandas
    numbers them; these are computed with every ``duplicates`` setting.

    Raises
    ------
    FileNotFoundError : the CSV does not exist.
    ValueError : missing columns (all named), an empty CSV, emotion values other than
        0/1, unsafe array file names, an unknown ``invalid_affect`` or ``duplicates``,
        (with ``strict``) an out-of-range VAD value, or (with ``duplicates="refuse"``)
        contradictory duplicate rows: the message names the CSV, the shared key's
        columns and value, the row numbers and the columns that differ.
    """
    if invalid_affect not in INVALID_AFFECT_ACTIONS:
        raise ValueError(f"invalid_affect must be one of {list(INVALID_AFFECT_ACTIONS)}, got {invalid_affect!r}")
    if duplicates is None:
        duplicates = os.environ.get(DUPLICATES_ENV) or "refuse"
        if duplicates not in DUPLICATE_ACTIONS:
            raise ValueError(f"{DUPLICATES_ENV} must be one of {list(DUPLICATE_ACTIONS)}, got {duplicates!r}")
    if duplicates not in DUPLICATE_ACTIONS:
        raise ValueError(f"duplicates must be one of {list(DUPLICATE_ACTIONS)}, got {duplicates!r}")
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
        # The cell as a Python value: NumPy 2's repr of a scalar reads np.float64(0.5).
        value = np.asarray(emotions.iat[row, col]).tolist()
        raise ValueError(
            f"{csv_path.name}: emotion columns must hold 0 or 1; row {row} has "
            f"{EMOTIONS[col]}={value!r} ({int(bad_emotion.to_numpy().sum())} such cells)"
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

    # Before any row is dropped, so the row numbers are the CSV's.
    duplicate_attrs = _check_duplicates(df, csv_path.name, duplicates)

    vad = df[list(VAD_COLUMNS)]
    bad_vad = vad.isna() | (vad < SCALE_MIN) | (vad > SCALE_MAX)
    invalid = []
    for row in np.flatnonzero(bad_vad.any(axis=1).to_numpy()):
        values = {c: float(vad.at[row, c]) for c in VAD_COLUMNS if bad_vad.at[row, c]}
        invalid.append({"row": int(row), "reason": f"VAD outside [{SCALE_MIN:g}, {SCALE_MAX:g}] or NaN: {values}"})
    if invalid and strict:
        raise ValueError(f"{csv_path.name}: {len(invalid)} rows with invalid VAD, first: {invalid[0]}")
    if invalid:
        shown = "; ".join(f"row {r['row']}: {r['reason']}" for r in invalid[:5])
        more = f" (and {len(invalid) - 5} more)" if len(invalid) > 5 else ""
        action = "kept with their invalid VAD values masked (NaN)" if invalid_affect == "mask" else "dropped"
        logger.warning("%s: %d rows %s: %s%s", csv_path.name, len(invalid), action, shown, more)
    rejected: list[dict[str, Any]] = []
    masked: list[dict[str, Any]] = []
    if invalid_affect == "mask":
        # Out-of-range values become NaN too, so every consumer has one test: finite or not.
        df[list(VAD_COLUMNS)] = vad.mask(bad_vad)
        masked = invalid
    else:
        rejected = invalid
        df = df.drop(index=[r["row"] for r in rejected]).reset_index(drop=True)
        if df.empty:
            raise ValueError(f"{csv_path.name}: every row was rejected for invalid VAD")
    df.attrs["rejected_rows"] = len(rejected)
    df.attrs["rejected"] = rejected
    df.attrs["affect_masked_rows"] = len(masked)
    df.attrs["affect_masked"] = masked
    df.attrs.update(duplicate_attrs)
    return df


def find_duplicates(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Groups of rows of ``df`` that describe the same person: one per shared key of
    :data:`DUPLICATE_KEYS` (the same ``Crop_name``, or the same ``Arr_name`` and body
    box), each ``{"key": columns, "value": the shared values, "rows": row labels,
    "differing": the columns of :data:`LABEL_COLUMNS` whose values are not all equal}``.

    Rows found under both keys (a copied row) form one group, under the first key.
    Rows whose key holds a missing value are never matched. Values are compared as
    read (NaN equals NaN), so ``"differing"`` is empty for identical duplicates.
    """
    groups: list[dict[str, Any]] = []
    seen: set[tuple[int, ...]] = set()  # a copied row repeats both keys: report it once
    labels = df[list(LABEL_COLUMNS)]
    for key in DUPLICATE_KEYS:
        keys = df[list(key)]
        repeated = keys.duplicated(keep=False) & keys.notna().all(axis=1)
        if not repeated.any():
            continue
        for value, rows in keys[repeated].groupby(list(key), sort=False).groups.items():
            if tuple(rows) in seen:
                continue
            seen.add(tuple(rows))
            group_labels = labels.loc[rows]
            differing = [c for c in LABEL_COLUMNS if group_labels[c].nunique(dropna=False) > 1]
            shown = value if isinstance(value, tuple) else (value,)
            groups.append(
                {
                    "key": list(key),
                    "value": [np.asarray(v).tolist() for v in shown],
                    "rows": [int(r) for r in rows],
                    "differing": differing,
                }
            )
    return groups


def _describe_group(group: dict[str, Any]) -> str:
    value = ", ".join(f"{c}={v!r}" for c, v in zip(group["key"], group["value"]))
    rows = ", ".join(str(r) for r in group["rows"])
    differ = f" differ in {', '.join(group['differing'])}" if group["differing"] else " are identical"
    return f"rows {rows} ({value}){differ}"


def _describe_groups(groups: list[dict[str, Any]]) -> str:
    text = "; ".join(_describe_group(g) for g in groups[:_SHOWN_GROUPS])
    return text + (f" (and {len(groups) - _SHOWN_GROUPS} more groups)" if len(groups) > _SHOWN_GROUPS else "")


def _check_duplicates(df: pd.DataFrame, csv_name: str, action: str) -> dict[str, Any]:
    """Find duplicate rows, raise or log as ``action`` says, and return them as ``df.attrs`` entries."""
    groups = find_duplicates(df)
    repeats: set[int] = set()
    contradictory_repeats: set[int] = set()
    for group in groups:
        later = group["rows"][1:]
        repeats.update(later)
        if group["differing"]:
            contradictory_repeats.update(later)
    attrs = {
        "duplicate_rows": len(repeats),
        "contradictory_duplicate_rows": len(contradictory_repeats),
        "duplicates": groups,
    }
    if not groups or action == "allow":
        if groups:
            logger.debug("%s: %d duplicate rows allowed: %s", csv_name, len(repeats), _describe_groups(groups))
        return attrs
    contradictory = [g for g in groups if g["differing"]]
    identical = [g for g in groups if not g["differing"]]
    if contradictory and action == "refuse":
        raise ValueError(
            f"{csv_name}: {len(contradictory_repeats)} rows repeat the crop or person box of another row with "
            f"different labels (0-based data rows): {_describe_groups(contradictory)}; fix the CSV, or load it "
            f"with duplicates='warn' (or {DUPLICATES_ENV}=warn) to keep every row"
        )
    if contradictory:
        logger.warning(
            "%s: %d rows repeat the crop or person box of another row with different labels, kept "
            "(0-based data rows): %s",
            csv_name,
            len(contradictory_repeats),
            _describe_groups(contradictory),
        )
    if identical:
        identical_repeats = {r for g in identical for r in g["rows"][1:]}
        logger.warning(
            "%s: %d rows repeat the crop or person box and the labels of another row, kept (0-based data rows): %s",
            csv_name,
            len(identical_repeats),
            _describe_groups(identical),
        )
    return attrs


# Annotated boxes overflow the photo they were drawn on by a pixel or two (annotation
# tools snap to the border); such a box still "fits" when only the box can decide.
BOX_FIT_TOLERANCE_PX = 3.0


def _stated_size_is_swapped(
    orig_w: float, orig_h: float, box_right: float, box_bottom: float, height: int, width: int
) -> bool:
    """Whether a row's ``Width``/``Height`` are swapped, judged against its stored array.

    Resizing keeps the aspect ratio, so the aspect decides first: the stated order is
    kept or swapped, whichever matches the array's aspect better. Only when the two
    orders match equally well (a near-square photo, or an array resized to a square)
    does the box decide: swap when the box fits the swapped size but not the stated
    one, both within :data:`BOX_FIT_TOLERANCE_PX`. So a correctly stated portrait photo
    whose box overflows its width by 2 px is not swapped.
    """
    array_aspect = np.log(width / height)
    stated_error = abs(np.log(orig_w / orig_h) - array_aspect)
    swapped_error = abs(np.log(orig_h / orig_w) - array_aspect)
    # Resizing to whole pixels moves each side by under a pixel, so the stored aspect
    # (in log units) is off by at most 1/height + 1/width: a larger difference between
    # the two orders cannot come from rounding, and the aspect decides; a smaller one
    # leaves them tied.
    if abs(stated_error - swapped_error) > 1.0 / height + 1.0 / width:
        return swapped_error < stated_error
    slack = BOX_FIT_TOLERANCE_PX
    fits_stated = box_right <= orig_w + slack and box_bottom <= orig_h + slack
    fits_swapped = box_right <= orig_h + slack and box_bottom <= orig_w + slack
    return fits_swapped and not fits_stated


def scaled_box(row: pd.Series | dict[str, Any], array_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The body box of a row in the pixel frame of its (possibly resized) full image.

    The CSV gives the box in original-photo pixels with ``Width``/``Height``; the array
    may be resized, and on some rows Width and Height are swapped. The sizes are
    swapped back when the swapped aspect ratio matches the array's clearly better; the
    box decides only between near-square orders (see :func:`_stated_size_is_swapped`).
    The result is clamped to the array and is never empty.
    """
    height, width = int(array_shape[0]), int(array_shape[1])
    orig_w, orig_h = float(row["Width"]), float(row["Height"])
    x0, y0, x1, y1 = (float(row[c]) for c in BOX_COLUMNS)
    if orig_w > 0 and orig_h > 0 and _stated_size_is_swapped(orig_w, orig_h, max(x0, x1), max(y0, y1), height, width):
        orig_w, orig_h = orig_h, orig_w
    sx = width / orig_w if orig_w > 0 else 1.0
    sy = height / orig_h if orig_h > 0 else 1.0
    left = int(np.clip(np.floor(min(x0, x1) * sx), 0, width - 1))
    top = int(np.clip(np.floor(min(y0, y1) * sy), 0, height - 1))
    right = int(np.clip(np.ceil(max(x0, x1) * sx), left + 1, width))
    bottom = int(np.clip(np.ceil(max(y0, y1) * sy), top + 1, height))
    return left, top, right, bottom


def affect_targets(df: pd.DataFrame) -> np.ndarray:
    """Valence and arousal in [-1, 1] for every row, shape ``(N, 2)``; NaN where masked.

    Uses ``Valence_norm``/``Arousal_norm`` when the CSV was normalized, otherwise the
    default 1..10 scale bounds. A row whose raw valence or arousal is missing (masked by
    :func:`load_annotations`) gets NaN for both, so "rows with an affect target" is one
    count for the loss and the metrics.
    """
    raw = raw_affect(df)
    if all(column in df.columns for column in AFFECT_NORM_COLUMNS):
        values = df[list(AFFECT_NORM_COLUMNS)].to_numpy(dtype=np.float64)
    else:
        values = to_unit_range(raw)
    values = np.clip(values, -1.0, 1.0)
    values[~np.isfinite(raw).all(axis=1) | ~np.isfinite(values).all(axis=1)] = np.nan
    return values.astype(np.float32)


def raw_affect(df: pd.DataFrame) -> np.ndarray:
    """Valence and arousal as annotated, on the 1..10 scale, shape ``(N, 2)`` float64.

    Neither normalized nor clipped: the 1..10 errors are computed against these (see
    :func:`emonet.metrics.affect_errors`). NaN where :func:`load_annotations` masked.
    """
    return df[list(AFFECT_COLUMNS)].to_numpy(dtype=np.float64)
