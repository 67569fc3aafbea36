"""Confidence intervals for the benchmark metrics: a seeded bootstrap over test rows.

Rows are resampled with replacement and every metric is recomputed on each resample
(the percentile bootstrap). A resample is a row of counts (how many times each row was
drawn), so the average precisions of all resamples come from one ranking per label and
cumulative sums (:func:`emonet.metrics.resampled_average_precision`), not from a loop
that sorts again 1,000 times: 7,000 rows x 26 labels x 1,000 resamples take seconds.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from emonet.metrics import (
    check_multilabel,
    format_metric,
    mean_average_precision_score,
    mean_voc11_average_precision_score,
    resampled_average_precision,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AFFECT_BOOTSTRAP_METRICS",
    "BOOTSTRAP_METRICS",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_RESAMPLES",
    "BootstrapInterval",
    "bootstrap_counts",
    "check_bootstrap_settings",
    "bootstrap_intervals",
    "bootstrap_map_difference",
    "bootstrap_two_samples",
    "paired_bootstrap_map_difference",
    "TwoSampleIntervals",
]

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
# Keys of bootstrap_intervals: both mAPs (0-1 scale) and the affect errors on the 1..10 scale.
AFFECT_BOOTSTRAP_METRICS: tuple[str, ...] = ("mae_valence_1_10", "mae_arousal_1_10")
BOOTSTRAP_METRICS: tuple[str, ...] = ("mAP", "mAP_voc11", *AFFECT_BOOTSTRAP_METRICS)
# Resamples scored together: bounds the (chunk, rows) work arrays (about 6 MB each at 7,000 rows).
_CHUNK = 100

Protocol = Literal["sklearn", "voc11"]


@dataclass(frozen=True)
class BootstrapInterval:
    """A point estimate and its percentile-bootstrap interval.

    ``estimate`` is the metric on the rows as they are (not the mean of the resamples);
    ``low`` and ``high`` are the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    quantiles of the metric over ``n_resamples`` resamples drawn with ``seed``.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n_resamples: int
    seed: int

    def describe(self, spec: str = ".4f", scale: float = 1.0) -> str:
        """``"estimate [low, high]"``, each times ``scale`` in format ``spec`` (``n/a`` where not finite)."""
        return f"{format_metric(scale * self.estimate, spec)} {self.bounds(spec, scale)}"

    def bounds(self, spec: str = ".4f", scale: float = 1.0) -> str:
        """``"[low, high]"``, each times ``scale`` in format ``spec`` (``n/a`` where not finite)."""
        return f"[{format_metric(scale * self.low, spec)}, {format_metric(scale * self.high, spec)}]"


def check_bootstrap_settings(n_resamples: int, confidence: float) -> None:
    """Raise a ValueError naming a bad resample count or confidence level (before any work)."""
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a whole number >= 1, got {n_resamples!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def bootstrap_counts(n_rows: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """How many times each row is drawn in each resample, shape ``(n_resamples, n_rows)``.

    Row ``b`` counts the indices ``np.random.default_rng(seed).integers(0, n_rows,
    size=(n_resamples, n_rows))[b]``: ``n_rows`` draws with replacement per resample.
    Two models scored with the same counts are compared on the same resampled rows.

    Examples
    --------
    >>> bootstrap_counts(4, 2, seed=0).sum(axis=1).tolist()
    [4, 4]
    """
    if n_rows < 1:
        raise ValueError(f"cannot resample {n_rows} rows")
    draws = np.random.default_rng(seed).integers(0, n_rows, size=(n_resamples, n_rows))
    offsets = np.arange(n_resamples)[:, None] * n_rows
    return np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_rows).reshape(n_resamples, n_rows)


def _resampled_map(y_true: np.ndarray, y_prob: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both mAPs of every resample, shape ``(n_resamples,)`` each.

    A label with no positive among a resample's rows has no AP there and is left out of
    that resample's mean, the rule the point estimate applies to the whole split; a
    resample where no label has a positive gets NaN.
    """
    n_resamples, n_labels = counts.shape[0], y_true.shape[1]
    step = np.empty((n_resamples, n_labels))
    voc11 = np.empty((n_resamples, n_labels))
    for start in range(0, n_resamples, _CHUNK):
        chunk = counts[start : start + _CHUNK]
        for j in range(n_labels):
            step[start : start + _CHUNK, j], voc11[start : start + _CHUNK, j] = resampled_average_precision(
                y_true[:, j], y_prob[:, j], chunk
            )
    with warnings.catch_warnings():
        # "Mean of empty slice": a resample with no defined label gets NaN, handled by _interval.
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(step, axis=1), np.nanmean(voc11, axis=1)


def _interval(estimate: float, resampled: np.ndarray, confidence: float, seed: int, name: str) -> BootstrapInterval:
    finite = resampled[np.isfinite(resampled)]
    if len(finite) < len(resampled):
        logger.warning(
            "%s is undefined on %d of %d resamples; the interval uses the other %d",
            name,
            len(resampled) - len(finite),
            len(resampled),
            len(finite),
        )
    if len(finite) == 0:
        low = high = float("nan")
    else:
        tail = 50.0 * (1.0 - confidence)
        low, high = (float(value) for value in np.percentile(finite, [tail, 100.0 - tail]))
    return BootstrapInterval(
        estimate=float(estimate),
        low=low,
        high=high,
        confidence=float(confidence),
        n_resamples=len(resampled),
        seed=int(seed),
    )


def _check_affect_1_10(affect_true: ArrayLike, affect_pred: ArrayLike, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    true = np.asarray(affect_true, dtype=np.float64)
    pred = np.asarray(affect_pred, dtype=np.float64)
    for name, array in (("affect_true", true), ("affect_pred", pred)):
        if array.shape != (n_rows, 2):
            raise ValueError(f"{name} must have shape ({n_rows}, 2) for (valence, arousal), got {array.shape}")
        if np.isinf(array).any():
            raise ValueError(f"{name} holds {int(np.isinf(array).sum())} infinite values")
    if np.isnan(pred).any():
        raise ValueError(f"affect_pred holds {int(np.isnan(pred).sum())} NaN values")
    return true, pred


def bootstrap_intervals(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    affect_true: ArrayLike | None = None,
    affect_pred: ArrayLike | None = None,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, BootstrapInterval]:
    """Percentile-bootstrap intervals of ``mAP``, ``mAP_voc11`` and the 1..10 affect errors.

    Every resample draws ``n_rows`` rows with replacement (:func:`bootstrap_counts`), the
    same rows for every metric. ``mAP`` is scikit-learn's AP averaged over labels
    (:func:`~emonet.metrics.mean_average_precision_score`), ``mAP_voc11`` the EMOTIC
    authors' 11-point AP (:func:`~emonet.metrics.mean_voc11_average_precision_score`); a
    label with no positive among a resample's rows is left out of that resample's mean,
    as a label with no positive is left out of the point estimate. The affect errors are
    mean absolute errors over the resampled rows that have a target (a NaN in
    ``affect_true`` masks a row, as in :func:`~emonet.metrics.affect_errors`).

    On a split of a few dozen rows, resamples often miss an emotion's only positives, so
    their mAPs average over fewer emotions than the estimate does and the interval can
    even lie beside it: read such intervals as a warning that the split is too small.

    Parameters
    ----------
    y_true : array-like of shape (n_samples, n_labels)
        Multi-hot ground truth.
    y_prob : array-like of shape (n_samples, n_labels)
        Predicted probabilities.
    affect_true, affect_pred : array-like of shape (n_samples, 2), optional
        Annotated and predicted (valence, arousal) on the 1..10 scale; both or neither.
        Without them the result has no affect keys.
    n_resamples : int, default=1000
    confidence : float, default=0.95
        The interval's coverage, strictly between 0 and 1.
    seed : int, default=0
        Seed of ``numpy.random.default_rng``; the same seed gives the same interval.

    Returns
    -------
    dict of str to BootstrapInterval
        Keys from ``BOOTSTRAP_METRICS``: ``mAP``, ``mAP_voc11`` and, with affect inputs,
        ``mae_valence_1_10`` and ``mae_arousal_1_10``.

    Raises
    ------
    ValueError
        Bad settings, inputs that fail ``check_multilabel``, or affect arrays of the
        wrong shape.

    Examples
    --------
    >>> result = bootstrap_intervals([[1, 0], [0, 1], [1, 1], [0, 0]] * 5,
    ...                              [[0.9, 0.2], [0.3, 0.8], [0.7, 0.6], [0.1, 0.3]] * 5, n_resamples=50)
    >>> result["mAP"].estimate, result["mAP"].low <= result["mAP"].high
    (1.0, True)
    """
    check_bootstrap_settings(n_resamples, confidence)
    y_true, y_prob = check_multilabel(y_true, y_prob, name="y_prob")
    if (affect_true is None) != (affect_pred is None):
        raise ValueError("pass both affect_true and affect_pred, or neither")
    affect = _check_affect_1_10(affect_true, affect_pred, y_true.shape[0]) if affect_true is not None else None
    counts = bootstrap_counts(y_true.shape[0], n_resamples, seed)
    step, voc11 = _resampled_map(y_true, y_prob, counts)
    results = {
        "mAP": _interval(mean_average_precision_score(y_true, y_prob), step, confidence, seed, "mAP"),
        "mAP_voc11": _interval(
            mean_voc11_average_precision_score(y_true, y_prob), voc11, confidence, seed, "mAP_voc11"
        ),
    }
    if affect is not None:
        true, pred = affect
        used = np.isfinite(true).all(axis=1)  # (N,)
        errors = np.abs(pred[used] - true[used])  # (N_used, 2)
        weights = counts[:, used]  # (B, N_used)
        drawn = weights.sum(axis=1)  # (B,)
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled = (weights @ errors) / drawn[:, None]  # (B, 2); NaN where no row with a target was drawn
            estimate = errors.mean(axis=0) if used.any() else np.full(2, np.nan)
        for column, key in enumerate(AFFECT_BOOTSTRAP_METRICS):
            results[key] = _interval(estimate[column], resampled[:, column], confidence, seed, key)
    return results


def _protocol_score(protocol: str) -> tuple[Callable[..., float], int]:
    """The point-estimate scorer of ``protocol`` and its index in :func:`_resampled_map`'s pair."""
    if protocol not in ("sklearn", "voc11"):
        raise ValueError(f"protocol must be 'sklearn' or 'voc11', got {protocol!r}")
    if protocol == "sklearn":
        return mean_average_precision_score, 0
    return mean_voc11_average_precision_score, 1


def paired_bootstrap_map_difference(
    y_true: ArrayLike,
    y_prob_a: ArrayLike,
    y_prob_b: ArrayLike,
    *,
    protocol: Protocol = "sklearn",
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> BootstrapInterval:
    """mAP of model A minus mAP of model B on the same rows, with a paired-bootstrap interval.

    Both models are scored on the same resampled rows in every resample, so what the rows
    share (hard and easy samples) cancels and the interval measures the difference
    between the models, not the noise of each. Promotion reads it as: A is better when
    the interval's lower end exceeds the required margin.

    Parameters
    ----------
    y_true : array-like of shape (n_samples, n_labels)
        Multi-hot ground truth of the rows both models scored.
    y_prob_a, y_prob_b : array-like of shape (n_samples, n_labels)
        Each model's probabilities for the same rows, in the same order.
    protocol : {"sklearn", "voc11"}, default="sklearn"
        ``"sklearn"`` compares ``mAP`` (scikit-learn's AP), ``"voc11"`` ``mAP_voc11``.
    n_resamples, confidence, seed
        As in :func:`bootstrap_intervals`.

    Returns
    -------
    BootstrapInterval
        ``estimate`` is mAP(A) - mAP(B) on the rows as they are (0-1 scale); a model
        compared with itself gives exactly 0 with the interval [0, 0].

    Examples
    --------
    >>> y = [[1, 0], [0, 1], [1, 1], [0, 0]] * 5
    >>> good = [[0.9, 0.2], [0.3, 0.8], [0.7, 0.6], [0.1, 0.3]] * 5
    >>> paired_bootstrap_map_difference(y, good, good, n_resamples=20).high
    0.0
    """
    check_bootstrap_settings(n_resamples, confidence)
    score, which = _protocol_score(protocol)
    y_true, y_prob_a = check_multilabel(y_true, y_prob_a, name="y_prob_a")
    _, y_prob_b = check_multilabel(y_true, y_prob_b, name="y_prob_b")
    counts = bootstrap_counts(y_true.shape[0], n_resamples, seed)
    resampled = _resampled_map(y_true, y_prob_a, counts)[which] - _resampled_map(y_true, y_prob_b, counts)[which]
    estimate = score(y_true, y_prob_a) - score(y_true, y_prob_b)
    return _interval(estimate, resampled, confidence, seed, f"mAP difference ({protocol})")


def bootstrap_map_difference(
    y_true_a: ArrayLike,
    y_prob_a: ArrayLike,
    y_true_b: ArrayLike,
    y_prob_b: ArrayLike,
    *,
    protocol: Protocol = "sklearn",
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> BootstrapInterval:
    """mAP on rows A minus mAP on other rows B, with an interval from independent resamples.

    The unpaired counterpart of :func:`paired_bootstrap_map_difference`: A and B are
    different samples (a new labelled batch and the reference split), so each resample
    draws A's rows and B's rows independently and the interval carries the noise of
    both. Monitoring reads it as: performance degraded when the interval's upper end is
    below zero.

    Parameters
    ----------
    y_true_a, y_prob_a : array-like of shape (n_a, n_labels)
        Ground truth and probabilities of sample A.
    y_true_b, y_prob_b : array-like of shape (n_b, n_labels)
        The same for sample B (same labels, any number of rows).
    protocol, n_resamples, confidence, seed
        As in :func:`paired_bootstrap_map_difference`; B's resamples use ``seed + 1``.

    Returns
    -------
    BootstrapInterval
        ``estimate`` is mAP(A) - mAP(B) on the rows as they are.

    Examples
    --------
    >>> y = [[1, 0], [0, 1], [1, 1], [0, 0]] * 5
    >>> good = [[0.9, 0.2], [0.3, 0.8], [0.7, 0.6], [0.1, 0.3]] * 5
    >>> bad = [[0.1, 0.8], [0.7, 0.2], [0.3, 0.4], [0.9, 0.7]] * 5
    >>> bootstrap_map_difference(y, bad, y, good, n_resamples=50).high < 0
    True
    """
    _, which = _protocol_score(protocol)
    key = ("mAP", "mAP_voc11")[which]
    return bootstrap_two_samples(
        y_true_a, y_prob_a, y_true_b, y_prob_b, n_resamples=n_resamples, confidence=confidence, seed=seed
    ).difference[key]


@dataclass(frozen=True)
class TwoSampleIntervals:
    """Both mAPs of two samples and A minus B, each keyed ``mAP`` and ``mAP_voc11``."""

    a: dict[str, BootstrapInterval]
    b: dict[str, BootstrapInterval]
    difference: dict[str, BootstrapInterval]


def bootstrap_two_samples(
    y_true_a: ArrayLike,
    y_prob_a: ArrayLike,
    y_true_b: ArrayLike,
    y_prob_b: ArrayLike,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> TwoSampleIntervals:
    """Intervals of both mAPs of samples A and B and of A minus B, from one set of resamples.

    What :func:`bootstrap_map_difference` computes for one protocol, with each sample's
    own intervals read off the same resamples (A's drawn with ``seed``, B's with
    ``seed + 1``), so a monitoring check scores each sample's resamples once.
    """
    check_bootstrap_settings(n_resamples, confidence)
    y_true_a, y_prob_a = check_multilabel(y_true_a, y_prob_a, name="y_prob_a")
    y_true_b, y_prob_b = check_multilabel(y_true_b, y_prob_b, name="y_prob_b")
    if y_true_a.shape[1] != y_true_b.shape[1]:
        raise ValueError(f"A has {y_true_a.shape[1]} labels but B has {y_true_b.shape[1]}")
    result = TwoSampleIntervals({}, {}, {})
    resampled_a = _resampled_map(y_true_a, y_prob_a, bootstrap_counts(y_true_a.shape[0], n_resamples, seed))
    resampled_b = _resampled_map(y_true_b, y_prob_b, bootstrap_counts(y_true_b.shape[0], n_resamples, seed + 1))
    for protocol, key in (("sklearn", "mAP"), ("voc11", "mAP_voc11")):
        score, which = _protocol_score(protocol)
        estimate_a, estimate_b = score(y_true_a, y_prob_a), score(y_true_b, y_prob_b)
        result.a[key] = _interval(estimate_a, resampled_a[which], confidence, seed, key)
        result.b[key] = _interval(estimate_b, resampled_b[which], confidence, seed + 1, key)
        difference = resampled_a[which] - resampled_b[which]
        result.difference[key] = _interval(
            estimate_a - estimate_b, difference, confidence, seed, f"mAP difference ({protocol})"
        )
    return result
