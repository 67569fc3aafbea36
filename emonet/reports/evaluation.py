"""Evaluate a trained checkpoint on a labelled split: the EMOTIC metrics, the
per-emotion table, the 26 x 26 matrices and their figures, written to one folder."""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from emonet.config import EmoNetConfig
from emonet.data.annotations import raw_affect
from emonet.data.dataset import EmoticDataset
from emonet.data.normalize import AffectNormalizer, load_normalizer
from emonet.inference.loop import Predictions, eval_transform, predict_split
from emonet.metrics import (
    binarize,
    cooccurrence_matrix,
    evaluate_predictions,
    mean_average_precision_score,
    mean_voc11_average_precision_score,
    metrics_by_visibility,
    per_emotion_report,
    true_vs_predicted_matrix,
)
from emonet.metrics.bootstrap import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, BootstrapInterval, check_bootstrap_settings
from emonet.models.checkpoint import load_checkpoint
from emonet.models.devices import resolve_device
from emonet.plots import (
    plot_affect_scatter,
    plot_cooccurrence,
    plot_learning_curves,
    plot_per_emotion_metrics,
    plot_true_vs_predicted,
)
from emonet.reports.benchmark import BENCHMARK_FILES, BenchmarkTable, benchmark_table, write_benchmark
from emonet.schema import EMOTIONS, FACE_VISIBILITY_COLUMN
from emonet.utils.io import check_not_inputs, ensure_writable_dir, write_csv_atomic, write_json_atomic

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


# What write_split_report writes, by name; the review shows the same files.
SPLIT_REPORT_FILES: dict[str, str] = {
    "per_emotion_csv": "per_emotion.csv",
    "true_vs_predicted": "true_vs_predicted.png",
    "cooccurrence_true": "cooccurrence_true.png",
    "cooccurrence_pred": "cooccurrence_pred.png",
    "per_emotion_metrics": "per_emotion_metrics.png",
    "affect_scatter": "affect_scatter.png",
}


@dataclass(frozen=True, eq=False)
class SplitPredictions:
    """A checkpoint's predictions on a second labelled split (validation), scored.

    What a promotion compares on (:func:`emonet.tracking.registry.promote_model`): the rows'
    probabilities, not only their mAP, so that a paired bootstrap can resample them.
    """

    predictions: Predictions  # indices are row positions in the split's CSV
    split_id: str  # split_fingerprint of the split
    metrics: dict[str, float]  # mAP (scikit-learn) and mAP_voc11 (11-point) on the split


@dataclass(frozen=True, eq=False)
class EvaluationReport:
    """Everything :func:`evaluate_checkpoint` computed and where it wrote it.

    It carries what the review and the registration of the same checkpoint need (the
    predictions, thresholds, normalizer and the checkpoint's config), so that neither
    loads the checkpoint again.
    """

    metrics: dict[str, float]  # with the per-emotion thresholds tuned on validation
    metrics_at_half: dict[str, float]  # with a fixed 0.5 threshold
    per_emotion: pd.DataFrame  # AP, precision, recall, F1, support, threshold per emotion
    thresholds: np.ndarray  # (26,)
    predictions: Predictions
    config: EmoNetConfig  # the checkpoint's own config (variant, backbone, ...)
    normalizer: AffectNormalizer  # maps valence/arousal to the 1..10 scale
    split_id: str  # split_fingerprint of the rows evaluated
    # Per-emotion AP under both protocols, both mAPs and the affect errors with their
    # bootstrap intervals (written as benchmark.md / benchmark.csv)
    benchmark: BenchmarkTable
    # The same checkpoint's predictions on the validation split, when one was given
    validation: SplitPredictions | None = None
    # mAP, macro F1 and 1..10 errors per face-visibility group (emonet.metrics.metrics_by_visibility);
    # empty when the split has no Face_Visibility column
    by_visibility: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def intervals(self) -> dict[str, BootstrapInterval]:
        """Bootstrap intervals of ``mAP``, ``mAP_voc11`` and the 1..10 affect errors on the split."""
        return self.benchmark.intervals


def _check_outputs(
    checkpoint: str | Path,
    annotations: pd.DataFrame | str | Path,
    img_dir: str | Path,
    out_dir: Path,
    normalizer: AffectNormalizer | str | Path | None,
    validation: pd.DataFrame | str | Path | None,
    n_resamples: int,
) -> None:
    """Refuse, before any work, outputs that would overwrite an input, an unwritable
    ``out_dir`` and bad bootstrap settings."""
    written = (*SPLIT_REPORT_FILES.values(), *BENCHMARK_FILES.values(), "metrics.json", "learning_curves.png")
    check_not_inputs(
        [out_dir / name for name in written],
        {"checkpoint": checkpoint, "annotations": annotations, "normalizer": normalizer, "validation": validation},
        image_dir=img_dir,
    )
    ensure_writable_dir(out_dir)  # a read-only folder fails now, not after predicting
    check_bootstrap_settings(n_resamples, DEFAULT_CONFIDENCE)  # before any work, not after predicting


def _predict_rows(
    model: torch.nn.Module,
    config: EmoNetConfig,
    img_dir: str | Path,
    rows: pd.DataFrame | str | Path,
    desc: str,
    *,
    device: torch.device,
    batch_size: int | None,
    num_workers: int,
    progress: bool,
) -> tuple[EmoticDataset, Predictions]:
    """The dataset of a labelled split (a CSV path or its rows) and the model's predictions on it."""
    dataset = EmoticDataset(rows, img_dir, transform=eval_transform(config), with_context=config.model.uses_context)
    return dataset, predict_split(
        model,
        dataset,
        batch_size=batch_size or config.train.batch_size,
        num_workers=num_workers,
        device=device,
        amp=config.train.amp,
        progress=progress,
        desc=desc,
    )


def _split_metrics(
    split: pd.DataFrame,
    raw_true: np.ndarray,
    predictions: Predictions,
    thresholds: np.ndarray,
    normalizer: AffectNormalizer,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """The metrics of the evaluated rows ``split`` (``raw_true``: their annotated 1..10
    affect): with the tuned thresholds, at a fixed 0.5, and by face visibility (empty
    without a Face_Visibility column)."""
    common = {
        "low": normalizer.low,
        "high": normalizer.high,
        "raw_true": raw_true,
        "affect_true": predictions.affect_true,
        "affect_pred": predictions.affect_pred,
    }
    y_true, y_prob = predictions.emotions_true, predictions.emotion_prob
    # mAP_voc11 does not depend on the thresholds; both dicts carry it, as they carry mAP.
    voc11 = {"mAP_voc11": mean_voc11_average_precision_score(y_true, y_prob)}
    metrics = {**evaluate_predictions(y_true, y_prob, thresholds=thresholds, **common), **voc11}
    metrics_at_half = {**evaluate_predictions(y_true, y_prob, thresholds=0.5, **common), **voc11}
    by_visibility: dict[str, float] = {}
    if FACE_VISIBILITY_COLUMN in split.columns:
        visibility = pd.to_numeric(split[FACE_VISIBILITY_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
        by_visibility = metrics_by_visibility(y_true, y_prob, visibility=visibility, thresholds=thresholds, **common)
    return metrics, metrics_at_half, by_visibility


def _benchmark(
    raw_true: np.ndarray,
    predictions: Predictions,
    normalizer: AffectNormalizer,
    model_name: str,
    n_resamples: int,
    seed: int,
) -> BenchmarkTable:
    """The benchmark table of the evaluated rows, with its bootstrap intervals."""
    # The bootstrap measures the 1..10 errors as the metrics do: against the annotated
    # values, over the rows whose target is not masked.
    affect_1_10 = np.where(np.isfinite(predictions.affect_true).all(axis=1)[:, None], raw_true, np.nan)
    return benchmark_table(
        predictions.emotions_true,
        predictions.emotion_prob,
        affect_1_10,
        normalizer.inverse_transform(predictions.affect_pred),
        model=model_name,
        n_resamples=n_resamples,
        seed=seed,
    )


def _score_validation(val_dataset: EmoticDataset, val_predictions: Predictions) -> SplitPredictions:
    """The validation split's predictions with its fingerprint and both mAPs."""
    val_true, val_prob = val_predictions.emotions_true, val_predictions.emotion_prob
    return SplitPredictions(
        predictions=val_predictions,
        split_id=split_fingerprint(val_dataset.annotations),
        metrics={
            "mAP": mean_average_precision_score(val_true, val_prob),
            "mAP_voc11": mean_voc11_average_precision_score(val_true, val_prob),
            "n_emotion": float(len(val_predictions)),
        },
    )


def _log_evaluation(checkpoint: str | Path, metrics: dict[str, float], ci: BootstrapInterval) -> None:
    """One log line: the checkpoint's mAP with its interval ``ci``, mAP_voc11 and the rows scored."""
    logger.info(
        "evaluated %s: mAP %.4f [%.4f, %.4f], mAP_voc11 %.4f on %d rows, affect errors on %d",
        checkpoint,
        metrics["mAP"],
        ci.low,
        ci.high,
        metrics["mAP_voc11"],
        int(metrics["n_emotion"]),
        int(metrics["n_affect"]),
    )


def evaluate_checkpoint(
    checkpoint: str | Path,
    annotations: pd.DataFrame | str | Path,
    img_dir: str | Path,
    out_dir: str | Path,
    normalizer: AffectNormalizer | str | Path | None = None,
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    device: str = "auto",
    progress: bool = True,
    validation: pd.DataFrame | str | Path | None = None,
    model_name: str | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
) -> EvaluationReport:
    """Score a ``best.pt`` on a labelled split and write its report into ``out_dir``.

    The per-emotion thresholds stored in the checkpoint (tuned on validation) decide
    the predicted sets; metrics at a fixed 0.5 are reported too. Valence/arousal errors
    on the 1..10 scale use ``normalizer`` (a ``normalization.json`` or an
    :class:`AffectNormalizer`; default: the 1..10 scale bounds).

    Both APs are reported: ``mAP`` (scikit-learn's, the project's history) and
    ``mAP_voc11`` (the EMOTIC authors' 11-point AP), per emotion too. A seeded bootstrap
    over the rows (``n_resamples``, ``bootstrap_seed``; see
    :func:`emonet.metrics.bootstrap.bootstrap_intervals`) gives the 95% intervals of both mAPs
    and of the 1..10 affect errors, which go into ``metrics.json`` and the benchmark
    table (``model_name`` names the model there; default: the checkpoint's path).

    With ``validation`` (a labelled split: a CSV path or its rows), the same loaded
    model predicts it too, so a promotion can compare on validation without loading the
    checkpoint again (:attr:`EvaluationReport.validation`).

    Files written (atomically): ``metrics.json``, ``per_emotion.csv``,
    ``benchmark.md``, ``benchmark.csv``, ``cooccurrence_true.png``,
    ``cooccurrence_pred.png``, ``true_vs_predicted.png``, ``per_emotion_metrics.png``,
    ``affect_scatter.png`` and, when the checkpoint holds a training history,
    ``learning_curves.png``.
    """
    out_dir = Path(out_dir)
    _check_outputs(checkpoint, annotations, img_dir, out_dir, normalizer, validation, n_resamples)
    normalizer = load_normalizer(normalizer)
    device_ = resolve_device(device)
    model, config, state = load_checkpoint(checkpoint, map_location=device_)
    thresholds = np.asarray(state.get("thresholds") if state.get("thresholds") is not None else [0.5] * len(EMOTIONS))
    predict = functools.partial(
        _predict_rows,
        model,
        config,
        img_dir,
        device=device_,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )

    dataset, predictions = predict(annotations, "evaluate")
    split = dataset.annotations.iloc[predictions.indices]
    # The 1..10 errors are measured against the annotated values, not against targets
    # clipped by bounds fitted on train; masked rows count in the emotion metrics only.
    raw_true = raw_affect(split)
    metrics, metrics_at_half, by_visibility = _split_metrics(split, raw_true, predictions, thresholds, normalizer)
    y_true, y_prob = predictions.emotions_true, predictions.emotion_prob
    report, files = write_split_report(
        y_true, y_prob, thresholds, predictions.affect_true, predictions.affect_pred, out_dir
    )
    if state.get("history"):
        files["learning_curves"] = plot_learning_curves(state["history"], out_dir / "learning_curves.png")
    table = _benchmark(raw_true, predictions, normalizer, model_name or str(checkpoint), n_resamples, bootstrap_seed)
    files.update({f"benchmark_{kind}": path for kind, path in write_benchmark(table, out_dir).items()})
    scored_validation = _score_validation(*predict(validation, "validation")) if validation is not None else None
    files["metrics"] = write_json_atomic(
        {
            "metrics": metrics,
            "metrics_at_0.5": metrics_at_half,
            "intervals": {key: asdict(interval) for key, interval in table.intervals.items()},
            "metrics_by_face_visibility": by_visibility,
            "validation": scored_validation.metrics if scored_validation is not None else None,
            "n_samples": len(predictions),
            "rows_affect_masked": int(dataset.annotations.attrs.get("affect_masked_rows", 0)),
        },
        out_dir / "metrics.json",
    )
    _log_evaluation(checkpoint, metrics, table.intervals["mAP"])
    return EvaluationReport(
        metrics=metrics,
        metrics_at_half=metrics_at_half,
        per_emotion=report,
        thresholds=thresholds,
        predictions=predictions,
        config=config,
        normalizer=normalizer,
        split_id=split_fingerprint(dataset.annotations),
        benchmark=table,
        validation=scored_validation,
        by_visibility=by_visibility,
        files=files,
    )


def write_split_report(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    thresholds: np.ndarray,
    affect_true: np.ndarray,
    affect_pred: np.ndarray,
    out_dir: str | Path,
) -> tuple[pd.DataFrame, dict[str, Path]]:
    """The per-emotion table and the figures of a whole split, written into ``out_dir``.

    Files: :data:`SPLIT_REPORT_FILES`. Returns the table (:func:`~emonet.metrics.per_emotion_report`)
    and the paths by name.
    """
    out_dir = Path(out_dir)
    names = SPLIT_REPORT_FILES
    # Every number first, then the figures, then the table.
    report = per_emotion_report(y_true, y_prob, thresholds=thresholds)
    y_pred = binarize(y_prob, thresholds)
    true_cooccurrence, pred_cooccurrence = cooccurrence_matrix(y_true), cooccurrence_matrix(y_pred)
    true_vs_predicted = true_vs_predicted_matrix(y_true, y_pred)
    files = {
        "cooccurrence_true": plot_cooccurrence(
            true_cooccurrence, out_dir / names["cooccurrence_true"], title="Ground-truth co-occurrence"
        ),
        "cooccurrence_pred": plot_cooccurrence(
            pred_cooccurrence, out_dir / names["cooccurrence_pred"], title="Predicted co-occurrence"
        ),
        "true_vs_predicted": plot_true_vs_predicted(
            true_vs_predicted, out_dir / names["true_vs_predicted"], normalize=True, support=y_true.sum(axis=0)
        ),
        "per_emotion_metrics": plot_per_emotion_metrics(report, out_dir / names["per_emotion_metrics"]),
        "affect_scatter": plot_affect_scatter(affect_true, affect_pred, out_dir / names["affect_scatter"]),
        "per_emotion_csv": write_csv_atomic(report.reset_index(), out_dir / names["per_emotion_csv"]),
    }
    return report, files


def split_fingerprint(annotations: pd.DataFrame) -> str:
    """SHA-256 of what defines a split's emotion benchmark: its crops and their labels.

    Two evaluations are comparable only on the same fingerprint; it ignores columns
    that depend on preprocessing choices (normalized affect, face visibility).
    """
    columns = ["Crop_name", *EMOTIONS]
    canonical = annotations[columns].astype({emotion: "int8" for emotion in EMOTIONS}).to_csv(index=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
