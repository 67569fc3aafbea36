"""Valence/arousal normalization from the EMOTIC 1..10 scale to [-1, 1], and back.

By default the bounds are the scale's own (1 and 10); fitted bounds come from the
train split only and are applied unchanged to val and test.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from emonet.affect import from_unit_range, to_unit_range
from emonet.data.annotations import load_annotations
from emonet.schema import (
    AFFECT_COLUMNS,
    AFFECT_NORM_COLUMNS,
    FACE_VISIBILITY_COLUMN,
    SCALE_MAX,
    SCALE_MIN,
    SPLITS,
    annotations_filename,
    normalized_filename,
)
from emonet.utils.io import check_not_inputs, write_csv_atomic, write_json_atomic

logger = logging.getLogger(__name__)

PARAMS_FILENAME = "normalization.json"


@dataclass(frozen=True)
class AffectNormalizer:
    """Min-max map of (valence, arousal) from ``[low, high]`` to ``[-1, 1]``, per dimension.

    ``x_norm = 2 * (x - low) / (high - low) - 1``; values outside the bounds are
    clipped to [-1, 1].

    Examples
    --------
    >>> norm = AffectNormalizer()
    >>> norm.transform(np.array([[1.0, 10.0]]))[0]
    array([[-1.,  1.]])
    """

    low: tuple[float, float] = (SCALE_MIN, SCALE_MIN)
    high: tuple[float, float] = (SCALE_MAX, SCALE_MAX)
    method: Literal["scale", "fit_on_train"] = "scale"
    columns: tuple[str, str] = field(default=AFFECT_COLUMNS)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for dim, lo, hi in zip(self.columns, self.low, self.high):
            if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
                raise ValueError(f"{dim}: normalization bounds must satisfy low < high, got low={lo}, high={hi}")

    @classmethod
    def fit(cls, train: pd.DataFrame) -> AffectNormalizer:
        """Bounds from the train split's observed minimum and maximum."""
        values = train[list(AFFECT_COLUMNS)].to_numpy(dtype=np.float64)
        low = tuple(float(v) for v in np.nanmin(values, axis=0))
        high = tuple(float(v) for v in np.nanmax(values, axis=0))
        return cls(low=low, high=high, method="fit_on_train")  # type: ignore[arg-type]

    def transform(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """Map ``(N, 2)`` values on the raw scale to [-1, 1]; returns them and the clipped count.

        NaN (a masked annotation) stays NaN and is not counted as clipped.
        """
        values = _check_pairs(values)
        norm = to_unit_range(values, self.low, self.high)
        outside = int(np.count_nonzero((norm < -1.0) | (norm > 1.0)))
        return np.clip(norm, -1.0, 1.0), outside

    def inverse_transform(self, norm: np.ndarray) -> np.ndarray:
        """Map ``(N, 2)`` model outputs in [-1, 1] back to the raw scale."""
        return from_unit_range(_check_pairs(norm), self.low, self.high)

    def to_dict(self) -> dict[str, object]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> AffectNormalizer:
        unknown = set(data) - {"low", "high", "method", "columns"}
        if unknown:
            raise ValueError(f"unknown normalization parameters: {sorted(unknown)}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> AffectNormalizer:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))


def load_normalizer(normalizer: AffectNormalizer | str | Path | None) -> AffectNormalizer:
    """An :class:`AffectNormalizer` as given, read from a ``normalization.json``, or, for
    None, the 1..10 scale's own bounds.

    Raises
    ------
    FileNotFoundError
        No file at the given path.
    ValueError
        The file holds unknown or invalid parameters.
    """
    if isinstance(normalizer, AffectNormalizer):
        return normalizer
    if normalizer is None:
        logger.info("no normalization given; mapping valence/arousal with the 1..10 scale bounds")
        return AffectNormalizer()
    path = Path(normalizer)
    if not path.is_file():
        raise FileNotFoundError(f"normalization file not found: {path}")
    return AffectNormalizer.load(path)


def _check_pairs(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != 2:
        raise ValueError(f"expected an (N, 2) array of valence and arousal, got shape {values.shape}")
    return values


@dataclass
class NormalizationResult:
    """Where the normalized splits went, the parameters used, and per-split row counts."""

    outputs: dict[str, Path]
    params_path: Path
    normalizer: AffectNormalizer
    counts: dict[str, dict[str, int]]


def normalize_frames(
    frames: dict[str, pd.DataFrame],
    min_visibility: float | None = None,
    fit_on_train: bool = False,
    filter_test_by_visibility: bool = False,
) -> tuple[dict[str, pd.DataFrame], AffectNormalizer, dict[str, dict[str, int]]]:
    """Filter by face visibility and add ``Valence_norm``/``Arousal_norm`` to validated splits.

    ``frames`` maps split names to frames from :func:`~emonet.data.annotations.load_annotations`
    and must include ``"train"``. Returns the new frames (inputs are not modified), the
    normalizer and per-split counts. Valence/arousal masked as NaN (invalid
    annotations) stay NaN. See :func:`normalize_dataset` for the options.
    """
    if "train" not in frames:
        raise ValueError(f"the splits must include 'train' (bounds are fitted on it), got {sorted(frames)}")
    if min_visibility is not None and not 0.0 <= min_visibility <= 100.0:
        raise ValueError(f"min_visibility must lie in [0, 100], got {min_visibility}")
    if filter_test_by_visibility and min_visibility is None:
        raise ValueError("filter_test_by_visibility needs min_visibility: there is no threshold to filter the test by")

    kept: dict[str, pd.DataFrame] = {}
    counts: dict[str, dict[str, int]] = {}
    for split, df in frames.items():
        rejected = int(df.attrs.get("rejected_rows", 0))
        split_counts = {
            "rows_read": len(df) + rejected,
            "rows_rejected": rejected,
            "rows_affect_masked": int(df.attrs.get("affect_masked_rows", 0)),
        }
        # The test split is the benchmark: filtering it changes what its mAP measures.
        if min_visibility is not None and (split != "test" or filter_test_by_visibility):
            if FACE_VISIBILITY_COLUMN not in df.columns:
                raise ValueError(
                    f"{split}: min_visibility needs a {FACE_VISIBILITY_COLUMN!r} column; run `emonet visibility` first"
                )
            keep = df[FACE_VISIBILITY_COLUMN] >= min_visibility  # NaN compares False: dropped
            split_counts["rows_below_visibility"] = int((~keep).sum())
            df = df[keep].reset_index(drop=True)
            if df.empty:
                raise ValueError(f"{split}: no row has {FACE_VISIBILITY_COLUMN} >= {min_visibility}")
        kept[split] = df
        counts[split] = split_counts

    normalizer = AffectNormalizer.fit(kept["train"]) if fit_on_train else AffectNormalizer()
    for split, df in kept.items():
        norm, clipped = normalizer.transform(df[list(AFFECT_COLUMNS)].to_numpy())
        df = df.copy()
        df[list(AFFECT_NORM_COLUMNS)] = norm
        kept[split] = df
        counts[split].update(rows_written=len(df), values_clipped=clipped)
        if clipped:
            logger.warning(
                "%s: %d valence/arousal values fell outside the train bounds and were clipped",
                split,
                clipped,
            )
    return kept, normalizer, counts


def write_normalized(
    frames: dict[str, pd.DataFrame], normalizer: AffectNormalizer, out_dir: str | Path
) -> tuple[dict[str, Path], Path]:
    """Write ``normalized_dataset_<split>.csv`` and ``normalization.json`` atomically."""
    out_dir = Path(out_dir)
    outputs = {}
    for split, df in frames.items():
        outputs[split] = write_csv_atomic(df, out_dir / normalized_filename(split))
        logger.info("%s: wrote %d rows to %s", split, len(df), outputs[split])
    return outputs, normalizer.save(out_dir / PARAMS_FILENAME)


def normalize_dataset(
    annotations_dir: str | Path,
    out_dir: str | Path,
    min_visibility: float | None = None,
    fit_on_train: bool = False,
    splits: tuple[str, ...] = SPLITS,
    filter_test_by_visibility: bool = False,
) -> NormalizationResult:
    """Add ``Valence_norm``/``Arousal_norm`` to each split and write ``normalized_dataset_<split>.csv``.

    Parameters
    ----------
    annotations_dir : folder with ``annot_arrs_<split>.csv`` for every split (the
        archive's ``annots_arrs`` or the output of the visibility step).
    out_dir : where the normalized CSVs and ``normalization.json`` are written
        (atomically); the inputs are never modified.
    min_visibility : keep only rows whose ``Face_Visibility`` is at least this value
        (rows without a score are dropped too) in every split but test. ``None`` keeps
        all rows.
    fit_on_train : take the bounds from the train split (after filtering) instead of
        the scale's 1..10; val and test are mapped with the same bounds, and their
        values outside are clipped and counted.
    filter_test_by_visibility : filter the test split by ``min_visibility`` too.
        Off by default: the filtered test split is no longer the
        EMOTIC test split, so its mAP cannot be compared with published results or
        with runs filtered at another threshold (the per-visibility metrics of the
        evaluation show how faces matter without that cost).

    Rows with an invalid valence/arousal/dominance are kept with NaN there (see
    :func:`~emonet.data.annotations.load_annotations`) and counted as
    ``rows_affect_masked``; their normalized values are NaN too.
    """
    annotations_dir, out_dir = Path(annotations_dir), Path(out_dir)
    check_not_inputs(
        [out_dir / normalized_filename(split) for split in splits] + [out_dir / PARAMS_FILENAME],
        {f"{split} annotations": annotations_dir / annotations_filename(split) for split in splits},
    )
    frames = {split: load_annotations(annotations_dir / annotations_filename(split)) for split in splits}
    frames, normalizer, counts = normalize_frames(
        frames,
        min_visibility=min_visibility,
        fit_on_train=fit_on_train,
        filter_test_by_visibility=filter_test_by_visibility,
    )
    outputs, params_path = write_normalized(frames, normalizer, out_dir)
    return NormalizationResult(outputs=outputs, params_path=params_path, normalizer=normalizer, counts=counts)
