"""Which samples a review shows and in what order: per-sample scores, the ranking and the
one-row-per-sample table the drawings and the HTML page are made from."""

from __future__ import annotations

import numpy as np
import pandas as pd

from emonet.data.annotations import raw_affect
from emonet.data.normalize import AffectNormalizer
from emonet.inference.predictor import PROB_COLUMNS
from emonet.metrics import affect_sample_error, binarize, confidence_score, sample_f1_score
from emonet.schema import AFFECT_NORM_COLUMNS, EMOTIONS, FACE_VISIBILITY_COLUMN

__all__ = ["SORT_OPTIONS", "build_table", "check_sort_by", "rank_samples"]

SORT_OPTIONS: tuple[str, ...] = ("random", "best", "worst", "confidence")


def check_sort_by(sort_by: str) -> None:
    if sort_by not in SORT_OPTIONS:
        raise ValueError(f"unknown sort_by {sort_by!r}; expected one of {list(SORT_OPTIONS)}")


def rank_samples(
    sort_by: str,
    f1: np.ndarray,
    va_error: np.ndarray,
    confidence: np.ndarray,
    seed: int = 0,
) -> np.ndarray:
    """The review order of the samples: indices, first shown first.

    Parameters
    ----------
    sort_by :
        - ``"random"``: a permutation drawn with ``numpy.random.default_rng(seed)``;
        - ``"best"``: highest per-sample F1 first; equal F1 goes to the lower
          valence/arousal error (``va_error``) first;
        - ``"worst"``: the exact reverse of ``"best"``: lowest F1 first, and among
          equal F1 the larger valence/arousal error first;
        - ``"confidence"``: highest ``confidence`` first (most decided model).

        Remaining ties keep the split's row order.
    f1, va_error, confidence : per-sample arrays of shape ``(n,)`` (see
        :func:`sample_f1_score`, :func:`affect_sample_error`, :func:`confidence_score`).
    seed : seeds ``"random"``; the other orders do not depend on it.

    Returns
    -------
    ndarray of int64, shape (n,)

    Raises
    ------
    ValueError
        An unknown ``sort_by`` (the options are listed) or arrays of different lengths.

    Examples
    --------
    >>> rank_samples("best", np.array([0.5, 1.0, 0.5]), np.array([0.3, 0.2, 0.1]), np.zeros(3)).tolist()
    [1, 2, 0]
    """
    check_sort_by(sort_by)
    f1, va_error, confidence = (np.asarray(a, dtype=np.float64) for a in (f1, va_error, confidence))
    n = len(f1)
    if va_error.shape != (n,) or confidence.shape != (n,):
        raise ValueError(
            f"f1, va_error and confidence must have one value per sample, got "
            f"{f1.shape}, {va_error.shape}, {confidence.shape}"
        )
    index = np.arange(n)
    if sort_by == "random":
        return np.random.default_rng(seed).permutation(n)
    if sort_by == "best":
        # np.lexsort sorts by the LAST key first.
        return np.lexsort((index, va_error, -f1))
    if sort_by == "worst":
        return np.lexsort((index, -va_error, f1))
    return np.lexsort((index, -confidence))


def _affect_truth(annotations: pd.DataFrame, normalizer: AffectNormalizer) -> tuple[np.ndarray, np.ndarray]:
    """True valence/arousal on [-1, 1] and on the 1..10 scale, each ``(N, 2)``."""
    raw = raw_affect(annotations)
    if all(column in annotations.columns for column in AFFECT_NORM_COLUMNS):
        norm = annotations[list(AFFECT_NORM_COLUMNS)].to_numpy(dtype=np.float64)
    else:
        norm, _ = normalizer.transform(raw)
    return norm, raw


def _csv_rows(annotations: pd.DataFrame) -> np.ndarray:
    """0-based data rows of the CSV for the validated frame (load_annotations may drop rows)."""
    rejected = {int(r["row"]) for r in annotations.attrs.get("rejected", [])}
    total = len(annotations) + len(rejected)
    return np.array([i for i in range(total) if i not in rejected], dtype=np.int64)


def _names(mask: np.ndarray, order: np.ndarray | None = None) -> list[str]:
    indices = np.flatnonzero(mask)
    if order is not None:
        indices = indices[np.argsort(-order[indices], kind="stable")]
    return [EMOTIONS[j] for j in indices]


def build_table(
    annotations: pd.DataFrame,
    probs: np.ndarray,
    affect_pred: np.ndarray,
    thresholds: np.ndarray,
    normalizer: AffectNormalizer,
    sort_by: str,
    seed: int,
    num_samples: int,
    detailed: int,
) -> tuple[pd.DataFrame, np.ndarray]:
    y_true = annotations[list(EMOTIONS)].to_numpy(dtype=np.int64)  # (N, 26)
    y_pred = binarize(probs, thresholds)  # (N, 26)
    true_norm, true_raw = _affect_truth(annotations, normalizer)
    pred_raw = normalizer.inverse_transform(affect_pred)
    f1 = sample_f1_score(y_true, y_pred)
    va_error = affect_sample_error(true_norm, affect_pred)
    confidence = confidence_score(probs, thresholds)
    order = rank_samples(sort_by, f1, va_error, confidence, seed)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)

    table = pd.DataFrame(
        {
            "rank": rank,
            "selected": rank <= num_samples,
            "detailed": rank <= detailed,
            "csv_row": _csv_rows(annotations),
            "crop_name": annotations["Crop_name"].astype(str).to_numpy(),
            "arr_name": annotations["Arr_name"].astype(str).to_numpy(),
            "filename": annotations["Filename"].astype(str).to_numpy(),
        }
    )
    table[list(PROB_COLUMNS)] = probs.astype(np.float64)
    table["pred_emotions"] = [";".join(_names(row, p)) for row, p in zip(y_pred, probs)]
    table["true_emotions"] = [";".join(_names(row)) for row in y_true]
    table["n_pred"] = y_pred.sum(axis=1)
    table["n_true"] = y_true.sum(axis=1)
    table["n_correct"] = (y_true & y_pred).sum(axis=1)
    table["f1"] = f1
    affect_pred = affect_pred.astype(np.float64)
    table["valence_pred"], table["arousal_pred"] = affect_pred[:, 0], affect_pred[:, 1]
    table["valence_true"], table["arousal_true"] = true_norm[:, 0], true_norm[:, 1]
    table["valence_pred_1_10"], table["arousal_pred_1_10"] = pred_raw[:, 0], pred_raw[:, 1]
    table["valence_true_1_10"], table["arousal_true_1_10"] = true_raw[:, 0], true_raw[:, 1]
    table["va_error"] = va_error
    table["confidence"] = confidence
    if FACE_VISIBILITY_COLUMN in annotations.columns:
        table[FACE_VISIBILITY_COLUMN] = pd.to_numeric(annotations[FACE_VISIBILITY_COLUMN], errors="coerce").to_numpy()
    table["sample_page"] = ""
    return table, y_true
