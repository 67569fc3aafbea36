"""Valence/arousal errors, on [-1, 1] and on the annotators' 1..10 scale, over a split
and per sample; rows with a masked (NaN) target are left out."""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import ArrayLike

from emonet.affect import from_unit_range
from emonet.metrics._checks import _check_affect_pair, _check_bounds, _check_finite_2d
from emonet.schema import SCALE_MAX, SCALE_MIN

logger = logging.getLogger(__name__)

__all__ = ["affect_errors", "affect_sample_error"]


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
    :func:`~emonet.data.annotations.load_annotations`) are left out of every error; how
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
        return {
            "mae_valence": nan,
            "mae_arousal": nan,
            "mae_valence_1_10": nan,
            "mae_arousal_1_10": nan,
            "n_affect": 0.0,
        }

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


def affect_sample_error(affect_true: ArrayLike, affect_pred: ArrayLike) -> np.ndarray:
    """Mean absolute valence/arousal error of each sample (in the inputs' units), shape ``(n,)``.

    A row whose target is masked (NaN, see :func:`emonet.data.annotations.load_annotations`)
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
