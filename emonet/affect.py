"""The one definition of the valence/arousal scale map: ``[low, high]`` <-> ``[-1, 1]``.

The EMOTIC annotations use a 1..10 scale; the model's tanh head predicts [-1, 1].
Normalization, the dataset's targets and the 1..10 errors all use these two functions.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from emonet.schema import SCALE_MAX, SCALE_MIN


def to_unit_range(values: ArrayLike, low: ArrayLike = SCALE_MIN, high: ArrayLike = SCALE_MAX) -> np.ndarray:
    """``2 * (x - low) / (high - low) - 1``: the scale's bounds map to -1 and 1 (not clipped).

    ``low``/``high`` broadcast against the last axis, e.g. one bound per (valence, arousal).

    Examples
    --------
    >>> to_unit_range([1.0, 5.5, 10.0]).tolist()
    [-1.0, 0.0, 1.0]
    """
    values, low, high = (np.asarray(x, dtype=np.float64) for x in (values, low, high))
    return 2.0 * (values - low) / (high - low) - 1.0


def from_unit_range(values: ArrayLike, low: ArrayLike = SCALE_MIN, high: ArrayLike = SCALE_MAX) -> np.ndarray:
    """The inverse of :func:`to_unit_range`: ``(x + 1) / 2 * (high - low) + low``.

    Examples
    --------
    >>> from_unit_range([-1.0, 0.0, 1.0]).tolist()
    [1.0, 5.5, 10.0]
    """
    values, low, high = (np.asarray(x, dtype=np.float64) for x in (values, low, high))
    return (values + 1.0) / 2.0 * (high - low) + low
