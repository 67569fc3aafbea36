"""ONNX Runtime behind the one prediction path: the exported graph
(:mod:`emonet.models.onnx_export`) called like the torch network.

:class:`OnnxModel` is an ``nn.Module`` without parameters whose ``forward`` runs an ONNX
Runtime session and returns an :class:`~emonet.models.network.EmoNetOutput`, so that
:func:`~emonet.inference.loop.predict_split` and its preprocessing serve both runtimes:
both see the same tensors. It runs on the CPU (``CPUExecutionProvider``).

Which runtime a model uses is :func:`resolve_runtime`'s: ``auto`` takes ONNX Runtime when
the model has an export and runs on the CPU; ``onnxruntime-int8`` (the INT8 export, for
versions registered with ``quantize="int8"``) is used only when asked for. Threads follow the rule of ``make serve
WORKERS=N``: a session uses as many intra-op threads as torch does
(``torch.get_num_threads()``, i.e. ``OMP_NUM_THREADS`` where it is set), so N workers with
cores/N threads each never oversubscribe the cores.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from emonet.config import ModelConfig
from emonet.models.network import EmoNetOutput

logger = logging.getLogger(__name__)

__all__ = ["PRECISION_KEY", "RUNTIMES", "OnnxModel", "Runtime", "onnx_session", "resolve_runtime"]

Runtime = Literal["auto", "onnxruntime", "onnxruntime-int8", "torch"]
RUNTIMES: tuple[str, ...] = ("auto", "onnxruntime", "onnxruntime-int8", "torch")
# The metadata key that marks a quantized export ("int8"); float exports do not have it.
PRECISION_KEY = "emonet.precision"


def onnx_session(path: str | Path, threads: int | None = None):  # -> onnxruntime.InferenceSession
    """An ONNX Runtime CPU session on ``path`` with ``threads`` intra-op threads (default:
    ``torch.get_num_threads()``) that do not spin between runs, and one inter-op thread
    (EmoNet's graph is one chain)."""
    import onnxruntime as ort  # serving only: training and registration never load it

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings name graph internals
    # Its threads would otherwise spin after each run, waiting for the next, and take the
    # cores from the decoding and preprocessing of the next batch (measured: pyfunc.predict
    # of the demo model 1.01x torch's images/s with spinning, 1.30x without, on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxModel(nn.Module):
    """An exported EmoNet run by ONNX Runtime, with the torch network's call.

    Parameters
    ----------
    path : the ``.onnx`` file written by :func:`emonet.models.onnx_export.export_onnx`.
    config : the model section of the config it was trained with (its variant says
        whether a ``context`` input is expected).
    threads : intra-op threads; None follows ``torch.get_num_threads()``.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file's inputs are not those of an EmoNet export for ``config``'s variant.
    """

    def __init__(self, path: str | Path, config: ModelConfig, threads: int | None = None) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        self.path = path
        self.config = config
        self.variant = config.variant
        self.device = torch.device("cpu")
        self.session = onnx_session(path, threads)
        expected = ["body", "context"] if config.uses_context else ["body"]
        found = [entry.name for entry in self.session.get_inputs()]
        if found != expected:
            raise ValueError(f"{path} takes inputs {found}, but an EmoNet {config.variant} export takes {expected}")
        # Exports made before "features" was an output do not return them.
        self.outputs = ["emotion_logits", "affect"] + (
            ["features"] if "features" in {entry.name for entry in self.session.get_outputs()} else []
        )
        self.threads = self.session.get_session_options().intra_op_num_threads
        self.precision = self.session.get_modelmeta().custom_metadata_map.get(PRECISION_KEY, "float32")
        # What a Predictor reports: "onnxruntime", or "onnxruntime-int8" for a quantized export.
        self.runtime = "onnxruntime" if self.precision == "float32" else f"onnxruntime-{self.precision}"

    def forward(self, body: Tensor, context: Tensor | None = None) -> EmoNetOutput:
        """The network's outputs for normalized ``(B, 3, H, W)`` float32 CPU tensors."""
        feeds = {"body": _as_array(body, "body")}
        if self.config.uses_context:
            if context is None:
                raise ValueError("variant 'body_context' needs the full image: pass context=(B, 3, H, W)")
            feeds["context"] = _as_array(context, "context")
        elif context is not None:
            raise ValueError("context was given, but variant 'body' uses only the body crop")
        logits, affect, *features = self.session.run(self.outputs, feeds)
        return EmoNetOutput(
            emotion_logits=torch.from_numpy(logits),
            affect=torch.from_numpy(affect),
            features=torch.from_numpy(features[0]) if features else None,
        )

    def extra_repr(self) -> str:
        return (
            f"path={str(self.path)!r}, variant={self.variant!r}, precision={self.precision!r}, threads={self.threads}"
        )


def _as_array(images: Tensor, name: str) -> np.ndarray:
    if images.device.type != "cpu":
        raise ValueError(f"ONNX Runtime runs on the CPU; {name} is on {images.device}")
    return np.ascontiguousarray(images.detach().numpy(), dtype=np.float32)


def resolve_runtime(requested: str, onnx_path: str | Path | None, device: torch.device | str) -> str:
    """The runtime a model uses: ``"onnxruntime"``, ``"onnxruntime-int8"`` or ``"torch"``.

    ``auto`` takes ONNX Runtime when ``onnx_path`` (the float export) exists and the model
    runs on the CPU (ONNX Runtime's CUDA build is not a dependency), else torch.
    ``onnxruntime`` and ``onnxruntime-int8`` insist (``onnx_path`` is then the float or
    the INT8 export): they are refused for a model without that export or on another device.

    Raises
    ------
    ValueError
        ``requested`` is not one of :data:`RUNTIMES`, or ``onnxruntime`` cannot be had.
    """
    if requested not in RUNTIMES:
        raise ValueError(f"inference_runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    device = torch.device(device)
    has_export = onnx_path is not None and Path(onnx_path).is_file()
    if requested == "torch":
        return "torch"
    if requested in ("onnxruntime", "onnxruntime-int8"):
        if not has_export and requested == "onnxruntime":
            raise ValueError(
                "inference_runtime 'onnxruntime' needs the model's ONNX export, and this model has none "
                "(registered before exports, or its export failed: see the version's onnx_export tag); "
                "use inference_runtime 'torch' or 'auto'"
            )
        if not has_export:
            raise ValueError(
                "inference_runtime 'onnxruntime-int8' needs the model's INT8 export, and this model has none "
                "(it is made only at a registration with quantize='int8': see the version's onnx_int8 tag); "
                "use inference_runtime 'onnxruntime', 'torch' or 'auto'"
            )
        if device.type != "cpu":
            raise ValueError(
                f"inference_runtime {requested!r} runs on the CPU, but inference_device is {device}; "
                "use inference_runtime 'torch' on a GPU"
            )
        return requested
    if not has_export or device.type != "cpu":
        return "torch"
    if importlib.util.find_spec("onnxruntime") is None:
        # The served model requires it; a hand-made environment may still lack it.
        logger.warning("onnxruntime is not installed, so the model runs with torch (pip install onnxruntime)")
        return "torch"
    return "onnxruntime"
