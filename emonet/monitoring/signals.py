"""What monitoring compares: one row of signals per crop, from its pixels and the model's outputs.

A signal is a column of the table :func:`signal_table` builds, for the reference (the
model's validation split) and for every monitored batch alike:

- **inputs**: ``brightness`` and ``contrast`` (mean and standard deviation of the
  crop's luma, 0-255), ``height`` and ``width`` (pixels), ``face_visibility`` (the
  share of face landmarks inside the crop, 0-100, as the data step computes it) and
  ``face_class`` (``none``, ``partial`` or ``whole``);
- **outputs**: ``prob_<Emotion>`` (each emotion's predicted probability),
  ``positive_<Emotion>`` (1 where it reaches the model's tuned threshold: the predicted
  positive rate), ``valence`` and ``arousal`` (in [-1, 1]).

The model's penultimate features are compared apart (:func:`emonet.monitoring.drift.embedding_drift`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from emonet.schema import EMOTIONS, NUM_EMOTIONS

__all__ = [
    "FACE_CLASSES",
    "SIGNALS",
    "Signal",
    "face_classes",
    "image_signals",
    "signal_table",
]

# Rec. 601 luma, the weights Pillow's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
FACE_CLASSES: tuple[str, ...] = ("none", "partial", "whole")


@dataclass(frozen=True)
class Signal:
    """One monitored column: its name, ``input`` or ``output``, and its kind.

    ``numeric`` columns are compared with the two-sample Kolmogorov-Smirnov test,
    ``categorical`` ones (face classes, predicted positives) with the chi-square test of
    homogeneity (:mod:`emonet.monitoring.drift`).
    """

    name: str
    group: str
    kind: str


SIGNALS: tuple[Signal, ...] = (
    Signal("brightness", "input", "numeric"),
    Signal("contrast", "input", "numeric"),
    Signal("height", "input", "numeric"),
    Signal("width", "input", "numeric"),
    Signal("face_visibility", "input", "numeric"),
    Signal("face_class", "input", "categorical"),
    *(Signal(f"prob_{emotion}", "output", "numeric") for emotion in EMOTIONS),
    *(Signal(f"positive_{emotion}", "output", "categorical") for emotion in EMOTIONS),
    Signal("valence", "output", "numeric"),
    Signal("arousal", "output", "numeric"),
)


def image_signals(crop: np.ndarray) -> tuple[float, float, int, int]:
    """``(brightness, contrast, height, width)`` of an ``H x W x 3`` uint8 crop.

    Brightness and contrast are the mean and standard deviation of its luma (0-255).
    Crops over 256 px a side are measured on every ``k``-th pixel, which moves neither
    statistic by more than sampling noise and keeps a 4k crop cheap.
    """
    height, width = int(crop.shape[0]), int(crop.shape[1])
    step = max(1, max(height, width) // 256)
    luma = np.asarray(crop[::step, ::step], dtype=np.float32) @ _LUMA  # (h, w)
    return float(luma.mean()), float(luma.std()), height, width


def face_classes(scores: np.ndarray) -> np.ndarray:
    """``none`` (score 0), ``whole`` (100) or ``partial`` (in between) for each face visibility score."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.where(scores <= 0.0, "none", np.where(scores >= 100.0, "whole", "partial")).astype(object)


def signal_table(
    inputs: np.ndarray,
    face_visibility: np.ndarray,
    emotion_prob: np.ndarray,
    affect: np.ndarray,
    thresholds: np.ndarray,
) -> pd.DataFrame:
    """The signals of ``N`` crops, one row each, columns in :data:`SIGNALS` order.

    Parameters
    ----------
    inputs : ``(N, 4)`` brightness, contrast, height, width (:func:`image_signals`).
    face_visibility : ``(N,)`` scores in [0, 100].
    emotion_prob : ``(N, 26)`` probabilities in :data:`emonet.schema.EMOTIONS` order.
    affect : ``(N, 2)`` valence and arousal in [-1, 1].
    thresholds : ``(26,)`` the model's decision thresholds.
    """
    n = len(face_visibility)
    if inputs.shape != (n, 4) or emotion_prob.shape != (n, NUM_EMOTIONS) or affect.shape != (n, 2):
        raise ValueError(
            f"expected inputs (N, 4), emotion_prob (N, {NUM_EMOTIONS}) and affect (N, 2) for N={n}, got "
            f"{inputs.shape}, {emotion_prob.shape} and {affect.shape}"
        )
    columns: dict[str, np.ndarray] = {
        "brightness": inputs[:, 0],
        "contrast": inputs[:, 1],
        "height": inputs[:, 2],
        "width": inputs[:, 3],
        "face_visibility": np.asarray(face_visibility, dtype=np.float64),
        "face_class": face_classes(face_visibility),
    }
    positive = emotion_prob >= np.asarray(thresholds)[None, :]  # >= as the Predictor decides
    for j, emotion in enumerate(EMOTIONS):
        columns[f"prob_{emotion}"] = emotion_prob[:, j].astype(np.float64)
    for j, emotion in enumerate(EMOTIONS):
        columns[f"positive_{emotion}"] = positive[:, j].astype(np.int64)
    columns["valence"], columns["arousal"] = affect[:, 0].astype(np.float64), affect[:, 1].astype(np.float64)
    return pd.DataFrame(columns)
