"""The face-visibility step of a split: a copy of its annotation CSV with a
``Face_Visibility`` column (scored by :mod:`emonet.data.face_visibility`), its counts, and a histogram."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from emonet.data.annotations import load_annotations
from emonet.data.face_visibility import score_crops
from emonet.plots import plot_visibility_histogram
from emonet.schema import FACE_VISIBILITY_COLUMN
from emonet.utils.io import check_not_inputs, ensure_writable_dir, read_csv, write_csv_atomic

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VisibilityResult:
    """Summary of :func:`add_face_visibility`.

    Attributes
    ----------
    out_csv : the CSV written (input columns plus ``Face_Visibility``).
    plot_path : the histogram PNG, or None.
    rows : rows in the output (every valid row; rows with invalid VAD are kept, their affect masked).
    scored : rows with a score (crop read).
    failed : rows whose crop was missing or unreadable (score NaN).
    with_face : rows with a face found (score > 0).
    full : rows with the whole face inside the crop (score == 100).
    mean : mean score over scored rows (NaN if none).
    rejected_rows : input rows dropped by ``load_annotations`` (only with ``invalid_affect="drop"``).
    """

    out_csv: Path
    plot_path: Path | None
    rows: int
    scored: int
    failed: int
    with_face: int
    full: int
    mean: float
    rejected_rows: int = 0

    def counts(self) -> dict[str, int | float]:
        """The counts and the mean alone, e.g. for MLflow metrics."""
        return {
            "rows": self.rows,
            "scored": self.scored,
            "failed": self.failed,
            "with_face": self.with_face,
            "full": self.full,
            "mean": self.mean,
        }

    def as_dict(self) -> dict[str, Any]:
        """Plain types (paths as strings), for JSON, MLflow or Prefect artifacts."""
        summary = dataclasses.asdict(self)
        summary["out_csv"] = str(self.out_csv)
        summary["plot_path"] = None if self.plot_path is None else str(self.plot_path)
        return summary


def write_visibility_csv(
    annotations_csv: str | Path, scores: Sequence[float] | np.ndarray, out_csv: str | Path
) -> VisibilityResult:
    """Write a copy of a split's CSV with ``Face_Visibility`` set to ``scores``.

    The CSV is read as it is, without validation: ``scores`` holds one value per data
    row in file order, as :func:`score_crops` returns for its ``Crop_name`` column
    (the flow scores shards of rows this way and validates rows later). The input is
    never modified; the copy keeps every column and is written atomically.

    Returns
    -------
    VisibilityResult
        Counts and mean of ``scores`` (``plot_path`` None, ``rejected_rows`` 0).

    Raises
    ------
    ValueError : ``out_csv`` is the input CSV (same path, a link or a hard link), or
        the number of scores differs from the number of rows.
    """
    annotations_csv, out_csv = Path(annotations_csv), Path(out_csv)
    check_not_inputs({"out_csv": out_csv}, {"annotations_csv": annotations_csv})
    df = read_csv(annotations_csv)
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (len(df),):
        raise ValueError(f"{annotations_csv}: {values.size} face-visibility scores for {len(df)} rows")
    return _write_scored(df, values, annotations_csv, out_csv)


def _write_scored(df: pd.DataFrame, scores: np.ndarray, annotations_csv: Path, out_csv: Path) -> VisibilityResult:
    """Add (or replace) the ``Face_Visibility`` column, write ``df`` and summarize."""
    if FACE_VISIBILITY_COLUMN in df.columns:
        logger.info("%s already has %s; replacing it", annotations_csv.name, FACE_VISIBILITY_COLUMN)
    df[FACE_VISIBILITY_COLUMN] = scores
    write_csv_atomic(df, out_csv)
    scored = scores[~np.isnan(scores)]
    result = VisibilityResult(
        out_csv=out_csv,
        plot_path=None,
        rows=len(scores),
        scored=len(scored),
        failed=len(scores) - len(scored),
        with_face=int(np.count_nonzero(scored > 0)),
        full=int(np.count_nonzero(scored == 100.0)),
        mean=float(scored.mean()) if len(scored) else math.nan,
        rejected_rows=int(df.attrs.get("rejected_rows", 0)),
    )
    logger.info(
        "face visibility of %d rows written to %s: %d with a face (%d whole), %d unreadable (NaN), mean %.1f",
        result.rows,
        out_csv,
        result.with_face,
        result.full,
        result.failed,
        result.mean,
    )
    return result


def add_face_visibility(
    annotations_csv: str | Path,
    img_dir: str | Path,
    out_csv: str | Path,
    workers: int | None = None,
    plot_path: str | Path | None = None,
    progress: bool = True,
    face_landmarker: str | Path | None = None,
) -> VisibilityResult:
    """Write a copy of an annotation CSV with a ``Face_Visibility`` column.

    The input CSV is never modified. Rows keep their order and every input column;
    ``Face_Visibility`` is appended (or replaced, if the input already has it).

    Parameters
    ----------
    annotations_csv : an ``annot_arrs_<split>.csv`` (or a CSV derived from one),
        read with :func:`emonet.data.annotations.load_annotations`.
    img_dir : folder with the ``.npy`` arrays named in ``Crop_name``.
    out_csv : where to write the copy (atomically).
    workers : worker processes for :func:`score_crops`; ``None`` for all cores.
    plot_path : if given, also save a histogram of the scores there (PNG).
    progress : show a progress bar.
    face_landmarker : the landmarker's model asset; None looks for it as
        :func:`emonet.data.face_visibility.face_landmarker_path` says.

    Returns
    -------
    VisibilityResult
        Counts (rows, scored, failed, with a face, full) and the mean score.

    Raises
    ------
    FileNotFoundError : the CSV, the image folder or the landmarker's model asset does not exist.
    ValueError : ``out_csv`` or ``plot_path`` is the input CSV, ``out_csv`` is
        ``plot_path``, the CSV is invalid (see ``load_annotations``), or no crop at
        all could be read (most likely a wrong ``img_dir``).
    """
    annotations_csv, img_dir, out_csv = Path(annotations_csv), Path(img_dir), Path(out_csv)
    plot_path = None if plot_path is None else Path(plot_path)
    check_not_inputs(
        {"out_csv": out_csv, "plot_path": plot_path}, {"annotations_csv": annotations_csv}, image_dir=img_dir
    )
    for output in (out_csv, plot_path):  # a read-only folder fails now, not after scoring
        if output is not None:
            ensure_writable_dir(output.parent)
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image array folder not found: {img_dir}")

    df = load_annotations(annotations_csv)
    scores = score_crops(
        img_dir, df["Crop_name"].tolist(), workers=workers, progress=progress, face_landmarker=face_landmarker
    )
    failed = int(np.isnan(scores).sum())
    if failed == len(scores):
        raise ValueError(
            f"none of the {failed} crops named in {annotations_csv.name} could be read from {img_dir} "
            "(see the warnings above); nothing written"
        )
    result = _write_scored(df, scores, annotations_csv, out_csv)
    if plot_path is not None:
        title = f"Face visibility: {annotations_csv.name}"
        result = dataclasses.replace(result, plot_path=plot_visibility_histogram(scores, plot_path, title=title))
    return result
