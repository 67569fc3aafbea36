"""The checks every metric here shares: multi-label targets and scores, thresholds,
label names, (valence, arousal) pairs; each raises a ValueError that names the bad input."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.exceptions import UndefinedMetricWarning

from emonet.schema import EMOTIONS

__all__ = ["check_multilabel"]


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
