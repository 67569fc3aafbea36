"""Batch inference with a trained EmoNet checkpoint: image decoding, emotion probabilities
with per-emotion thresholds, and valence/arousal on both the model's and the 1..10 scale."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from emonet.config import EmoNetConfig
from emonet.data.normalize import AffectNormalizer, load_normalizer
from emonet.inference.loop import ImageInputs, Predictions, RowReader, eval_transform, predict_split
from emonet.inference.onnx_runtime import OnnxModel, resolve_runtime
from emonet.models.checkpoint import load_checkpoint, read_checkpoint, stored_config
from emonet.models.encoders import stream_preprocessing
from emonet.models.network import EmoNet
from emonet.schema import EMOTIONS, NUM_EMOTIONS

logger = logging.getLogger(__name__)

__all__ = [
    "AFFECT_OUTPUT_COLUMNS",
    "EMOTIONS_COLUMN",
    "OUTPUT_COLUMNS",
    "PROB_COLUMNS",
    "Predictor",
    "prob_column",
]

DEFAULT_THRESHOLD = 0.5  # used when a checkpoint carries no tuned thresholds


def prob_column(emotion: str) -> str:
    """Name of the output column holding ``emotion``'s probability, e.g. ``prob_Peace``."""
    return f"prob_{emotion}"


PROB_COLUMNS: tuple[str, ...] = tuple(prob_column(emotion) for emotion in EMOTIONS)
EMOTIONS_COLUMN = "emotions"
AFFECT_OUTPUT_COLUMNS: tuple[str, ...] = ("valence", "arousal", "valence_1_10", "arousal_1_10")
# The columns of Predictor.predict_frame and of the MLflow model's predictions, in order.
OUTPUT_COLUMNS: tuple[str, ...] = PROB_COLUMNS + (EMOTIONS_COLUMN,) + AFFECT_OUTPUT_COLUMNS


# --------------------------------------------------------------------------- predictor


class Predictor:
    """A trained EmoNet ready for inference on body crops (and full images for ``body_context``).

    Parameters
    ----------
    model : the network, or its ONNX export run by ONNX Runtime
        (:class:`~emonet.inference.onnx_runtime.OnnxModel`, on the CPU); put in eval mode
        and moved to ``device``.
    config : the run config the model was trained with (input sizes come from it).
    thresholds : per-emotion decision thresholds ``(26,)`` in paper order; None gives 0.5.
    normalizer : maps valence/arousal from [-1, 1] back to the 1..10 scale; None uses the
        scale's own bounds.
    device : where the model runs.
    batch_size : images per forward pass.

    Examples
    --------
    >>> predictor = Predictor.from_checkpoint("checkpoints/best.pt")  # doctest: +SKIP
    >>> predictor.predict_frame([read_image("crop.png")])[["emotions", "valence_1_10"]]  # doctest: +SKIP
    """

    def __init__(
        self,
        model: EmoNet | OnnxModel,
        config: EmoNetConfig,
        thresholds: Sequence[float] | np.ndarray | None = None,
        normalizer: AffectNormalizer | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if thresholds is None:
            thresholds = np.full(NUM_EMOTIONS, DEFAULT_THRESHOLD)
        thresholds = np.asarray(thresholds, dtype=np.float64)
        if thresholds.shape != (NUM_EMOTIONS,) or not np.all(np.isfinite(thresholds)):
            raise ValueError(f"thresholds must be {NUM_EMOTIONS} finite floats, got shape {thresholds.shape}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.thresholds = thresholds
        self.normalizer = normalizer if normalizer is not None else AffectNormalizer()
        self.batch_size = batch_size
        self.variant = getattr(model, "variant", config.model.variant)
        # "torch", "onnxruntime" or "onnxruntime-int8": what runs the forward pass (the
        # preprocessing is the same).
        self.runtime = model.runtime if isinstance(model, OnnxModel) else "torch"
        self.image_size = stream_preprocessing(config)[0].size
        self.transform = eval_transform(config)

    @property
    def needs_context(self) -> bool:
        """Whether the model also takes the full image (the ``body_context`` variant)."""
        return self.config.model.uses_context

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        normalizer: AffectNormalizer | str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        *,
        onnx_path: str | Path | None = None,
        runtime: str = "torch",
        threads: int | None = None,
    ) -> Predictor:
        """Load a checkpoint written by :func:`emonet.training.trainer.fit` (e.g. ``best.pt``).

        Parameters
        ----------
        path : the checkpoint; the model is rebuilt from the config stored in it, and its
            ``thresholds`` (tuned on validation) are used, or 0.5 when it has none.
        normalizer : an :class:`~emonet.data.normalize.AffectNormalizer`, or the path of the
            ``normalization.json`` written by the normalization step; None uses the
            1..10 scale bounds.
        device, batch_size : see :class:`Predictor`.
        onnx_path : the checkpoint's ONNX export (:func:`emonet.models.onnx_export.export_onnx`),
            if it has one (its INT8 copy with ``runtime="onnxruntime-int8"``).
        runtime : ``"torch"`` (default), ``"onnxruntime"`` or ``"onnxruntime-int8"`` (need
            ``onnx_path`` and the CPU) or ``"auto"`` (ONNX Runtime when it can): see
            :func:`~emonet.inference.onnx_runtime.resolve_runtime`. With ONNX Runtime the
            torch network is not built: the checkpoint gives the config and thresholds.
        threads : ONNX Runtime's intra-op threads; None follows ``torch.get_num_threads()``.

        Raises
        ------
        FileNotFoundError
            No checkpoint or normalization file at the given path.
        ValueError
            The file is not an EmoNet checkpoint, its thresholds are malformed, or
            ``runtime`` cannot be had (its message says why).
        """
        if resolve_runtime(runtime, onnx_path, device) != "torch":
            assert onnx_path is not None
            checkpoint = read_checkpoint(path, mmap=True)  # the weights are the export's: never read
            config = stored_config(checkpoint, path)
            model: EmoNet | OnnxModel = OnnxModel(onnx_path, config.model, threads=threads)
        else:
            model, config, checkpoint = load_checkpoint(path, map_location=device)
        thresholds = checkpoint.get("thresholds")
        if thresholds is None:
            logger.warning("%s holds no tuned thresholds; using %.1f for every emotion", path, DEFAULT_THRESHOLD)
        return cls(model, config, thresholds, load_normalizer(normalizer), device=device, batch_size=batch_size)

    # ------------------------------------------------------------------ prediction

    def inputs(self, read: RowReader, length: int) -> ImageInputs:
        """A dataset of ``length`` input rows read by ``read(row) -> (crop, context)``,
        preprocessed for this model (see :class:`~emonet.inference.loop.ImageInputs`)."""
        return ImageInputs(read, length, self.transform, with_context=self.needs_context)

    def predict(
        self, data: Dataset, progress: bool = False, desc: str = "predict", *, features: bool = False
    ) -> Predictions:
        """:func:`~emonet.inference.loop.predict_split` with this model, device and batch size
        (``features=True`` also returns the pooled trunk features)."""
        return predict_split(
            self.model,
            data,
            batch_size=self.batch_size,
            device=self.device,
            progress=progress,
            desc=desc,
            features=features,
        )

    def predict_proba(
        self, crops: Sequence[np.ndarray], contexts: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Emotion probabilities and valence/arousal for a list of images, batch by batch.

        Parameters
        ----------
        crops : body crops, each ``H x W x 3`` uint8 RGB of any size.
        contexts : the full image of every crop; required by ``body_context`` models.

        Returns
        -------
        probs : float32 ``(N, 26)`` in [0, 1], columns in ``schema.EMOTIONS`` order.
        affect : float32 ``(N, 2)`` valence and arousal in [-1, 1].

        Raises
        ------
        ValueError
            A malformed image (its row is named), or missing contexts for ``body_context``.
        """
        if not self.needs_context and contexts is not None:
            logger.debug("contexts ignored: the body model uses the crop only")
            contexts = None
        dataset = ImageInputs.from_arrays(
            list(crops), list(contexts) if contexts is not None else None, self.transform, self.needs_context
        )
        if len(dataset) == 0:
            return np.empty((0, NUM_EMOTIONS), dtype=np.float32), np.empty((0, 2), dtype=np.float32)
        predictions = self.predict(dataset)
        return predictions.emotion_prob, predictions.affect_pred

    def to_frame(self, probs: np.ndarray, affect: np.ndarray) -> pd.DataFrame:
        """The output table of :meth:`predict_frame` from model outputs.

        Columns: ``prob_<Emotion>`` for the 26 emotions in paper order; ``emotions``, the
        names whose probability reaches their threshold, joined by ``;`` in paper
        order (``""`` if none); ``valence``, ``arousal`` in [-1, 1]; ``valence_1_10``,
        ``arousal_1_10`` on the EMOTIC scale via the normalizer.
        """
        probs = np.asarray(probs, dtype=np.float64)
        affect = np.asarray(affect, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != NUM_EMOTIONS or affect.shape != (probs.shape[0], 2):
            raise ValueError(
                f"expected probs (N, {NUM_EMOTIONS}) and affect (N, 2), got {probs.shape} and {affect.shape}"
            )
        frame = pd.DataFrame(probs, columns=list(PROB_COLUMNS))
        positive = probs >= self.thresholds[None, :]  # (N, 26), >= as in metrics.binarize
        names = np.array(EMOTIONS, dtype=object)
        frame[EMOTIONS_COLUMN] = [";".join(names[mask]) for mask in positive]
        frame["valence"], frame["arousal"] = affect[:, 0], affect[:, 1]
        scaled = self.normalizer.inverse_transform(affect) if len(affect) else np.empty((0, 2))
        frame["valence_1_10"], frame["arousal_1_10"] = scaled[:, 0], scaled[:, 1]
        return frame

    def predict_frame(self, crops: Sequence[np.ndarray], contexts: Sequence[np.ndarray] | None = None) -> pd.DataFrame:
        """Predictions as a table with one row per crop (columns in :data:`OUTPUT_COLUMNS`)."""
        return self.to_frame(*self.predict_proba(crops, contexts))
