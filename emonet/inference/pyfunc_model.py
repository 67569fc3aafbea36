"""EmoNet as an MLflow pyfunc model, logged "from code": MLflow runs this file to build the
model, whose artifacts are a checkpoint and the affect normalization (see emonet.tracking.run_logging)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from emonet.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_MAX_ROWS,
    check_pixel_limit,
    confined_image_size,
    decode_image_b64,
    image_b64_size,
    image_file_size,
    read_confined_image,
    read_image,
    resolve_image_root,
)
from emonet.inference.predictor import Predictor
from emonet.models.devices import resolve_device
from emonet.schema import NUM_EMOTIONS

logger = logging.getLogger(__name__)

# Input columns: a file path (.npy/.png/.jpg) or a base64 PNG/JPEG (for REST clients),
# per row; the context columns carry the full image for the body_context variant.
IMAGE_PATH = "image_path"
IMAGE_B64 = "image_b64"
CONTEXT_PATH = "context_path"
CONTEXT_B64 = "context_b64"

# Names of the model's artifacts (as emonet.tracking.run_logging logs them).
CHECKPOINT_ARTIFACT = "checkpoint"
NORMALIZATION_ARTIFACT = "normalization"
ONNX_ARTIFACT = "onnx"  # the ONNX export; absent from models registered before it, or whose export failed
INT8_ARTIFACT = "onnx_int8"  # its INT8 copy, only in versions registered with quantize="int8"
# The folder that file paths must lie in, when the model config does not set one.
IMAGE_ROOT_ENV = "EMONET_IMAGE_ROOT"


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


def _in_scoring_server() -> bool:
    # MLflow's scoring server (`mlflow models serve`, and the images of `mlflow models
    # build-docker`) sets this variable in init(), before its first request; MLflow also sets
    # it while checking an input example at log time, as the server would see it. It is
    # MLflow's private name: importing it fails loudly if an upgrade drops it, rather than
    # letting REST clients read files again. The check runs per call, not in load_context,
    # because the server loads the model before init() sets the variable.
    return bool(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.get())


def _decode_cell(
    frame: pd.DataFrame,
    path_col: str | None,
    b64_col: str | None,
    row: int,
    what: str,
    read_path: Callable[[str], Any],
    read_b64: Callable[[str], Any],
) -> Any:
    """Read one row's image with ``read_path`` or ``read_b64`` (the pixels, or only the
    header's size); its path wins over its base64 when both are set."""
    path = frame[path_col].iat[row] if path_col is not None else None
    blob = frame[b64_col].iat[row] if b64_col is not None else None
    try:
        if not _is_missing(path):
            if not isinstance(path, str):
                raise ValueError(f"{path_col} must be a string, got {type(path).__name__}")
            return read_path(path)
        if not _is_missing(blob):
            return read_b64(blob)
        given = " or ".join(c for c in (path_col, b64_col) if c is not None)
        raise ValueError(f"no {what} given: {given} is empty")
    except (ValueError, FileNotFoundError) as error:
        raise InvalidModelInput(f"row {row}: {error}") from None


def _positive_or_none(config: dict[str, Any], key: str, default: int | None) -> int | None:
    """The limit ``config[key]`` (``default`` when unset): a positive int, a string of
    digits, or None or "" for no limit; anything else raises ``ValueError`` naming ``key``."""
    value = config.get(key, default)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"model_config {key} must be a positive int or None, got {value!r}")
    return int(value)


class EmoNetPyfunc(mlflow.pyfunc.PythonModel):
    """Predict emotions and valence/arousal for a table of body crops.

    Input: a DataFrame with ``image_path`` (paths to ``.npy``/``.png``/``.jpg`` crops
    readable by the serving process) and/or ``image_b64`` (base64 PNG/JPEG); the
    ``body_context`` variant also needs ``context_path``/``context_b64``. Output: one
    row per input row, with the columns of :data:`emonet.inference.predictor.OUTPUT_COLUMNS`
    (``prob_<Emotion>`` x 26, ``emotions``, ``valence``, ``arousal``,
    ``valence_1_10``, ``arousal_1_10``). Rows are decoded and predicted one batch at
    a time, so memory does not grow with the input. A bad row raises
    :class:`InvalidModelInput` naming its 0-based position.

    ``model_config`` keys (logged by :func:`emonet.tracking.run_logging.log_emonet_model`, and
    overridable at load time): ``inference_batch_size`` (default 32),
    ``inference_device`` (default ``"auto"``: CUDA when available),
    ``inference_runtime`` (default ``"auto"``: ONNX Runtime on the model's ``onnx``
    artifact when it has one and runs on the CPU, else torch; ``"onnxruntime"`` or
    ``"torch"`` to insist, ``"onnxruntime-int8"`` for the ``onnx_int8`` artifact of a
    version registered with ``quantize="int8"``: :func:`~emonet.inference.onnx_runtime.resolve_runtime`),
    ``inference_max_pixels`` (default 40 million: larger images are refused from their
    header, before decoding), ``inference_max_rows`` (default 256 rows per call) and
    ``inference_max_request_pixels`` (default 200 million: the pixels of all the images
    of one call together, read from their headers before any is decoded), and
    ``inference_image_root`` (default: the
    ``EMONET_IMAGE_ROOT`` environment variable, else none). The prefix keeps them apart
    from the training parameters of the same run, which MLflow would otherwise refuse to
    overwrite.

    File paths (``image_path``, ``context_path``): with an image root, only files whose
    real path lies under it are read, relative paths are taken from it, and a refused
    path gets the same message whether it is missing, outside or undecodable. Without a
    root, paths are read as given in process, and refused in MLflow's scoring server,
    which then accepts only base64 images: a REST client must not read the server's files.
    """

    predictor: Predictor
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_rows: int | None = DEFAULT_MAX_ROWS
    max_request_pixels: int | None = DEFAULT_MAX_REQUEST_PIXELS
    image_root: Path | None = None

    def load_context(self, context: Any) -> None:
        """Build the :class:`~emonet.inference.predictor.Predictor` from the ``checkpoint``,
        ``normalization`` and (when present) ``onnx`` artifacts and the ``model_config``."""
        config = dict(getattr(context, "model_config", None) or {})
        device = resolve_device(str(config.get("inference_device", "auto")))
        batch_size = int(config.get("inference_batch_size", 32))
        self.max_pixels = _positive_or_none(config, "inference_max_pixels", DEFAULT_MAX_PIXELS)
        self.max_rows = _positive_or_none(config, "inference_max_rows", DEFAULT_MAX_ROWS)
        self.max_request_pixels = _positive_or_none(config, "inference_max_request_pixels", DEFAULT_MAX_REQUEST_PIXELS)
        runtime = str(config.get("inference_runtime") or "auto")
        root = config.get("inference_image_root") or os.environ.get(IMAGE_ROOT_ENV)
        self.image_root = resolve_image_root(root) if root else None
        self.predictor = Predictor.from_checkpoint(
            context.artifacts[CHECKPOINT_ARTIFACT],
            normalizer=context.artifacts.get(NORMALIZATION_ARTIFACT),
            device=device,
            batch_size=batch_size,
            onnx_path=context.artifacts.get(INT8_ARTIFACT if runtime == "onnxruntime-int8" else ONNX_ARTIFACT),
            runtime=runtime,
        )
        logger.info(
            "loaded EmoNet (%s) with %s on %s; image root %s; "
            "at most %s pixels per image, %s rows and %s pixels per call",
            self.predictor.variant,
            self.predictor.runtime,
            device,
            self.image_root,
            self.max_pixels,
            self.max_rows,
            self.max_request_pixels,
        )

    def _read_path(self, path: str) -> np.ndarray:
        if self.image_root is not None:
            return read_confined_image(path, self.image_root, max_pixels=self.max_pixels)
        self._read_path_allowed()
        return read_image(path, max_pixels=self.max_pixels)

    def _decode_b64(self, text: str) -> np.ndarray:
        return decode_image_b64(text, max_pixels=self.max_pixels)

    def _path_size(self, path: str) -> tuple[int, int]:
        if self.image_root is not None:
            size = confined_image_size(path, self.image_root)
        else:
            self._read_path_allowed()
            size = image_file_size(path)
        check_pixel_limit(*size, self.max_pixels, path)
        return size

    def _b64_size(self, text: str) -> tuple[int, int]:
        size = image_b64_size(text)
        check_pixel_limit(*size, self.max_pixels, "base64 image")
        return size

    def _read_path_allowed(self) -> None:
        if _in_scoring_server():
            raise ValueError(
                f"file paths are refused by the scoring server (no image root is set): send the image as base64 "
                f"in {IMAGE_B64!r}/{CONTEXT_B64!r}, or start the server with {IMAGE_ROOT_ENV} set to a folder"
            )

    def _check_request_size(self, frame: pd.DataFrame, cells: list[tuple[tuple[str | None, str | None], str]]) -> None:
        """Refuse a call over ``max_rows`` rows or ``max_request_pixels`` pixels in all,
        from the headers alone, before any image is decoded."""
        if self.max_rows is not None and len(frame) > self.max_rows:
            raise InvalidModelInput(
                f"{len(frame)} rows in one request is over the limit of {self.max_rows} rows per request "
                "(inference_max_rows): split it"
            )
        if self.max_request_pixels is None:
            return
        total = 0
        for row in range(len(frame)):
            for columns, what in cells:
                height, width = _decode_cell(frame, *columns, row, what, self._path_size, self._b64_size)
                total += height * width
                if total > self.max_request_pixels:
                    raise InvalidModelInput(
                        f"the images of rows 0-{row} hold {total:,} pixels, over the limit of "
                        f"{self.max_request_pixels:,} pixels per request (inference_max_request_pixels): split it"
                    )

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
        cells = [(image_cols, "image")] + ([(context_cols, "context image")] if context_cols else [])
        self._check_request_size(frame, cells)

        def read(row: int) -> tuple[np.ndarray, np.ndarray | None]:
            decoders = (self._read_path, self._decode_b64)
            crop = _decode_cell(frame, *image_cols, row, "image", *decoders)
            scene = _decode_cell(frame, *context_cols, row, "context image", *decoders) if context_cols else None
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
