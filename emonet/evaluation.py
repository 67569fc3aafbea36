"""Evaluate a trained checkpoint on a labelled split: the EMOTIC metrics, the
per-emotion table, the 26 x 26 matrices and their figures, written to one folder."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from emonet.annotations import raw_affect
from emonet.data import EmoticDataset
from emonet.io import check_not_inputs, write_csv_atomic, write_json_atomic
from emonet.metrics import (
    binarize,
    cooccurrence_matrix,
    evaluate_predictions,
    metrics_by_visibility,
    per_emotion_report,
    true_vs_predicted_matrix,
)
from emonet.normalize import AffectNormalizer, load_normalizer
from emonet.plots import (
    plot_affect_scatter,
    plot_cooccurrence,
    plot_learning_curves,
    plot_per_emotion_metrics,
    plot_true_vs_predicted,
)
from emonet.schema import EMOTIONS, FACE_VISIBILITY_COLUMN
from emonet.checkpoint import load_checkpoint, resolve_device
from emonet.config import EmoNetConfig
from emonet.prediction import Predictions, eval_transform, predict_split

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
    # mAP, macro F1 and 1..10 errors per face-visibility group (emonet.metrics.metrics_by_visibility);
    # empty when the split has no Face_Visibility column
    by_visibility: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


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
) -> EvaluationReport:
    """Score a ``best.pt`` on a labelled split and write its report into ``out_dir``.

    The per-emotion thresholds stored in the checkpoint (tuned on validation) decide
    the predicted sets; metrics at a fixed 0.5 are reported too. Valence/arousal errors
    on the 1..10 scale use ``normalizer`` (a ``normalization.json`` or an
    :class:`AffectNormalizer`; default: the 1..10 scale bounds).

    Files written (atomically): ``metrics.json``, ``per_emotion.csv``,
    ``cooccurrence_true.png``, ``cooccurrence_pred.png``, ``true_vs_predicted.png``,
    ``per_emotion_metrics.png``, ``affect_scatter.png`` and, when the checkpoint holds
    a training history, ``learning_curves.png``.
    """
    out_dir = Path(out_dir)
    check_not_inputs(
        [out_dir / name for name in (*SPLIT_REPORT_FILES.values(), "metrics.json", "learning_curves.png")],
        {"checkpoint": checkpoint, "annotations": annotations, "normalizer": normalizer},
    )
    normalizer = load_normalizer(normalizer)
    device_ = resolve_device(device)
    model, config, state = load_checkpoint(checkpoint, map_location=device_)
    thresholds = np.asarray(state.get("thresholds") if state.get("thresholds") is not None else [0.5] * len(EMOTIONS))

    with_context = config.model.variant == "body_context"
    dataset = EmoticDataset(annotations, img_dir, transform=eval_transform(config), with_context=with_context)
    predictions = predict_split(
        model,
        dataset,
        batch_size=batch_size or config.train.batch_size,
        num_workers=num_workers,
        device=device_,
        amp=config.train.amp,
        progress=progress,
        desc="evaluate",
    )

    # The 1..10 errors are measured against the annotated values, not against targets
    # clipped by bounds fitted on train; masked rows count in the emotion metrics only.
    split = dataset.annotations.iloc[predictions.indices]
    common = {
        "low": normalizer.low, "high": normalizer.high, "raw_true": raw_affect(split),
        "affect_true": predictions.affect_true, "affect_pred": predictions.affect_pred,
    }
    y_true, y_prob = predictions.emotions_true, predictions.emotion_prob
    metrics = evaluate_predictions(y_true, y_prob, thresholds=thresholds, **common)
    metrics_at_half = evaluate_predictions(y_true, y_prob, thresholds=0.5, **common)
    by_visibility: dict[str, float] = {}
    if FACE_VISIBILITY_COLUMN in split.columns:
        visibility = pd.to_numeric(split[FACE_VISIBILITY_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
        by_visibility = metrics_by_visibility(y_true, y_prob, visibility=visibility, thresholds=thresholds, **common)
    report, files = write_split_report(
        y_true, y_prob, thresholds, predictions.affect_true, predictions.affect_pred, out_dir
    )
    if state.get("history"):
        files["learning_curves"] = plot_learning_curves(state["history"], out_dir / "learning_curves.png")
    files["metrics"] = write_json_atomic(
        {
            "metrics": metrics,
            "metrics_at_0.5": metrics_at_half,
            "metrics_by_face_visibility": by_visibility,
            "n_samples": len(predictions),
            "rows_affect_masked": int(dataset.annotations.attrs.get("affect_masked_rows", 0)),
        },
        out_dir / "metrics.json",
    )
    logger.info(
        "evaluated %s: mAP %.4f on %d rows, affect errors on %d", checkpoint, metrics["mAP"],
        int(metrics["n_emotion"]), int(metrics["n_affect"]),
    )
    return EvaluationReport(
        metrics=metrics,
        metrics_at_half=metrics_at_half,
        per_emotion=report,
        thresholds=thresholds,
        predictions=predictions,
        config=config,
        normalizer=normalizer,
        split_id=split_fingerprint(dataset.annotations),
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

    Files: :data:`SPLIT_REPORT_FILES`. Returns the table (:func:`~emonet.metrics.per_emotion_report`) and the paths by name.
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
