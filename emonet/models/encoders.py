"""Encoders by name: torchvision's ImageNet CNNs and any timm model (``timm:<name>``).

An encoder maps ``(B, 3, S, S)`` images to pooled ``(B, F)`` features. Each has its own
preprocessing (:class:`Preprocessing`): the input side, and the mean and std its
pretrained weights expect. For timm models these come from the model's pretrained config
(``timm.get_pretrained_cfg``), so a CLIP tower gets CLIP's statistics and a ConvNeXt
ImageNet's; torchvision's take 224 px and ImageNet's statistics.

Pretrained weights come through each library's own mechanism: torchvision's hub cache
(``torch.hub``) and timm's Hugging Face hub cache (``HF_HUB_OFFLINE=1`` uses a prepared
cache without the network), or a local file (``model.weights_path``). Missing weights
raise :class:`MissingWeightsError`, whose one-line message names the model, the file
expected and both ways to provide it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from emonet.config import TIMM_PREFIX, EmoNetConfig, check_backbone
from emonet.data.transforms import build_transforms
from emonet.schema import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

__all__ = [
    "MissingWeightsError",
    "config_transforms",
    "Preprocessing",
    "create_encoder",
    "encoder_preprocessing",
    "freeze",
    "is_timm",
    "stream_preprocessing",
]

# torchvision's classification presets and the original project's input side.
TORCHVISION_INPUT_SIZE = 224


class MissingWeightsError(FileNotFoundError, RuntimeError):
    """Pretrained weights that are neither cached, nor downloadable, nor given as a file.

    A ``FileNotFoundError`` (the command line prints it in one line) and, as before it
    had a class of its own, a ``RuntimeError``."""


@dataclass(frozen=True)
class Preprocessing:
    """What one stream's images go through before its encoder: a square side and Normalize."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def is_timm(backbone: str) -> bool:
    """Whether ``backbone`` names a timm model (``timm:<name>``)."""
    return backbone.startswith(TIMM_PREFIX)


def _timm_name(backbone: str) -> str:
    return backbone[len(TIMM_PREFIX) :]


def _timm():
    try:
        import timm
    except ImportError as error:  # pragma: no cover - timm is a pinned requirement
        raise ImportError("timm backbones need the timm package: pip install timm (see requirements.txt)") from error
    return timm


def _timm_pretrained_cfg(backbone: str):
    """timm's pretrained config of ``backbone`` (its default tag when none is named)."""
    timm = _timm()
    name = _timm_name(backbone)
    architecture = name.split(".", 1)[0]
    if not timm.is_model(architecture):
        raise ValueError(
            f"model.backbone {backbone!r}: timm has no model {architecture!r} (timm {timm.__version__}; "
            "timm.list_models('pattern*') lists them)"
        )
    try:
        cfg = timm.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(f"{architecture}.*")
        raise ValueError(f"model.backbone {backbone!r}: timm has no pretrained tag {name!r}; its tags: {tags[:8]}")
    return cfg


def encoder_preprocessing(backbone: str, size: int | None = None) -> Preprocessing:
    """The input side (``size``, else the encoder's own), mean and std of ``backbone``.

    Examples
    --------
    >>> encoder_preprocessing("resnet18")
    Preprocessing(size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    >>> encoder_preprocessing("timm:vit_base_patch16_clip_224.openai", 112).mean
    (0.48145466, 0.4578275, 0.40821073)
    """
    check_backbone(backbone)
    if not is_timm(backbone):
        return Preprocessing(size or TORCHVISION_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    cfg = _timm_pretrained_cfg(backbone)
    own = int(cfg.input_size[-1])
    mean = tuple(float(v) for v in cfg.mean)
    std = tuple(float(v) for v in cfg.std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"model.backbone {backbone!r} expects {len(mean)}-channel images; EmoNet reads RGB")
    return Preprocessing(size or own, mean, std)  # type: ignore[arg-type]


def stream_preprocessing(config: EmoNetConfig) -> tuple[Preprocessing, Preprocessing | None]:
    """The body stream's preprocessing and, for ``body_context``, the context stream's."""
    body = encoder_preprocessing(config.model.backbone, config.train.image_size)
    if not config.model.uses_context:
        return body, None
    return body, encoder_preprocessing(config.model.context_encoder, config.train.context_size)


def config_transforms(config: EmoNetConfig, train: bool) -> Any:
    """The image preset of a run (:func:`emonet.data.transforms.build_transforms`): each
    stream at its side, with its encoder's mean and std; ``train`` for the augmented one."""
    body, context = stream_preprocessing(config)
    return build_transforms(
        body.size,
        train=train,
        augment=config.train.augment,
        context_size=context.size if context is not None else None,
        mean=body.mean,
        std=body.std,
        context_mean=context.mean if context is not None else None,
        context_std=context.std if context is not None else None,
    )


def _create_timm(backbone: str, size: int, pretrained: bool, weights_path: Path | None) -> nn.Module:
    timm = _timm()
    name = _timm_name(backbone)
    cfg = _timm_pretrained_cfg(backbone)
    kwargs: dict = {"num_classes": 0}  # no classifier: the pooled (B, F) features
    if pretrained and weights_path is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_path)}
    if getattr(cfg, "fixed_input_size", False) and size != int(cfg.input_size[-1]):
        # ViT-like models fix their position embedding to one input side (CNNs take any):
        # timm builds them for this side, resampling a pretrained embedding.
        kwargs["img_size"] = size
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _missing_timm_weights(backbone: str, field: str, error: Exception) -> MissingWeightsError:
    cfg = _timm_pretrained_cfg(backbone)
    hub = getattr(cfg, "hf_hub_id", None)
    expected = f"hf-hub:{hub} (model.safetensors or pytorch_model.bin)" if hub else (cfg.url or "its weights file")
    name = _timm_name(backbone)
    reason = (str(error).splitlines() or [""])[0][:160]
    return MissingWeightsError(
        f"pretrained weights of {backbone} not found ({type(error).__name__}: {reason}); "
        f"expected {expected}: set {field} to a local copy of that file, or fill the Hugging Face cache "
        f"on a machine online (python -c \"import timm; timm.create_model('{name}', pretrained=True)\", then copy "
        "~/.cache/huggingface) and run with HF_HUB_OFFLINE=1; or set model.pretrained: false"
    )


def create_encoder(
    backbone: str,
    size: int,
    *,
    pretrained: bool = False,
    weights_path: Path | None = None,
    weights_field: str = "model.weights_path",
) -> tuple[nn.Module, int]:
    """An encoder (``(B, 3, size, size)`` to ``(B, F)``) and F.

    ``pretrained`` loads timm's weights here (from ``weights_path``, else timm's hub
    cache or the network). torchvision encoders are built randomly initialised; their
    ImageNet weights are loaded by :func:`emonet.models.network.build_model`.

    Raises
    ------
    ValueError
        An unknown name, or a timm name without that model or tag.
    MissingWeightsError
        timm weights that cannot be had (the message says how to provide them).
    """
    check_backbone(backbone)
    if not is_timm(backbone):
        from emonet.models.network import create_trunk

        return create_trunk(backbone)
    if weights_path is not None and pretrained and not Path(weights_path).expanduser().is_file():
        raise FileNotFoundError(f"{weights_field} not found: {weights_path}")
    try:
        encoder = _create_timm(backbone, size, pretrained, weights_path)
    except (OSError, RuntimeError, ValueError) as error:
        if not pretrained or weights_path is not None and not isinstance(error, OSError):
            raise
        raise _missing_timm_weights(backbone, weights_field, error) from error
    return encoder, int(encoder.num_features)


def freeze(module: nn.Module) -> None:
    """No gradient for ``module``'s parameters (:class:`~emonet.models.network.EmoNet` also
    keeps a frozen trunk in eval mode, so its BatchNorm statistics stay as loaded)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
