"""Scores of 0/1 emotion decisions: thresholds (choosing and applying them), the
per-emotion report, the multi-label averages, label-pair matrices and per-sample scores."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    hamming_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
)

from emonet.metrics._checks import (
    _check_binary_2d,
    _check_finite_2d,
    _check_labels,
    _check_thresholds,
    _warn_undefined_ap,
    check_multilabel,
)
from emonet.metrics._ranking import per_label_average_precision
from emonet.schema import EMOTIONS

logger = logging.getLogger(__name__)

__all__ = [
    "REPORT_COLUMNS",
    "binarize",
    "confidence_score",
    "cooccurrence_matrix",
    "divide_rows",
    "multilabel_scores",
    "per_emotion_report",
    "sample_f1_score",
    "true_vs_predicted_matrix",
    "tune_thresholds",
]

# Columns of ``per_emotion_report``, in order.
# ``average_precision`` is scikit-learn's AP, ``average_precision_voc11`` the EMOTIC authors' 11-point AP.
REPORT_COLUMNS: tuple[str, ...] = (
    "average_precision",
    "average_precision_voc11",
    "precision",
    "recall",
    "f1",
    "support",
    "threshold",
)


def binarize(y_prob: ArrayLike, thresholds: ArrayLike = 0.5) -> np.ndarray:
    """Turn probabilities into 0/1 predictions: ``prob >= threshold``, per label.

    Parameters
    ----------
    y_prob : array-like of shape (n_samples, n_labels)
        Predicted probabilities (or any scores).
    thresholds : float or array-like of shape (n_labels,), default=0.5
        One threshold for every label, or one per label (see ``tune_thresholds``).

    Returns
    -------
    ndarray of int64, shape (n_samples, n_labels)

    Examples
    --------
    >>> binarize([[0.2, 0.7], [0.5, 0.1]], [0.5, 0.05]).tolist()
    [[0, 1], [1, 1]]
    """
    y_prob = _check_finite_2d(y_prob, "y_prob")
    thresholds = _check_thresholds(thresholds, y_prob.shape[1])
    # >= matches precision_recall_curve, whose thresholds are the lowest score kept positive.
    return (y_prob >= thresholds[None, :]).astype(np.int64)


def per_emotion_report(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    thresholds: ArrayLike = 0.5,
    labels: Sequence[str] = EMOTIONS,
) -> pd.DataFrame:
    """Average precision (both protocols), precision, recall, F1 and support for every emotion.

    Parameters
    ----------
    y_true : array-like of shape (n_samples, n_labels)
        Multi-hot ground truth.
    y_prob : array-like of shape (n_samples, n_labels)
        Predicted probabilities.
    thresholds : float or array-like of shape (n_labels,), default=0.5
        Decision thresholds for precision/recall/F1; AP does not use them.
    labels : sequence of str, default=EMOTIONS
        One name per column, used as the index.

    Returns
    -------
    pandas.DataFrame
        Indexed by label name, columns ``average_precision`` (scikit-learn's),
        ``average_precision_voc11`` (:func:`voc11_average_precision_score`), ``precision,
        recall, f1, support, threshold``. ``support`` is the number of positive samples. AP is NaN
        for labels with no positive sample (it is undefined there), and an
        ``UndefinedMetricWarning`` names them; precision/recall/F1 use
        ``zero_division=0``.

    Examples
    --------
    >>> report = per_emotion_report([[1, 0], [0, 1], [1, 1]], [[0.9, 0.4], [0.4, 0.8], [0.6, 0.3]],
    ...                             labels=["a", "b"])
    >>> report["average_precision"].tolist(), report["recall"].tolist()
    ([1.0, 0.8333333333333333], [1.0, 0.5])
    """
    y_true, y_prob = check_multilabel(y_true, y_prob, name="y_prob")
    labels = _check_labels(labels, y_true.shape[1])
    thresholds = _check_thresholds(thresholds, y_true.shape[1])
    _warn_undefined_ap(y_true, labels)
    ap, ap_voc11 = per_label_average_precision(y_true, y_prob)
    y_pred = binarize(y_prob, thresholds)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, average=None, labels=range(y_true.shape[1]), zero_division=0
    )
    report = pd.DataFrame(
        {
            "average_precision": ap,
            "average_precision_voc11": ap_voc11,
            "precision": precision.astype(np.float64),
            "recall": recall.astype(np.float64),
            "f1": f1.astype(np.float64),
            "support": support.astype(np.int64),
            "threshold": thresholds,
        },
        index=pd.Index(labels, name="emotion"),
    )
    return report[list(REPORT_COLUMNS)]


def tune_thresholds(y_true: ArrayLike, y_prob: ArrayLike, default: float = 0.5) -> np.ndarray:
    """Per-label threshold that maximizes F1, to be chosen on validation data.

    Candidates are the thresholds of ``sklearn.metrics.precision_recall_curve``, i.e.
    the observed scores, so ``binarize(y_prob, t)`` reproduces the best F1 exactly.
    Ties go to the lowest threshold (highest recall).

    Parameters
    ----------
    y_true : array-like of shape (n_samples, n_labels)
        Multi-hot ground truth of the tuning split.
    y_prob : array-like of shape (n_samples, n_labels)
        Predicted probabilities on the same split.
    default : float, default=0.5
        Threshold for labels with no positive sample, where F1 cannot be tuned.

    Returns
    -------
    ndarray of float64, shape (n_labels,)

    Examples
    --------
    >>> tune_thresholds([[1], [0], [1], [0]], [[0.4], [0.1], [0.3], [0.2]]).tolist()
    [0.3]
    """
    y_true, y_prob = check_multilabel(y_true, y_prob, name="y_prob")
    if not np.isfinite(default):
        raise ValueError(f"default threshold must be finite, got {default}")
    thresholds = np.full(y_true.shape[1], float(default))
    no_positive = []
    for j in range(y_true.shape[1]):
        if y_true[:, j].sum() == 0:
            no_positive.append(j)
            continue
        precision, recall, candidates = precision_recall_curve(y_true[:, j], y_prob[:, j])
        # The curve's last point (precision 1, recall 0) has no threshold.
        precision, recall = precision[:-1], recall[:-1]
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        thresholds[j] = float(candidates[int(np.argmax(f1))])
    if no_positive:
        logger.warning(
            "%d label(s) have no positive sample; threshold %s kept for columns %s",
            len(no_positive),
            default,
            no_positive,
        )
    return thresholds


def multilabel_scores(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """F1 (micro, macro, samples), subset accuracy and Hamming loss of 0/1 predictions.

    ``zero_division=0``: a label never true and never predicted counts as F1 0 in the
    macro average, as scikit-learn does.

    Parameters
    ----------
    y_true : array-like of shape (n_samples, n_labels)
        Multi-hot ground truth.
    y_pred : array-like of shape (n_samples, n_labels)
        Multi-hot predictions (see ``binarize``).

    Returns
    -------
    dict
        ``f1_micro, f1_macro, f1_samples, subset_accuracy`` (higher is better) and
        ``hamming_loss`` (lower is better), all plain floats.

    Examples
    --------
    >>> scores = multilabel_scores([[1, 0], [0, 1]], [[1, 1], [0, 1]])
    >>> scores["f1_micro"], scores["subset_accuracy"], scores["hamming_loss"]
    (0.8, 0.5, 0.25)
    """
    y_true, y_pred = check_multilabel(y_true, y_pred, name="y_pred", binary=True)
    return {
        "f1_micro": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "f1_samples": float(f1_score(y_true, y_pred, average="samples", zero_division=0)),
        # On multi-label input accuracy_score is the exact-match (subset) accuracy.
        "subset_accuracy": float(accuracy_score(y_true, y_pred)),
        "hamming_loss": float(hamming_loss(y_true, y_pred)),
    }


def cooccurrence_matrix(y: ArrayLike) -> np.ndarray:
    """Count the samples in which labels ``i`` and ``j`` are both positive.

    Parameters
    ----------
    y : array-like of shape (n_samples, n_labels)
        Multi-hot labels (ground truth or predictions).

    Returns
    -------
    ndarray of int64, shape (n_labels, n_labels)
        Symmetric; the diagonal holds each label's positive count.

    Examples
    --------
    >>> cooccurrence_matrix([[1, 1, 0], [1, 0, 0], [1, 1, 1]]).tolist()
    [[3, 2, 1], [2, 2, 1], [1, 1, 1]]
    """
    y = _check_binary_2d(y, "y")
    return y.T @ y


def true_vs_predicted_matrix(y_true: ArrayLike, y_pred: ArrayLike, *, normalize: bool = False) -> np.ndarray:
    """Multi-label "confusion": how often emotion ``j`` is predicted when ``i`` is true.

    Entry ``(i, j)`` counts the samples where label ``i`` is true and label ``j`` is
    predicted. Unlike a single-label confusion matrix, a sample adds to every pair of
    its true and predicted labels, so rows do not sum to the support; the diagonal
    holds the true positives.

    Parameters
    ----------
    y_true : array-like of shape (n_samples, n_labels)
        Multi-hot ground truth.
    y_pred : array-like of shape (n_samples, n_labels)
        Multi-hot predictions.
    normalize : bool, default=False
        Divide row ``i`` by the number of samples where ``i`` is true, giving the rate
        at which ``j`` is predicted given ``i`` (the diagonal becomes recall). Rows of
        labels with no positive sample are NaN.

    Returns
    -------
    ndarray of shape (n_labels, n_labels)
        int64 counts, or float64 rates when ``normalize``.

    Examples
    --------
    >>> true_vs_predicted_matrix([[1, 0], [1, 1], [0, 1]], [[0, 1], [1, 1], [0, 1]]).tolist()
    [[1, 2], [1, 2]]
    """
    y_true, y_pred = check_multilabel(y_true, y_pred, name="y_pred", binary=True)
    counts = y_true.T @ y_pred  # (L, L)
    if not normalize:
        return counts
    return divide_rows(counts, y_true.sum(axis=0))


def divide_rows(matrix: ArrayLike, denominator: ArrayLike) -> np.ndarray:
    """Row ``i`` of ``matrix`` divided by ``denominator[i]``, as float64.

    Rows with a zero denominator become NaN (undefined, and blank in a heatmap), not inf.

    Examples
    --------
    >>> divide_rows([[2, 4], [1, 3]], [2, 0]).tolist()
    [[1.0, 2.0], [nan, nan]]
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = matrix / denominator[:, None]
    rates[denominator == 0] = np.nan
    return rates


# --------------------------------------------------------------------------- per-sample scores


def sample_f1_score(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """F1 of each sample's predicted label set against its true set.

    ``F1 = 2 |T & P| / (|T| + |P|)``; defined as 1.0 when both sets are empty (nothing
    to find, nothing claimed) and 0.0 when exactly one is empty. (scikit-learn's
    ``f1_score(average="samples")`` averages the same values, with 0.0 for two empty sets.)

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples, n_labels), 0/1.

    Returns
    -------
    ndarray of float64, shape (n_samples,); higher is better.

    Examples
    --------
    >>> sample_f1_score([[1, 1, 0], [0, 0, 0], [1, 0, 0]], [[1, 0, 0], [0, 0, 0], [0, 1, 0]])
    array([0.66666667, 1.        , 0.        ])
    """
    y_true, y_pred = check_multilabel(y_true, y_pred, "y_pred", binary=True)
    overlap = (y_true & y_pred).sum(axis=1).astype(np.float64)
    sizes = (y_true.sum(axis=1) + y_pred.sum(axis=1)).astype(np.float64)
    f1 = np.ones(len(sizes))
    np.divide(2.0 * overlap, sizes, out=f1, where=sizes > 0)
    return f1


def confidence_score(y_prob: ArrayLike, thresholds: ArrayLike) -> np.ndarray:
    """How decided the model is about each sample: mean ``|prob - threshold|`` over labels.

    0 when every probability sits on its threshold; up to 1 when all are at 0 or 1
    far from their thresholds. Shape ``(n_samples,)``; higher is more confident.

    Examples
    --------
    >>> confidence_score([[0.9, 0.1]], [0.5, 0.5])
    array([0.4])
    """
    y_prob = _check_finite_2d(y_prob, "y_prob")
    thresholds = _check_thresholds(thresholds, y_prob.shape[1])
    return np.abs(y_prob - thresholds[None, :]).mean(axis=1)
