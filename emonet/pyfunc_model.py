"""EmoNet as an MLflow pyfunc model, logged "from code": MLflow runs this file to build the
model, whose artifacts are a checkpoint and the affect normalization (see emonet.tracking)."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from emonet.checkpoint import resolve_device
from emonet.images import decode_image_b64, read_image
from emonet.inference import Predictor
from emonet.schema import NUM_EMOTIONS

logger = logging.getLogger(__name__)

# Input columns: a file path (.npy/.png/.jpg) or a base64 PNG/JPEG (for REST clients),
# per row; the context columns carry the full image for the body_context variant.
IMAGE_PATH = "image_path"
IMAGE_B64 = "image_b64"
CONTEXT_PATH = "context_path"
CONTEXT_B64 = "context_b64"
INPUT_COLUMNS: tuple[str, ...] = (IMAGE_PATH, IMAGE_B64, CONTEXT_PATH, CONTEXT_B64)

# Names of the model's artifacts (as emonet.tracking logs them).
CHECKPOINT_ARTIFACT = "checkpoint"
NORMALIZATION_ARTIFACT = "normalization"


class InvalidModelInput(MlflowException, ValueError):
    """A bad input row: a ``ValueError`` for Python callers, and an MLflow
    ``INVALID_PARAMETER_VALUE`` so the scoring server answers 400 with this message
    (for any other exception it hides the message behind a generic one)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _is_missing(value: object) -> bool:
    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(pd.isna(value))  # None, NaN, pd.NA
    except (TypeError, ValueError):  # array-likes: not a missing scalar
        return False


def _present(frame: pd.DataFrame, path_column: str, b64_column: str, what: str) -> tuple[str | None, str | None]:
    path_col = path_column if path_column in frame.columns else None
    b64_col = b64_column if b64_column in frame.columns else None
    if path_col is None and b64_col is None:
        raise InvalidModelInput(
            f"model input needs a {path_column!r} or {b64_column!r} column ({what}); got columns {list(frame.columns)}"
        )
    return path_col, b64_col


def _decode_cell(frame: pd.DataFrame, path_col: str | None, b64_col: str | None, row: int, what: str) -> np.ndarray:
    """Decode one row's image; its path wins over its base64 when both are set."""
    path = frame[path_col].iat[row] if path_col is not None else None
    blob = frame[b64_col].iat[row] if b64_col is not None else None
    try:
        if not _is_missing(path):
            if not isinstance(path, str):
                raise ValueError(f"{path_col} must be a string, got {type(path).__name__}")
            return read_image(path)
        if not _is_missing(blob):
            return decode_image_b64(blob)
        given = " or ".join(c for c in (path_col, b64_col) if c is not None)
        raise ValueError(f"no {what} given: {given} is empty")
    except (ValueError, FileNotFoundError) as error:
        raise InvalidModelInput(f"row {row}: {error}") from None


class EmoNetPyfunc(mlflow.pyfunc.PythonModel):
    """Predict emotions and valence/arousal for a table of body crops.

    Input: a DataFrame with ``image_path`` (paths to ``.npy``/``.png``/``.jpg`` crops
    readable by the serving process) and/or ``image_b64`` (base64 PNG/JPEG); the
    ``body_context`` variant also needs ``context_path``/``context_b64``. Output: one
    row per input row, with the columns of :data:`emonet.inference.OUTPUT_COLUMNS`
    (``prob_<Emotion>`` x 26, ``emotions``, ``valence``, ``arousal``,
    ``valence_1_10``, ``arousal_1_10``). Rows are decoded and predicted one batch at
    a time, so memory does not grow with the input. A bad row raises
    :class:`InvalidModelInput` naming its 0-based position.

    ``model_config`` keys (logged by :func:`emonet.tracking.log_emonet_model`, and
    overridable at load time): ``inference_batch_size`` (default 32) and
    ``inference_device`` (default ``"auto"``: CUDA when available). The prefix keeps
    them apart from the training parameters of the same run, which MLflow would
    otherwise refuse to overwrite.
    """

    predictor: Predictor

    def load_context(self, context: Any) -> None:
        """Build the :class:`~emonet.inference.Predictor` from the ``checkpoint`` and
        ``normalization`` artifacts and the ``model_config``."""
        config = dict(getattr(context, "model_config", None) or {})
        device = resolve_device(str(config.get("inference_device", "auto")))
        batch_size = int(config.get("inference_batch_size", 32))
        self.predictor = Predictor.from_checkpoint(
            context.artifacts[CHECKPOINT_ARTIFACT],
            normalizer=context.artifacts.get(NORMALIZATION_ARTIFACT),
            device=device,
            batch_size=batch_size,
        )
        logger.info("loaded EmoNet (%s) on %s", self.predictor.variant, device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One output row per input row (see the class docstring); ``params`` are unused."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        predictor = self.predictor
        image_cols = _present(frame, IMAGE_PATH, IMAGE_B64, "the body crop")
        context_cols = (
            _present(frame, CONTEXT_PATH, CONTEXT_B64, "the full image, needed by the body_context model")
            if predictor.needs_context
            else None
        )
        if frame.empty:
            return predictor.to_frame(np.empty((0, NUM_EMOTIONS)), np.empty((0, 2)))

        def read(row: int) -> tuple[np.ndarray, np.ndarray | None]:
            crop = _decode_cell(frame, *image_cols, row, "image")
            scene = _decode_cell(frame, *context_cols, row, "context image") if context_cols else None
            return crop, scene

        # Rows are decoded inside the loader one batch at a time, so memory does not grow
        # with the input; with no worker processes a bad row's error reaches the caller as is.
        try:
            predictions = predictor.predict(predictor.inputs(read, len(frame)))
        except InvalidModelInput:
            raise
        except ValueError as error:  # a decoded image that is not H x W x 3 uint8
            raise InvalidModelInput(str(error)) from None
        return predictor.to_frame(predictions.emotion_prob, predictions.affect_pred)


mlflow.models.set_model(EmoNetPyfunc())
