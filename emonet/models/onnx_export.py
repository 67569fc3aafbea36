"""The ONNX export of a trained EmoNet: one file that ONNX Runtime runs on any platform.

The graph takes the tensors of the evaluation preset (:func:`emonet.data.transforms.build_transforms`
with ``train=False``) and returns the network's outputs with the sigmoid applied:

==================  ==========================  ====================================================
name                shape, dtype                meaning
==================  ==========================  ====================================================
``body``            ``(batch, 3, S, S)`` float32  body crops, RGB, resized to the body side ``S``,
                                                scaled to [0, 1], normalized with the encoder's mean
                                                and std (ImageNet's for torchvision encoders; the
                                                metadata's ``emonet.mean`` and ``emonet.std``)
``context``         ``(batch, 3, C, C)`` float32  the full images at the context side ``C``, the same
                                                way with the context encoder's statistics; only in
                                                ``body_context`` models
``emotion_prob``    ``(batch, 26)`` float32       probabilities in :data:`emonet.schema.EMOTIONS` order
``affect``          ``(batch, 2)`` float32        valence, arousal in [-1, 1]
``emotion_logits``  ``(batch, 26)`` float32       the scores before the sigmoid
``features``        ``(batch, F)`` float32        the pooled trunk features the heads read (F is the
                                                model's ``num_features``); monitoring compares them
==================  ==========================  ====================================================

The batch axis is dynamic. The file's metadata (:func:`onnx_metadata`) names the emotions
and the preprocessing, so that it can be run without EmoNet. It is torch's dynamo exporter (``torch.onnx.export(...,
dynamo=True)``), which needs ``onnx`` and ``onnxscript``: registration imports them, serving
needs ``onnxruntime`` only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from emonet.config import EmoNetConfig
from emonet.models.encoders import stream_preprocessing
from emonet.models.network import EmoNet
from emonet.schema import EMOTIONS
from emonet.utils.io import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "ONNX_FILE",
    "ONNX_INPUTS",
    "ONNX_OPSET",
    "ONNX_OUTPUTS",
    "export_onnx",
    "onnx_input_shapes",
    "onnx_metadata",
]

ONNX_FILE = "emonet.onnx"
ONNX_INPUTS: tuple[str, ...] = ("body", "context")  # "context" only for body_context models
# Exports made before "features" was added have the first three only.
ONNX_OUTPUTS: tuple[str, ...] = ("emotion_prob", "affect", "emotion_logits", "features")
# Opset 18 is the dynamo exporter's default and what ONNX Runtime >= 1.14 runs; pinned so
# that an exporter upgrade does not silently raise what a deployed runtime must support.
ONNX_OPSET = 18


class _ServedGraph(nn.Module):
    """EmoNet with the sigmoid applied, returning plain tensors (what the export traces)."""

    def __init__(self, model: EmoNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, body: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        output = self.model(body, context) if context is not None else self.model(body)
        return torch.sigmoid(output.emotion_logits), output.affect, output.emotion_logits, output.features


def onnx_input_shapes(config: EmoNetConfig) -> dict[str, tuple[int, int, int]]:
    """The input names of the export for ``config`` and the shape of one image, ``(3, H, W)``."""
    body, context = stream_preprocessing(config)
    shapes = {"body": (3, body.size, body.size)}
    if context is not None:
        shapes["context"] = (3, context.size, context.size)
    return shapes


def onnx_metadata(config: EmoNetConfig) -> dict[str, str]:
    """What the export's ``metadata_props`` tell a runtime without EmoNet's code: the
    emotion names in output order and the preprocessing of the inputs (the context's own
    mean and std, when its encoder has other statistics than the body's)."""
    body, context = stream_preprocessing(config)
    context_stats = {}
    if context is not None:
        context_stats = {
            "emonet.context_backbone": config.model.context_encoder,
            "emonet.context_mean": json.dumps(list(context.mean)),
            "emonet.context_std": json.dumps(list(context.std)),
        }
    return {
        "emonet.emotions": json.dumps(list(EMOTIONS)),
        "emonet.variant": config.model.variant,
        "emonet.backbone": config.model.backbone,
        "emonet.input_sizes": json.dumps({name: shape[1:] for name, shape in onnx_input_shapes(config).items()}),
        "emonet.preprocessing": (
            "RGB, resized to the input size (bilinear, antialiased), scaled to [0, 1], normalized per channel "
            "with emonet.mean and emonet.std; channels first"
        ),
        "emonet.mean": json.dumps(list(body.mean)),
        "emonet.std": json.dumps(list(body.std)),
        **context_stats,
    }


def _add_metadata(path: Path, config: EmoNetConfig) -> None:
    import onnx  # the exporter's own dependency

    proto = onnx.load(str(path))
    for key, value in onnx_metadata(config).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)


def export_onnx(model: EmoNet, config: EmoNetConfig, dest: str | Path) -> Path:
    """Export ``model`` (trained with ``config``) to ``dest`` with the dynamo exporter.

    The file is written atomically; the model is exported in eval mode on the CPU and
    left as it was found (mode and device).

    Raises
    ------
    ImportError
        ``onnx`` or ``onnxscript`` is not installed (``pip install onnx onnxscript``).
    Exception
        Whatever the exporter raises for a graph it cannot translate.
    """
    dest = Path(dest)
    shapes = onnx_input_shapes(config)
    was_training = model.training
    device = next(model.parameters()).device
    graph = _ServedGraph(model.to("cpu").eval()).eval()
    # Two rows, so that the exporter does not specialize the batch axis to 1.
    example = tuple(torch.zeros(2, *shape) for shape in shapes.values())
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings(), _quiet_loggers("onnxscript", "onnx_ir"):
            # The exporter warns and logs (at INFO) about its own passes: not the user's news.
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                example,
                dynamo=True,
                input_names=list(shapes),
                output_names=list(ONNX_OUTPUTS),
                dynamic_shapes={name: {0: batch} for name in shapes},
                opset_version=ONNX_OPSET,
                verbose=False,
            )
        with atomic_path(dest) as tmp:
            program.save(str(tmp))
            _add_metadata(tmp, config)
    finally:
        model.to(device).train(was_training)
    logger.info("exported %s to ONNX: %s (%.1f MB)", config.model.backbone, dest, dest.stat().st_size / 1e6)
    return dest
