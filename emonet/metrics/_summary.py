"""One evaluation in a few numbers: the headline metrics as a flat dict for logging,
the same per face-visibility group, and how a metric that could not be computed is
written out."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import f1_score

from emonet.metrics._checks import _check_affect_pair, _check_thresholds, check_multilabel
from emonet.metrics._classification import binarize, multilabel_scores
from emonet.metrics._ranking import mean_average_precision_score, mean_voc11_average_precision_score
from emonet.metrics._regression import affect_errors
from emonet.schema import SCALE_MAX, SCALE_MIN

__all__ = [
    "EVALUATION_KEYS",
    "VISIBILITY_GROUPS",
    "VISIBILITY_METRICS",
    "evaluate_predictions",
    "face_visibility_groups",
    "finite_or_none",
    "format_metric",
    "metrics_by_visibility",
]

# Keys of ``evaluate_predictions``, in order; the training loop and MLflow log these.
EVALUATION_KEYS: tuple[str, ...] = (
    "mAP",
    "mAP_voc11",
    "f1_micro",
    "f1_macro",
    "f1_samples",
    "subset_accuracy",
    "hamming_loss",
    "mae_valence",
    "mae_arousal",
    "mae_valence_1_10",
    "mae_arousal_1_10",
    "n_emotion",
    "n_affect",
)

# Face-visibility groups of ``metrics_by_visibility``: no face (score 0), part of the
# face (0 < score < 100), the whole face (100), and crops that could not be scored (NaN).
VISIBILITY_GROUPS: tuple[str, ...] = ("none", "partial", "whole", "unreadable")
# Metrics reported per group, as ``<metric>_face_<group>``.
VISIBILITY_METRICS: tuple[str, ...] = ("n", "mAP", "mAP_voc11", "f1_macro", "mae_valence_1_10", "mae_arousal_1_10")


def evaluate_predictions(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    affect_true: ArrayLike,
    affect_pred: ArrayLike,
    thresholds: ArrayLike = 0.5,
    low: ArrayLike = (SCALE_MIN, SCALE_MIN),
    high: ArrayLike = (SCALE_MAX, SCALE_MAX),
    *,
    raw_true: ArrayLike | None = None,
) -> dict[str, float]:
    """Every headline metric of one evaluation, as a flat dict of floats for logging.

    The emotion metrics use every row; the affect errors skip rows with a NaN target
    (see :func:`affect_errors`). Both row counts are reported.

    Parameters
    ----------
    y_true : array-like of shape (n_samples, n_labels)
        Multi-hot emotion ground truth.
    y_prob : array-like of shape (n_samples, n_labels)
        Predicted emotion probabilities.
    affect_true, affect_pred : array-like of shape (n_samples, 2)
        Normalized (valence, arousal) targets (NaN where masked) and predictions.
    thresholds : float or array-like of shape (n_labels,), default=0.5
        Decision thresholds for the F1, accuracy and Hamming scores.
    low, high : float or pair of float
        Affect normalization bounds, see ``affect_errors``.
    raw_true : array-like of shape (n_samples, 2), optional
        Annotated (valence, arousal) on the 1..10 scale, for the ``*_1_10`` errors;
        see ``affect_errors``. Pass it whenever the bounds were fitted on train.

    Returns
    -------
    dict
        Keys ``EVALUATION_KEYS``: ``mAP`` (scikit-learn's AP), ``mAP_voc11`` (the EMOTIC
        authors' 11-point AP), ``f1_micro, f1_macro, f1_samples,
        subset_accuracy, hamming_loss, mae_valence, mae_arousal, mae_valence_1_10,
        mae_arousal_1_10``, then ``n_emotion`` and ``n_affect``, the rows the emotion
        metrics and the affect errors were computed on.

    Raises
    ------
    ValueError
        If the emotion and affect inputs disagree on the number of samples, or any
        input fails its check.

    Examples
    --------
    >>> metrics = evaluate_predictions([[1, 0], [0, 1]], [[0.9, 0.2], [0.3, 0.6]],
    ...                                [[0.0, 0.0], [np.nan, np.nan]], [[0.0, 0.0], [0.5, -0.5]])
    >>> metrics["mAP"], metrics["f1_macro"], metrics["mae_valence_1_10"], metrics["n_emotion"], metrics["n_affect"]
    (1.0, 1.0, 0.0, 2.0, 1.0)
    """
    y_true, y_prob = check_multilabel(y_true, y_prob, name="y_prob")
    n_affect_samples = np.shape(affect_true)[0] if np.ndim(affect_true) else 0
    if n_affect_samples != y_true.shape[0]:
        raise ValueError(f"affect_true has {n_affect_samples} samples but y_true has {y_true.shape[0]}")
    results = {
        "mAP": mean_average_precision_score(y_true, y_prob),
        "mAP_voc11": mean_voc11_average_precision_score(y_true, y_prob),
        "n_emotion": float(y_true.shape[0]),
    }
    results.update(multilabel_scores(y_true, binarize(y_prob, thresholds)))
    results.update(affect_errors(affect_true, affect_pred, low=low, high=high, raw_true=raw_true))
    return {key: float(results[key]) for key in EVALUATION_KEYS}


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (or text of one), else None: how a
    metric that could not be computed (NaN, a missing tag) reaches JSON and MLflow."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def format_metric(value: Any, spec: str = ".4f") -> str:
    """``value`` formatted with ``spec``, or ``"n/a"`` when it is not a finite number."""
    number = finite_or_none(value)
    return "n/a" if number is None else format(number, spec)


def face_visibility_groups(visibility: ArrayLike) -> np.ndarray:
    """The face-visibility group of each row: ``"none"``, ``"partial"``, ``"whole"`` or ``"unreadable"``.

    Parameters
    ----------
    visibility : array-like of shape (n_samples,)
        ``Face_Visibility`` scores: the percentage of face landmarks inside the crop
        (0 when no face is found, NaN when the crop could not be scored).

    Returns
    -------
    ndarray of str, shape (n_samples,)

    Raises
    ------
    ValueError
        If ``visibility`` is not 1-D or holds values outside [0, 100] (other than NaN).

    Examples
    --------
    >>> face_visibility_groups([0.0, 37.5, 100.0, np.nan]).tolist()
    ['none', 'partial', 'whole', 'unreadable']
    """
    scores = np.asarray(visibility, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"visibility must be 1-D (n_samples,), got shape {scores.shape}")
    bad = ~np.isnan(scores) & ((scores < 0.0) | (scores > 100.0))
    if bad.any():
        found = np.unique(scores[bad])[:5].tolist()
        raise ValueError(f"visibility scores must lie in [0, 100] or be NaN, found {found}")
    groups = np.full(scores.shape, "unreadable", dtype=object)
    groups[scores == 0.0] = "none"
    groups[(scores > 0.0) & (scores < 100.0)] = "partial"
    groups[scores == 100.0] = "whole"
    return groups.astype(str)


def _group_emotion_scores(y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray) -> tuple[float, float, float]:
    """mAP (both protocols) and macro F1 of one group, over the labels with a positive in the group."""
    present = np.flatnonzero(y_true.sum(axis=0) > 0)
    if len(present) == 0:
        return float("nan"), float("nan"), float("nan")
    mean_ap = mean_average_precision_score(y_true[:, present], y_prob[:, present])
    mean_ap_voc11 = mean_voc11_average_precision_score(y_true[:, present], y_prob[:, present])
    y_pred = binarize(y_prob, thresholds)
    f1_macro = float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
    return mean_ap, mean_ap_voc11, f1_macro


def metrics_by_visibility(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    affect_true: ArrayLike,
    affect_pred: ArrayLike,
    visibility: ArrayLike,
    thresholds: ArrayLike = 0.5,
    low: ArrayLike = (SCALE_MIN, SCALE_MIN),
    high: ArrayLike = (SCALE_MAX, SCALE_MAX),
    *,
    raw_true: ArrayLike | None = None,
) -> dict[str, float]:
    """mAP (scikit-learn's and the 11-point one), macro F1 and 1..10 affect errors per face-visibility group.

    Rows are grouped by :func:`face_visibility_groups`. Within a group, mAP and macro
    F1 average over the labels that have a positive there (a label absent from a small
    group has no AP, and its F1 of 0 would only measure the group's size); on the whole
    EMOTIC test split every label has positives, so this is the usual definition. The
    affect errors skip masked rows, as :func:`affect_errors` does. An empty group has
    ``n`` 0 and NaN metrics; so does a metric with nothing to average.

    Parameters
    ----------
    y_true, y_prob, affect_true, affect_pred, thresholds, low, high, raw_true
        As in :func:`evaluate_predictions`.
    visibility : array-like of shape (n_samples,)
        Each row's ``Face_Visibility`` score.

    Returns
    -------
    dict
        For every group in ``VISIBILITY_GROUPS`` (``none, partial, whole,
        unreadable``) and metric in ``VISIBILITY_METRICS``, ``<metric>_face_<group>``,
        e.g. ``mAP_face_whole``, ``n_face_unreadable`` (rows in the group); floats.

    Examples
    --------
    >>> result = metrics_by_visibility([[1, 0], [0, 1], [1, 0], [0, 1]],
    ...                                [[0.9, 0.1], [0.2, 0.7], [0.3, 0.6], [0.8, 0.4]],
    ...                                [[0.0, 0.0]] * 4, [[0.0, 0.0]] * 4, [100, 100, 0, 0])
    >>> result["mAP_face_whole"], result["mAP_face_none"], result["n_face_partial"], result["mAP_face_partial"]
    (1.0, 0.5, 0.0, nan)
    """
    y_true, y_prob = check_multilabel(y_true, y_prob, name="y_prob")
    n = y_true.shape[0]
    thresholds = _check_thresholds(thresholds, y_true.shape[1])
    affect_true = _check_affect_pair(affect_true, "affect_true", n_samples=n)
    affect_pred = _check_affect_pair(affect_pred, "affect_pred", n_samples=n)
    raw = _check_affect_pair(raw_true, "raw_true", n_samples=n) if raw_true is not None else None
    groups = face_visibility_groups(visibility)
    if groups.shape[0] != n:
        raise ValueError(f"visibility has {groups.shape[0]} samples but y_true has {n}")

    results: dict[str, float] = {}
    for group in VISIBILITY_GROUPS:
        rows = groups == group
        values = dict.fromkeys(VISIBILITY_METRICS, float("nan"))
        values["n"] = float(rows.sum())
        if rows.any():
            values["mAP"], values["mAP_voc11"], values["f1_macro"] = _group_emotion_scores(
                y_true[rows], y_prob[rows], thresholds
            )
            errors = affect_errors(
                affect_true[rows], affect_pred[rows], low, high, raw_true=raw[rows] if raw is not None else None
            )
            values["mae_valence_1_10"] = errors["mae_valence_1_10"]
            values["mae_arousal_1_10"] = errors["mae_arousal_1_10"]
        results.update({f"{metric}_face_{group}": values[metric] for metric in VISIBILITY_METRICS})
    return results
