"""One pass of a batch (or of the reference split) through the model: its signal table and features.

Each row is read once for its input signals and face visibility; a row that cannot be
read is named, skipped and counted (as ``emonet predict --on-error skip`` does). The
readable rows then go through the one prediction loop
(:meth:`emonet.inference.predictor.Predictor.predict`), which also returns the pooled
trunk features. The decoded images are kept for that second pass up to
``KEPT_IMAGE_BYTES``; beyond it, the rest are decoded again (a 1,000-crop batch of
EMOTIC-sized crops fits).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from emonet.data.face_visibility import thread_scorer
from emonet.data.images import check_image
from emonet.inference.predictor import Predictor
from emonet.monitoring.batches import MonitoringBatch
from emonet.monitoring.signals import image_signals, signal_table

logger = logging.getLogger(__name__)

__all__ = ["ScoredBatch", "score_batch"]

# Reasons kept by name; the count covers every skipped row.
_NAMED_SKIPS = 20
# Decoded images kept from the input pass for the network's (decoding a PNG costs about a
# fifth of the demo network's time per crop); past this budget rows are read again.
KEPT_IMAGE_BYTES = 512 * 2**20


@dataclass(frozen=True, eq=False)
class ScoredBatch:
    """The signals, features and outputs of a batch's readable rows, and what was skipped."""

    table: pd.DataFrame  # one row of signals per scored crop (signals.SIGNALS columns)
    features: np.ndarray  # (N, F) float32 pooled trunk features
    emotion_prob: np.ndarray  # (N, 26)
    labels: np.ndarray | None  # (N, 26) when the batch is labelled
    names: list[str]  # the scored rows' names
    skipped: int = 0
    skip_reasons: dict[str, str] = field(default_factory=dict)  # the first ones, by row name
    seconds: dict[str, float] = field(default_factory=dict)  # "inputs" and "network"

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class _InputPass:
    good: list[int]  # the readable rows
    inputs: np.ndarray  # (N, 4) image signals
    faces: np.ndarray  # (N,) face visibility
    kept: list[tuple[np.ndarray, np.ndarray | None]]  # the first readable rows' images, within the budget
    skipped: int
    reasons: dict[str, str]


def _input_pass(
    batch: MonitoringBatch, rows: np.ndarray, face_landmarker: str | Path | None, progress: bool
) -> _InputPass:
    """Read each row once: input signals and face visibility of the readable ones."""
    scorer = thread_scorer(face_landmarker) if batch.face_visibility is None else None
    good: list[int] = []
    kept: list[tuple[np.ndarray, np.ndarray | None]] = []
    kept_bytes = 0
    inputs: list[tuple[float, float, int, int]] = []
    faces: list[float] = []
    skipped, reasons = 0, {}
    for row in tqdm(rows, desc="monitor: inputs", unit="crop", leave=False, disable=not progress):
        row = int(row)
        try:
            crop, context = batch.read(row)
            crop = check_image(crop, "crop")  # a malformed array is skipped here, not raised mid-batch
            if context is not None:
                check_image(context, "context")
            inputs.append(image_signals(crop))
            faces.append(scorer(crop) if scorer is not None else float(batch.face_visibility[row]))
            size = crop.nbytes + (context.nbytes if context is not None else 0)
            if len(kept) == len(good) and kept_bytes + size <= KEPT_IMAGE_BYTES:
                kept.append((crop, context))
                kept_bytes += size
        except (OSError, ValueError) as error:
            if len(inputs) > len(faces):  # read, but the face scorer refused it
                inputs.pop()
            skipped += 1
            if len(reasons) < _NAMED_SKIPS:
                reasons[batch.names[row]] = str(error) or type(error).__name__
            logger.warning("skipped %s: %s", batch.names[row], error)
            continue
        good.append(row)
    return _InputPass(good, np.array(inputs, dtype=np.float64).reshape(-1, 4), np.array(faces), kept, skipped, reasons)


def score_batch(
    predictor: Predictor,
    batch: MonitoringBatch,
    *,
    rows: np.ndarray | None = None,
    face_landmarker: str | Path | None = None,
    progress: bool = False,
) -> ScoredBatch:
    """Signals and features of ``batch`` (or of its ``rows``) with ``predictor``.

    Face visibility is the batch's ``Face_Visibility`` column when it has one, else
    MediaPipe's face landmarker scores each crop (:func:`emonet.data.face_visibility.thread_scorer`).

    Raises
    ------
    ValueError
        No row could be read (the first reasons are named).
    """
    rows = np.arange(len(batch)) if rows is None else np.asarray(rows)
    started = time.perf_counter()
    passed = _input_pass(batch, rows, face_landmarker, progress)
    read_seconds = time.perf_counter() - started
    good, kept = passed.good, passed.kept
    if not good:
        shown = "; ".join(f"{name}: {reason}" for name, reason in list(passed.reasons.items())[:3])
        raise ValueError(f"none of the {len(rows)} crops of {batch.source} could be read ({shown})")
    started = time.perf_counter()
    dataset = predictor.inputs(lambda i: kept[i] if i < len(kept) else batch.read(good[i]), len(good))
    predictions = predictor.predict(dataset, progress=progress, desc="monitor: model", features=True)
    network_seconds = time.perf_counter() - started
    assert predictions.features is not None
    kept.clear()  # the decoded images are no longer needed
    probs, affect = predictions.emotion_prob, predictions.affect_pred
    table = signal_table(passed.inputs, passed.faces, probs, affect, predictor.thresholds)
    return ScoredBatch(
        table=table,
        features=predictions.features,
        emotion_prob=predictions.emotion_prob,
        labels=batch.labels[good] if batch.labels is not None else None,
        names=[batch.names[row] for row in good],
        skipped=passed.skipped,
        skip_reasons=passed.reasons,
        seconds={"inputs": read_seconds, "network": network_seconds},
    )
