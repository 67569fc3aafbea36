"""Average precision under the two protocols EMOTIC results are reported with:
scikit-learn's step-wise AP (this project's ``mAP``) and the EMOTIC authors' 11-point
interpolated AP (``mAP_voc11``), and the resampling engine that scores both on weighted
copies of the rows (the bootstrap's too)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score

from emonet.metrics._checks import _default_labels, _warn_undefined_ap, check_multilabel

__all__ = [
    "mean_average_precision_score",
    "mean_voc11_average_precision_score",
    "per_label_average_precision",
    "resampled_average_precision",
    "voc11_average_precision_score",
]


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
    (:mod:`emonet.metrics.bootstrap`): row ``i`` counts ``counts[b, i]`` times in copy ``b``, so
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
    return _voc11(y_true[:, 0], y_score[:, 0])


def _voc11(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """The 11-point AP of one checked label, on its rows as they are (one resample of weight 1)."""
    return float(resampled_average_precision(y_true, y_score, np.ones((1, len(y_true)), dtype=np.int64))[1][0])


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
    aps = [_voc11(y_true[:, j], y_prob[:, j]) for j in np.flatnonzero(defined)]
    return float(np.mean(aps))


def per_label_average_precision(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both APs of every label: scikit-learn's and :func:`voc11_average_precision_score`.

    Parameters
    ----------
    y_true, y_prob : ndarray of shape (n_samples, n_labels)
        Inputs already checked with :func:`~emonet.metrics.check_multilabel`.

    Returns
    -------
    average_precision, average_precision_voc11 : ndarray of float64, shape (n_labels,)
        NaN for a label with no positive sample; warning about those is the caller's.

    Examples
    --------
    >>> per_label_average_precision(np.array([[1, 0], [0, 0], [1, 0]]), np.array([[0.9, 0.4], [0.4, 0.8], [0.6, 0.3]]))
    (array([ 1., nan]), array([ 1., nan]))
    """
    step = np.full(y_true.shape[1], np.nan)
    voc11 = np.full(y_true.shape[1], np.nan)
    for j in np.flatnonzero(y_true.sum(axis=0) > 0):
        step[j] = average_precision_score(y_true[:, j], y_prob[:, j])
        voc11[j] = _voc11(y_true[:, j], y_prob[:, j])
    return step, voc11
