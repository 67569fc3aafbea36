"""Evaluation metrics for multi-label emotions and valence/arousal regression.

Pure functions on NumPy arrays in the style of ``sklearn.metrics``: one shared
validator, ``*_score`` higher-is-better, ``*_error`` lower-is-better.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
)

from emonet.affect import from_unit_range
from emonet.schema import EMOTIONS, SCALE_MAX, SCALE_MIN

logger = logging.getLogger(__name__)

__all__ = [
    "EVALUATION_KEYS",
    "REPORT_COLUMNS",
    "affect_errors",
    "affect_sample_error",
    "binarize",
    "check_multilabel",
    "confidence_score",
    "cooccurrence_matrix",
    "divide_rows",
    "finite_or_none",
    "format_metric",
    "VISIBILITY_GROUPS",
    "VISIBILITY_METRICS",
    "evaluate_predictions",
    "face_visibility_groups",
    "mean_average_precision_score",
    "mean_voc11_average_precision_score",
    "metrics_by_visibility",
    "multilabel_scores",
    "per_emotion_report",
    "resampled_average_precision",
    "sample_f1_score",
    "true_vs_predicted_matrix",
    "tune_thresholds",
    "voc11_average_precision_score",
]

# Columns of ``per_emotion_report``, in order.
# ``average_precision`` is scikit-learn's AP, ``average_precision_voc11`` the EMOTIC authors' 11-point AP.
REPORT_COLUMNS: tuple[str, ...] = (
    "average_precision", "average_precision_voc11", "precision", "recall", "f1", "support", "threshold",
)

# Keys of ``evaluate_predictions``, in order; the training loop and MLflow log these.
EVALUATION_KEYS: tuple[str, ...] = (
    "mAP",
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


def _check_numeric_2d(y: ArrayLike, name: str, expected: str) -> np.ndarray:
    """``y`` as a non-empty 2-D numeric array, or a ValueError naming ``name``."""
    array = np.asarray(y)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_labels), got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} has no samples (shape {array.shape})")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be {expected}, got dtype {array.dtype}")
    return array


def _check_binary_2d(y: ArrayLike, name: str) -> np.ndarray:
    """Return ``y`` as a 2-D int array of 0/1, or raise a ValueError naming ``name``."""
    array = _check_numeric_2d(y, name, "numeric 0/1")
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        values = np.unique(array[bad])[:5].tolist()
        raise ValueError(f"{name} must hold only 0 and 1, found {values}")
    return array.astype(np.int64)


def _check_finite_2d(y: ArrayLike, name: str) -> np.ndarray:
    """Return ``y`` as a finite 2-D float array, or raise a ValueError naming ``name``."""
    array = _check_numeric_2d(y, name, "numeric").astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(array)).sum())} NaN or infinite values")
    return array


def check_multilabel(
    y_true: ArrayLike,
    y_score: ArrayLike,
    name: str = "y_score",
    *,
    n_labels: int | None = None,
    binary: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate multi-label targets and scores; the one check every metric here uses.

    Parameters
    ----------
    y_true : array-like of shape (n_samples, n_labels)
        Multi-hot ground truth holding only 0 and 1 (ints, bools or floats).
    y_score : array-like of shape (n_samples, n_labels)
        Scores, probabilities or (with ``binary=True``) predicted labels.
    name : str, default="y_score"
        What to call ``y_score`` in error messages (e.g. ``"y_prob"``, ``"y_pred"``).
    n_labels : int, optional
        Required number of columns, e.g. ``len(EMOTIONS)``; any number when None.
    binary : bool, default=False
        Require ``y_score`` to hold only 0 and 1 too (predicted labels).

    Returns
    -------
    y_true : ndarray of int64, shape (n_samples, n_labels)
    y_score : ndarray of float64 (int64 when ``binary``), shape (n_samples, n_labels)

    Raises
    ------
    ValueError
        If either input is not 2-D or is empty, the shapes differ, the column count
        is not ``n_labels``, ``y_true`` (or a binary ``y_score``) holds values other
        than 0/1, or ``y_score`` holds NaN or infinity.

    Examples
    --------
    >>> y_true, y_score = check_multilabel([[1, 0], [0, 1]], [[0.9, 0.2], [0.3, 0.6]])
    >>> y_true.dtype, y_score.shape
    (dtype('int64'), (2, 2))
    """
    y_true = _check_binary_2d(y_true, "y_true")
    y_score = _check_binary_2d(y_score, name) if binary else _check_finite_2d(y_score, name)
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true and {name} must have the same shape, got {y_true.shape} and {y_score.shape}")
    if n_labels is not None and y_true.shape[1] != n_labels:
        raise ValueError(f"expected {n_labels} label columns, got {y_true.shape[1]} (shape {y_true.shape})")
    return y_true, y_score


def _check_labels(labels: Sequence[str], n_labels: int) -> list[str]:
    labels = [str(label) for label in labels]
    if len(labels) != n_labels:
        raise ValueError(f"got {len(labels)} label names for {n_labels} label columns")
    if len(set(labels)) != len(labels):
        raise ValueError(f"label names must be unique, got {labels}")
    return labels


def _check_thresholds(thresholds: ArrayLike, n_labels: int) -> np.ndarray:
    """Broadcast a scalar or per-label threshold to shape (n_labels,)."""
    array = np.asarray(thresholds, dtype=np.float64)
    if array.ndim == 0:
        array = np.full(n_labels, float(array))
    if array.shape != (n_labels,):
        raise ValueError(f"thresholds must be a scalar or have shape ({n_labels},), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"thresholds must be finite, got {array.tolist()}")
    return array


def _warn_undefined_ap(y_true: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Return a mask of labels with at least one positive; warn about the others."""
    defined = y_true.sum(axis=0) > 0
    if not defined.all():
        missing = [label for label, ok in zip(labels, defined) if not ok]
        warnings.warn(
            f"average precision is undefined for {len(missing)} label(s) with no positive sample: {missing}",
            UndefinedMetricWarning,
            stacklevel=3,
        )
    return defined


def _default_labels(n_labels: int) -> list[str]:
    return list(EMOTIONS) if n_labels == len(EMOTIONS) else [f"label_{j}" for j in range(n_labels)]


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
    defined = _warn_undefined_ap(y_true, labels)

    ap = np.full(y_true.shape[1], np.nan)
    ap_voc11 = np.full(y_true.shape[1], np.nan)
    for j in np.flatnonzero(defined):
        ap[j] = average_precision_score(y_true[:, j], y_prob[:, j])
        ap_voc11[j] = voc11_average_precision_score(y_true[:, j], y_prob[:, j])
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


def _labels_with_positives(y_true: ArrayLike, y_prob: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checked inputs of a mean AP and the mask of labels with a positive (the others warned about)."""
    y_true, y_prob = check_multilabel(y_true, y_prob, name="y_prob")
    defined = _warn_undefined_ap(y_true, _default_labels(y_true.shape[1]))
    if not defined.any():
        raise ValueError(f"mAP is undefined: none of the {y_true.shape[1]} labels has a positive sample")
    return y_true, y_prob, defined


def mean_average_precision_score(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Mean over labels of the average precision: the EMOTIC benchmark metric.

    Labels with no positive sample have no AP; they are left out of the mean and an
    ``UndefinedMetricWarning`` names them. The result is in [0, 1]; papers report it
    times 100 (e.g. Kosti et al. 2019: 27.38).

    Parameters
    ----------
    y_true : array-like of shape (n_samples, n_labels)
        Multi-hot ground truth.
    y_prob : array-like of shape (n_samples, n_labels)
        Predicted probabilities or scores.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If no label has a positive sample, or the inputs fail ``check_multilabel``.

    Examples
    --------
    >>> mean_average_precision_score([[1, 0], [0, 1], [1, 1]], [[0.9, 0.4], [0.4, 0.8], [0.6, 0.3]])
    0.9166666666666666
    """
    y_true, y_prob, defined = _labels_with_positives(y_true, y_prob)
    aps = [average_precision_score(y_true[:, j], y_prob[:, j]) for j in np.flatnonzero(defined)]
    return float(np.mean(aps))


# The EMOTIC authors' AP samples precision at recall 0, 0.1, ..., 1 (``recallstep = 0.1``).
VOC11_STEPS = 10


def resampled_average_precision(
    y_true: np.ndarray, y_score: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Both APs of one label on weighted copies of its rows: scikit-learn's and the 11-point one.

    The engine behind :func:`voc11_average_precision_score` and the bootstrap
    (:mod:`emonet.bootstrap`): row ``i`` counts ``counts[b, i]`` times in copy ``b``, so
    a bootstrap resample is one row of counts, and all copies are scored at once with
    cumulative sums over a single ranking. Tied scores are one threshold: precision and
    recall are read at the end of each run of equal scores (as
    ``sklearn.metrics.precision_recall_curve`` does), which also makes a resample's
    duplicated rows count as one block, exactly as if they had been copied.

    Parameters
    ----------
    y_true : ndarray of int64, shape (n_samples,)
        0/1 labels (already validated).
    y_score : ndarray of float64, shape (n_samples,)
        Scores (already validated).
    counts : ndarray of int, shape (n_copies, n_samples)
        Non-negative whole weights; ``np.ones((1, n))`` scores the rows as they are.

    Returns
    -------
    step : ndarray of float64, shape (n_copies,)
        scikit-learn's ``average_precision_score(y_true, y_score, sample_weight=counts[b])``.
    voc11 : ndarray of float64, shape (n_copies,)
        :func:`voc11_average_precision_score` on the copy.
        Both are NaN for a copy without a positive row.
    """
    order = np.argsort(-y_score, kind="stable")
    ranked, positive = y_score[order], y_true[order] > 0
    block_end = np.append(ranked[1:] != ranked[:-1], True)  # last row of each run of ties
    end_of_row = np.flatnonzero(block_end)[np.cumsum(block_end) - block_end]  # (N,) its run's last row
    # Precision rises at a positive and falls at a negative, so both APs only need the
    # points that end a run holding a positive: every other point adds no recall and has a
    # lower precision than the point before it. Scoring those T <= n_positives points
    # keeps the (copies, N) work to one gather and one segment sum.
    ends_of_positives = end_of_row[positive]  # (P,) nondecreasing
    if len(ends_of_positives) == 0:
        nan = np.full(len(counts), np.nan)
        return nan, nan.copy()
    last_in_run = np.append(ends_of_positives[1:] != ends_of_positives[:-1], True)  # (P,)
    points = ends_of_positives[last_in_run]  # (T,) ranked index of each point
    # Rows ranked below the last point never count: leave them out of the gather.
    weights = np.asarray(counts)[:, order[: points[-1] + 1]].astype(np.int64, copy=False)  # (B, <= N)
    tp = np.cumsum(weights[:, positive[: points[-1] + 1]], axis=1)[:, last_in_run]  # (B, T)
    seen = np.cumsum(np.add.reduceat(weights, np.append(0, points[:-1] + 1), axis=1), axis=1)  # (B, T)
    n_copies, n_points = tp.shape
    n_pos = tp[:, -1].astype(np.int64)  # (B,)
    defined = n_pos > 0
    # A leading block whose rows were all left out (weight 0) is no point of the curve:
    # precision 0 there keeps it out of both APs (it adds no recall, and any maximum is >= 0).
    precision = tp / np.maximum(seen, 1)  # (B, T) float64

    gained = np.diff(tp, axis=1, prepend=0)  # (B, T) positives gained at each threshold
    step = np.einsum("bt,bt->b", gained, precision) / np.maximum(n_pos, 1)

    # The first point at recall >= k/10 is the first with tp >= ceil(k * n_pos / 10), in
    # integers (the authors compare float32 recalls with levels summed in steps of 0.1;
    # below millions of rows that decides every case the same way). tp never decreases
    # along a row, so offsetting row b by b * (max n_pos + 1) makes the whole array sorted
    # and one searchsorted finds every row's first points.
    levels = np.arange(VOC11_STEPS + 1)
    needed = -((-levels[None, :] * n_pos[:, None]) // VOC11_STEPS)  # (B, 11) ceil(k n_pos / 10)
    offset = np.arange(n_copies, dtype=np.int64)[:, None] * (int(n_pos.max()) + 1)
    first = np.searchsorted((tp + offset).ravel(), (needed + offset).ravel()).reshape(n_copies, -1)
    first -= np.arange(n_copies)[:, None] * n_points  # (B, 11) in 0..T; T: no point reaches the level
    # The best precision at recall >= k/10: the maximum of each stretch between two levels'
    # first points (reduceat), then a running maximum from the top level down.
    flat = np.append(precision.ravel(), 0.0)
    stretch = np.maximum.reduceat(flat, (first + np.arange(n_copies)[:, None] * n_points).ravel()).reshape(n_copies, -1)
    stretch[first == n_points] = 0.0
    voc11 = np.maximum.accumulate(stretch[:, ::-1], axis=1)[:, ::-1].mean(axis=1)
    step[~defined] = np.nan
    voc11[~defined] = np.nan
    return step, voc11


def voc11_average_precision_score(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """The EMOTIC authors' 11-point interpolated average precision of one label.

    Definition, as in the authors' released code (``rkosti/emotic``, ``src/funcs.lua``,
    ``precisionrecallvector``, called by ``CurveEvaluation`` from ``train_test.lua``
    with the default ``recallstep = 0.1``): rank the samples by descending score; take
    precision and recall at every rank; AP is the mean, over the 11 recall levels
    t = 0, 0.1, ..., 1, of the highest precision at a recall >= t (0 when no rank
    reaches t). This is the PASCAL VOC 2007 AP. It is not scikit-learn's
    ``average_precision_score`` (the step-wise, uninterpolated AP, which this project's
    ``mAP`` uses): on EMOTIC-like data the 11-point value is a few points higher.

    Ties. The authors rank with Torch7's ``Tensor:sort(true)``, a median-of-three
    quicksort that is not stable, so with tied scores their AP depends on where the tied
    rows happen to land. Here a run of tied scores is one threshold: precision and recall
    are read after the whole run (as scikit-learn does). That equals their result
    whenever the scores are distinct, and with ties it is the ordering that puts the
    tied negatives first, the lowest AP any ordering of the ties gives.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        0/1 ground truth of one label.
    y_score : array-like of shape (n_samples,)
        Scores or probabilities; higher means more likely positive.

    Returns
    -------
    float
        In [0, 1]; NaN, with an ``UndefinedMetricWarning``, when there is no positive
        sample (the authors' code returns 0 there; :func:`mean_voc11_average_precision_score`
        leaves such a label out, as :func:`mean_average_precision_score` does).

    Raises
    ------
    ValueError
        If the inputs are not 1-D of one length, or fail ``check_multilabel``.

    Examples
    --------
    >>> voc11_average_precision_score([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    0.8484848484848484
    """
    shapes = (np.shape(y_true), np.shape(y_score))
    if any(len(shape) != 1 for shape in shapes):
        raise ValueError(f"y_true and y_score must be 1-D (one label), got shapes {shapes[0]} and {shapes[1]}")
    y_true, y_score = check_multilabel(np.reshape(y_true, (-1, 1)), np.reshape(y_score, (-1, 1)))
    _warn_undefined_ap(y_true, ["y_true"])
    _, voc11 = resampled_average_precision(y_true[:, 0], y_score[:, 0], np.ones((1, len(y_true)), dtype=np.int64))
    return float(voc11[0])


def mean_voc11_average_precision_score(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Mean over labels of :func:`voc11_average_precision_score`: the EMOTIC authors' mAP.

    Labels with no positive sample are left out of the mean, with an
    ``UndefinedMetricWarning`` naming them, as in :func:`mean_average_precision_score`
    (the authors' code would count them as 0; every label has positives on the EMOTIC
    test split, so the two agree there).

    Parameters
    ----------
    y_true : array-like of shape (n_samples, n_labels)
        Multi-hot ground truth.
    y_prob : array-like of shape (n_samples, n_labels)
        Predicted probabilities or scores.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If no label has a positive sample, or the inputs fail ``check_multilabel``.

    Examples
    --------
    >>> mean_voc11_average_precision_score([[1, 0], [0, 1], [1, 1]], [[0.9, 0.4], [0.4, 0.8], [0.6, 0.3]])
    0.9242424242424242
    """
    y_true, y_prob, defined = _labels_with_positives(y_true, y_prob)
    ones = np.ones((1, y_true.shape[0]), dtype=np.int64)
    aps = [resampled_average_precision(y_true[:, j], y_prob[:, j], ones)[1][0] for j in np.flatnonzero(defined)]
    return float(np.mean(aps))


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
        logger.warning("%d label(s) have no positive sample; threshold %s kept for columns %s",
                       len(no_positive), default, no_positive)
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


def _check_bounds(value: ArrayLike, name: str) -> np.ndarray:
    """Broadcast a scalar or (valence, arousal) bound to shape (2,)."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        array = np.full(2, float(array))
    if array.shape != (2,) or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a finite (valence, arousal) pair, got {value!r}")
    return array


def _check_affect_pair(values: ArrayLike, name: str, n_samples: int | None = None) -> np.ndarray:
    """``values`` as an (n_samples, 2) float array that may hold NaN (masked) but not inf."""
    array = _check_numeric_2d(values, name, "numeric").astype(np.float64)
    if array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n_samples, 2) for (valence, arousal), got {array.shape}")
    if n_samples is not None and array.shape[0] != n_samples:
        raise ValueError(f"{name} has {array.shape[0]} samples, expected {n_samples}")
    if np.isinf(array).any():
        raise ValueError(f"{name} holds {int(np.isinf(array).sum())} infinite values")
    return array


def affect_errors(
    affect_true: ArrayLike,
    affect_pred: ArrayLike,
    low: ArrayLike = (SCALE_MIN, SCALE_MIN),
    high: ArrayLike = (SCALE_MAX, SCALE_MAX),
    *,
    raw_true: ArrayLike | None = None,
) -> dict[str, float]:
    """Mean absolute error of valence and arousal, on [-1, 1] and on the original scale.

    Inputs are normalized with ``x_norm = 2 * (x - low) / (high - low) - 1`` per
    dimension. Predictions are mapped back to the original scale with the same bounds
    and not clipped. Rows whose target is NaN (an invalid annotation masked by
    :func:`~emonet.annotations.load_annotations`) are left out of every error; how
    many rows were used is returned as ``n_affect``.

    Parameters
    ----------
    affect_true : array-like of shape (n_samples, 2)
        Normalized (valence, arousal) targets; a NaN in a row masks the row.
    affect_pred : array-like of shape (n_samples, 2)
        Normalized (valence, arousal) predictions; must be finite.
    low, high : float or pair of float, default=(SCALE_MIN, SCALE_MIN), (SCALE_MAX, SCALE_MAX)
        Per-dimension bounds the normalization used (the EMOTIC 1..10 scale, or
        bounds fitted on the train split).
    raw_true : array-like of shape (n_samples, 2), optional
        The annotated (valence, arousal) on the original 1..10 scale. With bounds
        fitted on train, normalized targets outside them were clipped to [-1, 1], so
        undoing the map does not give the annotation back; pass the raw values and
        the ``*_1_10`` errors are measured against them, as the benchmark defines.
        Without it, the targets are mapped back (exact with the 1..10 bounds). A NaN
        here masks the row too.

    Returns
    -------
    dict
        ``mae_valence, mae_arousal`` on [-1, 1] and ``mae_valence_1_10,
        mae_arousal_1_10`` on the original scale (plain floats, lower is better; NaN
        when no row has a target), and ``n_affect``, the number of rows used.

    Examples
    --------
    >>> errors = affect_errors([[0.0, 0.5], [np.nan, np.nan]], [[0.5, 0.5], [0.0, 0.0]])
    >>> errors["mae_valence"], errors["mae_valence_1_10"], errors["mae_arousal_1_10"], errors["n_affect"]
    (0.5, 2.25, 0.0, 1.0)
    """
    affect_true = _check_affect_pair(affect_true, "affect_true")
    affect_pred = _check_affect_pair(affect_pred, "affect_pred")
    if affect_true.shape != affect_pred.shape:
        raise ValueError(
            f"affect_true and affect_pred must have the same shape, got {affect_true.shape} and {affect_pred.shape}"
        )
    if np.isnan(affect_pred).any():
        raise ValueError(f"affect_pred holds {int(np.isnan(affect_pred).sum())} NaN values")
    low, high = _check_bounds(low, "low"), _check_bounds(high, "high")
    if not (high > low).all():
        raise ValueError(f"high must exceed low in every dimension, got low={low.tolist()} high={high.tolist()}")
    used = np.isfinite(affect_true).all(axis=1)  # (N,)
    if raw_true is not None:
        raw_true = _check_affect_pair(raw_true, "raw_true", n_samples=affect_true.shape[0])
        used &= np.isfinite(raw_true).all(axis=1)
    n_used = int(used.sum())
    if n_used == 0:
        logger.warning("no row has a valence/arousal target: affect errors are NaN")
        nan = float("nan")
        return {"mae_valence": nan, "mae_arousal": nan, "mae_valence_1_10": nan, "mae_arousal_1_10": nan,
                "n_affect": 0.0}

    true, pred = affect_true[used], affect_pred[used]
    mae = np.abs(pred - true).mean(axis=0)  # (2,)
    reference = raw_true[used] if raw_true is not None else from_unit_range(true, low, high)
    mae_original = np.abs(from_unit_range(pred, low, high) - reference).mean(axis=0)  # (2,)
    return {
        "mae_valence": float(mae[0]),
        "mae_arousal": float(mae[1]),
        "mae_valence_1_10": float(mae_original[0]),
        "mae_arousal_1_10": float(mae_original[1]),
        "n_affect": float(n_used),
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
        Keys ``EVALUATION_KEYS``: ``mAP, f1_micro, f1_macro, f1_samples,
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
    results = {"mAP": mean_average_precision_score(y_true, y_prob), "n_emotion": float(y_true.shape[0])}
    results.update(multilabel_scores(y_true, binarize(y_prob, thresholds)))
    results.update(affect_errors(affect_true, affect_pred, low=low, high=high, raw_true=raw_true))
    return {key: float(results[key]) for key in EVALUATION_KEYS}


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


def affect_sample_error(affect_true: ArrayLike, affect_pred: ArrayLike) -> np.ndarray:
    """Mean absolute valence/arousal error of each sample (in the inputs' units), shape ``(n,)``.

    A row whose target is masked (NaN, see :func:`emonet.annotations.load_annotations`)
    has no error: NaN.

    Examples
    --------
    >>> affect_sample_error([[0.0, 0.5], [np.nan, np.nan]], [[0.5, 0.5], [0.0, 0.0]])
    array([0.25,  nan])
    """
    affect_true = _check_affect_pair(affect_true, "affect_true")
    affect_pred = _check_finite_2d(affect_pred, "affect_pred")
    if affect_pred.shape != affect_true.shape:
        raise ValueError(
            f"affect_true and affect_pred must both be (n_samples, 2), got {affect_true.shape} and {affect_pred.shape}"
        )
    return np.abs(affect_pred - affect_true).mean(axis=1)


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


def _group_emotion_scores(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray
) -> tuple[float, float, float]:
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
