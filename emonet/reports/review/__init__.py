"""A visual review of what a trained model does on a labelled split: a grid of crops with
predicted vs true emotions, one detailed page per sample, split-wide heatmaps, and an
``index.html`` that shows them all without a server.

:mod:`~emonet.reports.review.selection` picks and orders the samples, :mod:`~emonet.reports.review.drawing`
draws them and :mod:`~emonet.reports.review.page` writes the HTML page; this module runs the three.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from emonet.data.annotations import load_annotations, raw_affect
from emonet.data.dataset import EmoticDataset
from emonet.data.normalize import AffectNormalizer
from emonet.inference.loading import ModelSource, describe_model, load_predictor
from emonet.inference.loop import Predictions
from emonet.metrics import (
    EVALUATION_KEYS,
    evaluate_predictions,
    finite_or_none,
    format_metric,
    mean_voc11_average_precision_score,
    metrics_by_visibility,
)
from emonet.metrics.bootstrap import BootstrapInterval
from emonet.reports.evaluation import SPLIT_REPORT_FILES, write_split_report
from emonet.reports.review.drawing import MAX_GRID_SAMPLES, page_name, plot_grid, plot_sample
from emonet.reports.review.page import write_index
from emonet.reports.review.selection import SORT_OPTIONS, build_table, check_sort_by, rank_samples
from emonet.schema import FACE_VISIBILITY_COLUMN, SCALE_MAX, SCALE_MIN
from emonet.utils.io import check_not_inputs, ensure_writable_dir, write_csv_atomic, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["SORT_OPTIONS", "rank_samples", "review_predictions", "review_predictions_with_visualization"]

GRID_FILE = "grid.png"
SAMPLES_DIR = "samples"
SUMMARY_FILE = "summary.json"
INDEX_FILE = "index.html"
REVIEW_CSV = "review.csv"
AFFECT_KEYS: tuple[str, ...] = ("mae_valence", "mae_arousal", "mae_valence_1_10", "mae_arousal_1_10")


def _check_options(sort_by: str, num_samples: int, detailed_samples: int, seed: int) -> None:
    check_sort_by(sort_by)
    for name, value, minimum in (("num_samples", num_samples, 1), ("detailed_samples", detailed_samples, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _output_files(out_dir: Path) -> list[Path]:
    return [out_dir / name for name in (GRID_FILE, SUMMARY_FILE, INDEX_FILE, REVIEW_CSV, *SPLIT_REPORT_FILES.values())]


def _renamed(function: str, new: str, value: Any, old: str, old_value: Any) -> Any:
    """``value``, or the value passed under its deprecated name ``old`` (with a FutureWarning)."""
    if old_value is None:
        return value
    if value is not None:
        raise TypeError(f"{function}() got both {new}= and its deprecated name {old}=: pass {new}= only")
    warnings.warn(f"{function}(): {old}= is deprecated, pass {new}= instead", FutureWarning, stacklevel=3)
    return old_value


def _required(function: str, **arguments: Any) -> None:
    missing = [name for name, value in arguments.items() if value is None]
    if missing:
        raise TypeError(f"{function}() missing required argument(s): {', '.join(map(repr, missing))}")


def review_predictions_with_visualization(
    model: ModelSource | None = None,
    test_csv_path: str | Path | None = None,
    img_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    num_samples: int = 20,
    detailed_samples: int = 20,
    sort_by: str = "random",
    seed: int = 0,
    *,
    device: str = "auto",
    batch_size: int = 64,
    normalizer: AffectNormalizer | str | Path | None = None,
    runtime: str = "auto",
    progress: bool = True,
    model_checkpoint_path: ModelSource | None = None,
    img_arrays_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Load a model once, predict a labelled split and write its visual review (:func:`review_predictions`).

    ``model``, ``test_csv_path``, ``img_dir`` and ``out_dir`` are required (by position or
    by name). The original project's names still work, with a ``FutureWarning``:
    ``model_checkpoint_path`` for ``model``, ``img_arrays_dir`` for ``img_dir`` and
    ``output_dir`` for ``out_dir`` (passing a parameter under both names is a TypeError);
    so does its README's call, ``review_predictions_with_visualization(model_checkpoint_path=...,
    test_csv_path=..., img_arrays_dir=..., output_dir=..., num_samples=20, detailed_samples=20,
    sort_by='random')``.

    Parameters
    ----------
    model : a checkpoint path, an MLflow model URI (``models:/emonet@champion``,
        ``runs:/<run_id>/model``) or a :class:`~emonet.inference.predictor.Predictor` (see
        :func:`emonet.inference.loading.load_predictor`). Its per-emotion thresholds decide the
        predicted sets, and its normalizer maps valence/arousal to the 1..10 scale.
    device, batch_size, normalizer, runtime : for loading ``model`` (ignored for a Predictor);
        ``runtime`` is ``"auto"`` (ONNX Runtime for a registered model with an export, on
        the CPU), ``"onnxruntime"`` or ``"torch"``.
    model_checkpoint_path, img_arrays_dir, output_dir : deprecated names of ``model``,
        ``img_dir`` and ``out_dir`` (the original project's).
    test_csv_path, img_dir, out_dir, num_samples, detailed_samples, sort_by, seed, progress :
        as for :func:`review_predictions`.

    Returns
    -------
    pandas.DataFrame
        The table of :func:`review_predictions`.

    Raises
    ------
    ValueError
        As :func:`review_predictions`, or a bad model file.
    FileNotFoundError
        As :func:`review_predictions`, or the checkpoint is missing.

    Examples
    --------
    >>> table = review_predictions_with_visualization(  # doctest: +SKIP
    ...     "models:/emonet@champion", "data/emotic/annots_arrs/annot_arrs_test.csv",
    ...     "data/emotic/img_arrs", "outputs/review", sort_by="worst")
    >>> table.loc[table["selected"], ["crop_name", "f1", "pred_emotions"]]  # doctest: +SKIP
    """
    name = "review_predictions_with_visualization"
    model = _renamed(name, "model", model, "model_checkpoint_path", model_checkpoint_path)
    img_dir = _renamed(name, "img_dir", img_dir, "img_arrays_dir", img_arrays_dir)
    out_dir = _renamed(name, "out_dir", out_dir, "output_dir", output_dir)
    _required(name, model=model, test_csv_path=test_csv_path, img_dir=img_dir, out_dir=out_dir)
    _check_options(sort_by, num_samples, detailed_samples, seed)
    test_csv_path, img_dir, out_dir = Path(test_csv_path), Path(img_dir), Path(out_dir)
    check_not_inputs(
        _output_files(out_dir),
        {"test_csv_path": test_csv_path, "model": model, "normalizer": normalizer},
        image_dir=img_dir,
    )
    ensure_writable_dir(out_dir)  # a read-only folder fails now, not after predicting
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image array folder not found: {img_dir}")
    annotations = load_annotations(test_csv_path)
    predictor = load_predictor(model, device=device, batch_size=batch_size, normalizer=normalizer, runtime=runtime)
    dataset = EmoticDataset(annotations, img_dir, predictor.transform, with_context=predictor.needs_context)
    return review_predictions(
        predictor.predict(dataset, progress=progress, desc="review: predict"),
        test_csv_path,
        img_dir,
        out_dir,
        thresholds=predictor.thresholds,
        normalizer=predictor.normalizer,
        model_name=describe_model(model),
        num_samples=num_samples,
        detailed_samples=detailed_samples,
        sort_by=sort_by,
        seed=seed,
        progress=progress,
        annotations=annotations,
    )


def review_predictions(
    predictions: Predictions,
    test_csv_path: str | Path,
    img_dir: str | Path,
    out_dir: str | Path,
    *,
    thresholds: np.ndarray,
    normalizer: AffectNormalizer,
    model_name: str,
    num_samples: int = 20,
    detailed_samples: int = 20,
    sort_by: str = "random",
    seed: int = 0,
    progress: bool = True,
    split_report: Mapping[str, Path] | None = None,
    intervals: Mapping[str, BootstrapInterval] | None = None,
    annotations: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Write a visual review of a model's predictions of a labelled split into ``out_dir``.

    No model is loaded: the predictions come from whoever predicted the split (e.g.
    :attr:`emonet.reports.evaluation.EvaluationReport.predictions`, or
    :func:`review_predictions_with_visualization`).

    Parameters
    ----------
    predictions : the model's predictions of the split, in row order.
    test_csv_path : a split CSV in the archive's format, raw (``annot_arrs_test.csv``)
        or normalized; read with :func:`emonet.data.annotations.load_annotations` (rows with
        invalid VAD are dropped and counted). True valence/arousal on [-1, 1] come
        from ``Valence_norm``/``Arousal_norm`` when present, else from the 1..10
        ``Valence``/``Arousal`` through ``normalizer``.
    img_dir : the archive's ``img_arrs`` folder (crops, and full images for the
        detailed pages; a missing full image only leaves its panel empty).
    out_dir : created if needed and never wiped: files of the same name are
        replaced, others (e.g. pages of an earlier review) stay.
    thresholds : the model's per-emotion thresholds ``(26,)``; they decide the predicted sets.
    normalizer : maps valence/arousal between [-1, 1] and the 1..10 scale.
    model_name : names the model in the page's title and ``summary.json``.
    num_samples : samples selected for the grid and the HTML table, the first of the
        ordering. Larger than the split: capped to the split's size with a logged
        warning. The grid image draws at most the first ``MAX_GRID_SAMPLES`` (100) of
        them; the table lists all.
    detailed_samples : detailed pages, the first of the same ordering (0 for none;
        capped to the split's size).
    sort_by : the ordering (see :func:`rank_samples`): ``"random"`` (seeded),
        ``"best"`` / ``"worst"`` (per-sample F1 of the predicted emotion set, see
        :func:`sample_f1_score`; ties by valence/arousal error, lower ranks better) or
        ``"confidence"`` (mean ``|prob - threshold|``, most confident first).
    seed : seeds the ``"random"`` order.
    progress : a tqdm bar over the detailed pages.
    split_report : the files of :func:`emonet.reports.evaluation.write_split_report` for these
        predictions (e.g. ``EvaluationReport.files``), which the page then links instead
        of writing them again; None writes them into ``out_dir``.
    intervals : bootstrap intervals of these predictions' metrics (e.g.
        ``EvaluationReport.intervals``: ``mAP``, ``mAP_voc11``, ...), shown beside them on
        the page and kept in ``summary.json``; None shows none.
    annotations : the rows of ``test_csv_path`` as :func:`emonet.data.annotations.load_annotations`
        returned them, when the caller already read them; None reads the CSV.

    Returns
    -------
    pandas.DataFrame
        One row per sample of the split, sorted by ``rank``: ``rank`` (1-based),
        ``selected`` (in the grid), ``detailed`` (has a page), ``csv_row``,
        ``crop_name``, ``arr_name``, ``filename``, ``prob_<Emotion>`` x 26,
        ``pred_emotions`` (by probability) and ``true_emotions`` (``;``-joined),
        ``n_pred``, ``n_true``, ``n_correct``, ``f1``, ``valence_pred``,
        ``arousal_pred``, ``valence_true``, ``arousal_true`` (on [-1, 1]), the same
        four with ``_1_10`` (1..10 scale), ``va_error`` (mean absolute on [-1, 1]),
        ``confidence``, ``Face_Visibility`` when the CSV has it, and
        ``sample_page`` (relative path of the page, or ""). ``df.attrs["summary"]``
        holds the content of ``summary.json``.

    Files written in ``out_dir`` (each atomically): ``grid.png``;
    ``samples/sample_<rank>_<crop stem>.png`` (rank zero-padded);
    ``true_vs_predicted.png``, ``cooccurrence_true.png``, ``cooccurrence_pred.png``,
    ``per_emotion_metrics.png``, ``affect_scatter.png`` and ``per_emotion.csv`` for
    the whole split; ``review.csv`` (the returned table); ``summary.json`` (counts,
    ``mAP`` and ``mAP_voc11``, F1 scores, mean per-sample F1, affect errors,
    ``sort_by``, ``seed``, files);
    ``index.html``, which shows everything through relative links and opens from
    disk without a server.

    Raises
    ------
    ValueError
        An unknown ``sort_by`` (options listed), ``num_samples < 1``,
        ``detailed_samples < 0``, a malformed CSV or image, or predictions that do
        not cover the split's rows in order.
    FileNotFoundError
        The CSV, the image folder or a crop is missing.
    """
    _check_options(sort_by, num_samples, detailed_samples, seed)
    test_csv_path, img_dir, out_dir = Path(test_csv_path), Path(img_dir), Path(out_dir)
    check_not_inputs(_output_files(out_dir), {"test_csv_path": test_csv_path}, image_dir=img_dir)
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image array folder not found: {img_dir}")
    if annotations is None:
        annotations = load_annotations(test_csv_path)
    num_samples, detailed = _checked_counts(predictions, annotations, test_csv_path, num_samples, detailed_samples)
    n = len(annotations)

    probs, affect_pred = predictions.emotion_prob, predictions.affect_pred
    table, y_true = build_table(
        annotations, probs, affect_pred, thresholds, normalizer, sort_by, int(seed), num_samples, detailed
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    title = (
        f"{model_name} on {test_csv_path.name}: {min(num_samples, MAX_GRID_SAMPLES)} of {n} samples, "
        f"sorted by {sort_by}" + (f" (seed {seed})" if sort_by == "random" else "")
    )
    plot_grid(table, img_dir, out_dir / GRID_FILE, title)
    files: dict[str, Any] = {"grid": GRID_FILE}
    files["samples"] = _write_pages(
        table, annotations, img_dir, out_dir, thresholds, normalizer, detailed, sort_by, progress
    )

    # The whole split's table and figures: an evaluation's, linked, or written here.
    true_norm = table.sort_index()[["valence_true", "arousal_true"]].to_numpy()
    if split_report is None:
        _, split_report = write_split_report(y_true, probs, thresholds, true_norm, affect_pred, out_dir)
    files.update({key: Path(os.path.relpath(path, out_dir)).as_posix() for key, path in split_report.items()})

    scores, by_visibility = _split_scores(
        table, annotations, y_true, probs, affect_pred, thresholds, normalizer, test_csv_path.name
    )
    ordered = table.sort_values("rank")
    summary: dict[str, Any] = {
        "model": model_name,
        "test_csv": str(test_csv_path),
        "img_dir": str(img_dir),
        "n_samples": n,
        "rows_rejected": int(annotations.attrs.get("rejected_rows", 0)),
        "rows_affect_masked": int(annotations.attrs.get("affect_masked_rows", 0)),
        "n_emotion": finite_or_none(scores["n_emotion"]),
        "n_affect": finite_or_none(scores["n_affect"]),
        "n_selected": int(num_samples),
        "n_detailed": detailed,
        "sort_by": sort_by,
        "seed": int(seed),
        "mAP": finite_or_none(scores["mAP"]),
        "mAP_voc11": finite_or_none(scores["mAP_voc11"]),
        "f1_macro": scores["f1_macro"],
        "f1_micro": scores["f1_micro"],
        "f1_samples": scores["f1_samples"],
        "mean_sample_f1": float(table["f1"].mean()),
        "selected_mean_sample_f1": float(ordered["f1"].head(num_samples).mean()),
        **{key: finite_or_none(scores[key]) for key in AFFECT_KEYS},
        "by_face_visibility": {key: finite_or_none(value) for key, value in by_visibility.items()},
        "intervals": {key: asdict(interval) for key, interval in (intervals or {}).items()},
        "selected": ordered["crop_name"].head(num_samples).tolist(),
        "files": {**files, "review_csv": REVIEW_CSV, "summary": SUMMARY_FILE, "index": INDEX_FILE},
    }
    write_csv_atomic(ordered, out_dir / REVIEW_CSV)
    write_json_atomic(summary, out_dir / SUMMARY_FILE)
    write_index(out_dir / INDEX_FILE, summary, table, FACE_VISIBILITY_COLUMN in table.columns)
    logger.info(
        "review of %d samples (%s) written to %s: mAP %s, mean per-sample F1 %.3f",
        n,
        sort_by,
        out_dir,
        format_metric(scores["mAP"], ".4f"),
        summary["mean_sample_f1"],
    )
    ordered = ordered.reset_index(drop=True)
    ordered.attrs["summary"] = summary
    return ordered


def _checked_counts(
    predictions: Predictions, annotations: pd.DataFrame, test_csv_path: Path, num_samples: int, detailed_samples: int
) -> tuple[int, int]:
    """``num_samples`` and ``detailed_samples`` capped to the split's size (with a warning
    for the first), once the predictions are known to cover the split's rows in order."""
    n = len(annotations)
    if len(predictions) != n or not np.array_equal(predictions.indices, np.arange(n)):
        raise ValueError(
            f"predictions cover {len(predictions)} rows, not the {n} rows of {test_csv_path.name} in order; "
            "pass the predictions of this split (e.g. EvaluationReport.predictions)"
        )
    if num_samples > n:
        logger.warning(
            "num_samples=%d exceeds the %d samples of %s; showing all %d", num_samples, n, test_csv_path.name, n
        )
        num_samples = n
    if num_samples > MAX_GRID_SAMPLES:
        logger.warning(
            "grid.png shows the first %d of the %d selected samples; index.html lists all",
            MAX_GRID_SAMPLES,
            num_samples,
        )
    return int(num_samples), min(int(detailed_samples), n)


def _write_pages(
    table: pd.DataFrame,
    annotations: pd.DataFrame,
    img_dir: Path,
    out_dir: Path,
    thresholds: np.ndarray,
    normalizer: AffectNormalizer,
    detailed: int,
    sort_by: str,
    progress: bool,
) -> list[str]:
    """The detailed pages, in rank order (only these rows' images are ever read for
    display); sets their ``sample_page`` in ``table`` and returns their relative paths."""
    low, high = float(min(normalizer.low)), float(max(normalizer.high))
    bounds = (min(low, SCALE_MIN), max(high, SCALE_MAX))
    digits = max(3, len(str(detailed)))
    has_visibility = FACE_VISIBILITY_COLUMN in table.columns
    pages = []
    for position, row in tqdm(
        list(table.sort_values("rank").head(detailed).iterrows()),
        desc="review: pages",
        unit="page",
        disable=not progress,
        dynamic_ncols=True,
    ):
        relative = f"{SAMPLES_DIR}/{page_name(int(row['rank']), row['crop_name'], digits)}"
        plot_sample(
            row,
            img_dir,
            annotations.loc[position],
            thresholds,
            bounds,
            len(table),
            sort_by,
            has_visibility,
            out_dir / relative,
        )
        table.at[position, "sample_page"] = relative
        pages.append(relative)
    return pages


def _split_scores(
    table: pd.DataFrame,
    annotations: pd.DataFrame,
    y_true: np.ndarray,
    probs: np.ndarray,
    affect_pred: np.ndarray,
    thresholds: np.ndarray,
    normalizer: AffectNormalizer,
    split_name: str,
) -> tuple[dict[str, float], dict[str, float]]:
    """The split's metrics (both APs, F1 scores, affect errors; NaN where no emotion has a
    positive sample) and, when the split has face visibility, the same per visibility group."""
    common = {
        "affect_true": table.sort_index()[["valence_true", "arousal_true"]].to_numpy(),
        "affect_pred": affect_pred,
        "thresholds": thresholds,
        "low": normalizer.low,
        "high": normalizer.high,
        "raw_true": raw_affect(annotations),
    }
    try:
        scores = evaluate_predictions(y_true, probs, **common)
        scores["mAP_voc11"] = mean_voc11_average_precision_score(y_true, probs)
    except ValueError as error:  # no emotion has a positive sample in this split
        logger.warning("metrics undefined on %s: %s", split_name, error)
        scores = dict.fromkeys((*EVALUATION_KEYS, "mAP_voc11"), float("nan"))
    if FACE_VISIBILITY_COLUMN not in table.columns:
        return scores, {}
    visibility = table.sort_index()[FACE_VISIBILITY_COLUMN]
    return scores, metrics_by_visibility(y_true, probs, visibility=visibility, **common)
