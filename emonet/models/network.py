"""EmoNet: an encoder trunk on the body crop (optionally a second on the full image), with
two heads, 26 emotion logits and valence/arousal in [-1, 1]. Trunks are torchvision's or
timm's (:mod:`emonet.models.encoders`)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import Tensor, nn

from emonet.config import EmoNetConfig, ModelConfig
from emonet.schema import AFFECT_COLUMNS, NUM_EMOTIONS

logger = logging.getLogger(__name__)

NUM_AFFECT = len(AFFECT_COLUMNS)  # valence, arousal

# Initial sigmoid output of every emotion logit. EMOTIC persons carry about 2-3 of the
# 26 labels, so ~0.1 is the average positive rate. Starting there instead of at 0.5
# (bias 0) spares the first iterations from the large, uniform push down that the 24
# or so negatives of every sample would otherwise give the logits (the same reasoning
# as the prior bias of RetinaNet's focal loss, Lin et al., ICCV 2017).
EMOTION_PRIOR = 0.1

# backbone name -> (constructor, ImageNet weights enum, attribute name of the classifier)
_BACKBONES: dict[str, tuple[Callable[..., nn.Module], type[tvm.WeightsEnum], str]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights, "fc"),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights, "fc"),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights, "fc"),
    "efficientnet_b0": (tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights, "classifier"),
}
VARIANTS: tuple[str, ...] = ("body", "body_context")


class EmoNetOutput(NamedTuple):
    """What :class:`EmoNet` returns; apply the sigmoid to the logits only at inference."""

    emotion_logits: Tensor  # (B, 26) raw scores, in schema.EMOTIONS order
    affect: Tensor  # (B, 2) valence, arousal in [-1, 1] after tanh
    # (B, num_features) the pooled trunk features the heads read (what monitoring compares);
    # None where a runtime does not return them (an ONNX export made before they were an output).
    features: Tensor | None = None


def _classifier_features(trunk: nn.Module, head_attr: str) -> int:
    """Width of the pooled features that a torchvision classifier receives."""
    head = getattr(trunk, head_attr)
    if isinstance(head, nn.Sequential):  # efficientnet: Sequential(Dropout, Linear)
        head = head[-1]
    if not isinstance(head, nn.Linear):
        raise TypeError(f"unexpected classifier {type(head).__name__} on {type(trunk).__name__}")
    return head.in_features


def create_trunk(backbone: str) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision backbone whose classifier is an ``nn.Identity``.

    Parameters
    ----------
    backbone : one of ``resnet18``, ``resnet34``, ``resnet50``, ``efficientnet_b0``.

    Returns
    -------
    trunk : module mapping (B, 3, H, W) images to pooled features (B, F).
    num_features : F.
    """
    if backbone not in _BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(_BACKBONES)}")
    constructor, _, head_attr = _BACKBONES[backbone]
    trunk = constructor(weights=None)
    num_features = _classifier_features(trunk, head_attr)
    # torchvision's forward pools and flattens before the classifier, so an Identity in
    # its place leaves (B, F) features; efficientnet's own dropout goes with it, ours
    # sits before the heads.
    setattr(trunk, head_attr, nn.Identity())
    return trunk, num_features


def _hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches the file behind ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def imagenet_state_dict(backbone: str) -> dict[str, Tensor]:
    """torchvision's default ImageNet weights for ``backbone``, from the hub cache or downloaded.

    Raises
    ------
    RuntimeError
        When the file is not cached and cannot be downloaded; the message says where to
        put it by hand, or how to do without it.
    """
    if backbone not in _BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(_BACKBONES)}")
    weights = _BACKBONES[backbone][1].DEFAULT
    cached = _hub_checkpoint_path(weights.url)
    if cached.is_file():
        logger.info("loading %s ImageNet weights from the hub cache %s", backbone, cached)
    else:
        logger.info("downloading %s ImageNet weights (%s) to %s", backbone, weights.url, cached)
    try:
        # check_hash verifies a fresh download against the hash in the file name.
        return torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as error:  # offline, proxy, TLS, truncated file: all end the same way
        if cached.is_file():
            raise
        from emonet.models.encoders import MissingWeightsError

        raise MissingWeightsError(
            f"could not download the ImageNet weights of {backbone} ({weights}): {error!r}. "
            f"Either download {weights.url} on a machine with internet and copy it to {cached}, "
            f"or set model.weights_path to a local copy of that file, "
            f"or set model.pretrained: false to train from random initialisation."
        ) from error


def load_trunk_weights(trunk: nn.Module, state_dict: Mapping[str, Tensor], head_attr: str, source: str) -> None:
    """Load a torchvision backbone state_dict into ``trunk`` (whose classifier is removed).

    The classifier's keys (``fc.*`` or ``classifier.*``) are dropped since the heads
    replace it; BatchNorm's ``num_batches_tracked`` counters may be absent. Any other
    missing or unexpected key, or a shape mismatch, raises ``ValueError`` naming
    ``source`` and the keys.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(
            f"{source}: expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}"
        )
    head_prefix = f"{head_attr}."
    given = {k: v for k, v in state_dict.items() if not k.startswith(head_prefix)}
    expected = trunk.state_dict()
    missing = sorted(k for k in expected.keys() - given.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(given.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the {type(trunk).__name__} backbone: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}. "
            "Expected a torchvision state_dict of the configured model.backbone."
        )
    mismatched = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in given.items() if v.shape != expected[k].shape
    ]
    if mismatched:
        raise ValueError(f"{source}: shape mismatch for {len(mismatched)} tensors, e.g. {mismatched[:3]}")
    # strict=False only because num_batches_tracked may be missing; all else was checked.
    trunk.load_state_dict(given, strict=False)


class EmoNet(nn.Module):
    """Multi-label emotion and valence/arousal network on one or two encoder trunks.

    ``body`` runs one trunk on the body crop. ``body_context`` runs a second, separate
    trunk (``model.context_backbone``, by default the body's encoder) on the full image
    and concatenates the two pooled feature vectors before the heads, as in the EMOTIC
    baseline (Kosti et al., TPAMI 2019). The features go
    through dropout, then a linear head to 26 emotion logits (sigmoid at inference,
    not here, so the loss can work on logits) and a linear head to valence/arousal
    followed by tanh, matching the targets' [-1, 1] scale.

    Parameters
    ----------
    config : the model section of the run config.
    image_size, context_size : the streams' input sides (``train.image_size`` and
        ``train.context_size``); None: each encoder's own. Only encoders with a fixed
        input side (ViTs) are built for it; CNNs take any.
    timm_pretrained : build timm encoders with their pretrained weights (torchvision's
        are loaded by :func:`build_model`).

    Attributes
    ----------
    config : the ``ModelConfig`` it was built from.
    variant : ``"body"`` or ``"body_context"``.
    num_features : width of ``forward_features``' output (both trunks' for body_context).
    frozen : the trunks that ``model.freeze_body`` / ``model.freeze_context`` freeze.
    """

    def __init__(
        self,
        config: ModelConfig,
        image_size: int | None = None,
        context_size: int | None = None,
        *,
        timm_pretrained: bool = False,
    ) -> None:
        super().__init__()
        from emonet.models.encoders import create_encoder, encoder_preprocessing, freeze

        if config.variant not in VARIANTS:
            raise ValueError(f"unknown variant {config.variant!r}; expected one of {list(VARIANTS)}")
        self.config = config
        self.variant = config.variant
        body_size = encoder_preprocessing(config.backbone, image_size).size
        self.body_trunk, trunk_features = create_encoder(
            config.backbone, body_size, pretrained=timm_pretrained, weights_path=config.weights_path
        )
        self.context_trunk: nn.Module | None = None
        context_features = 0
        if config.uses_context:
            size = encoder_preprocessing(config.context_encoder, context_size).size
            self.context_trunk, context_features = create_encoder(
                config.context_encoder,
                size,
                pretrained=timm_pretrained,
                weights_path=config.context_weights,
                weights_field="model.context_weights_path",
            )
        self.num_features = trunk_features + context_features
        self.frozen: list[nn.Module] = []
        if config.freeze_body:
            self.frozen.append(self.body_trunk)
        if config.freeze_context and self.context_trunk is not None:
            self.frozen.append(self.context_trunk)
        for trunk in self.frozen:
            freeze(trunk)
        self.head_drop = nn.Dropout(config.dropout)
        self.emotion_head = nn.Linear(self.num_features, NUM_EMOTIONS)
        self.affect_head = nn.Linear(self.num_features, NUM_AFFECT)
        self.reset_heads()

    def train(self, mode: bool = True) -> EmoNet:
        """As ``nn.Module.train``, but a frozen trunk stays in eval mode (its BatchNorm
        statistics and dropout as at inference)."""
        super().train(mode)
        for trunk in self.frozen:
            trunk.eval()
        return self

    def reset_heads(self) -> None:
        """Initialise the heads: default weights, emotion bias at the label prior, affect bias 0."""
        self.emotion_head.reset_parameters()
        self.affect_head.reset_parameters()
        nn.init.constant_(self.emotion_head.bias, math.log(EMOTION_PRIOR / (1.0 - EMOTION_PRIOR)))
        # tanh(0) = 0 is the middle of the 1..10 scale, a neutral first guess.
        nn.init.zeros_(self.affect_head.bias)

    @property
    def trunks(self) -> list[nn.Module]:
        """The backbone(s), e.g. for a lower learning rate than the heads."""
        return [self.body_trunk] + ([self.context_trunk] if self.context_trunk is not None else [])

    def _check_images(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(x.shape)}")

    def forward_features(self, body: Tensor, context: Tensor | None = None) -> Tensor:
        """Pooled trunk features, shape (B, num_features).

        Parameters
        ----------
        body : (B, 3, H, W) normalised body crops.
        context : (B, 3, H', W') normalised full images; required for ``body_context``,
            refused for ``body``. H', W' may differ from H, W.
        """
        self._check_images(body, "body")
        if self.context_trunk is None:
            if context is not None:
                raise ValueError("context was given, but variant 'body' uses only the body crop")
            return self.body_trunk(body)  # (B, F)
        if context is None:
            raise ValueError("variant 'body_context' needs the full image: pass context=(B, 3, H, W)")
        self._check_images(context, "context")
        if context.shape[0] != body.shape[0]:
            raise ValueError(f"body and context batch sizes differ: {body.shape[0]} vs {context.shape[0]}")
        return torch.cat([self.body_trunk(body), self.context_trunk(context)], dim=1)  # (B, 2F)

    def forward_head(self, features: Tensor) -> EmoNetOutput:
        """Emotion logits and valence/arousal from (B, num_features) features."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must have shape (B, {self.num_features}), got {tuple(features.shape)}")
        x = self.head_drop(features)
        return EmoNetOutput(
            emotion_logits=self.emotion_head(x),  # (B, 26)
            affect=torch.tanh(self.affect_head(x)),  # (B, 2)
        )

    def forward(self, body: Tensor, context: Tensor | None = None) -> EmoNetOutput:
        """Run trunk(s) and heads; see :meth:`forward_features` for the inputs. The output
        also carries the features the heads read."""
        features = self.forward_features(body, context)
        return self.forward_head(features)._replace(features=features)


def _load_torchvision_weights(backbone: str, weights_path: Path | None, field: str) -> tuple[Mapping[str, Tensor], str]:
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{field} not found: {path}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True), str(path)
        except Exception as error:  # not a torch file, or pickled objects beyond tensors
            raise ValueError(f"{field} {path} is not a readable torch state_dict: {error}") from error
    return imagenet_state_dict(backbone), f"torchvision {backbone} ImageNet weights"


def check_pretrained_weights(config: ModelConfig) -> None:
    """Fail fast, before any data work, when ``model.pretrained`` weights cannot be had.

    A local file must exist; torchvision's weights must be in the hub cache or
    downloadable; timm's are fetched (or read from the Hugging Face cache) once here, so
    the later build reads them from the cache.

    Raises
    ------
    FileNotFoundError, RuntimeError
        With one line naming the model, the file expected and how to provide it.
    """
    if not config.pretrained:
        return
    from emonet.models.encoders import create_encoder, encoder_preprocessing, is_timm

    streams = [(config.backbone, config.weights_path, "model.weights_path")]
    if config.uses_context:
        streams.append((config.context_encoder, config.context_weights, "model.context_weights_path"))
    for backbone, weights_path, field in streams:
        if is_timm(backbone):
            size = encoder_preprocessing(backbone).size
            create_encoder(backbone, size, pretrained=True, weights_path=weights_path, weights_field=field)
        elif weights_path is not None:
            if not Path(weights_path).expanduser().is_file():
                raise FileNotFoundError(f"{field} not found: {weights_path}")
        else:
            imagenet_state_dict(backbone)


def build_model(config: ModelConfig | EmoNetConfig, *, pretrained: bool | None = None) -> EmoNet:
    """Build an :class:`EmoNet` from its config, with pretrained weights if asked.

    Parameters
    ----------
    config : the run config (its ``train.image_size`` and ``train.context_size`` size the
        encoders that fix their input side), or only its model section (each encoder at
        its own side).
    pretrained : overrides ``model.pretrained``. Pass ``False`` when the weights are
        about to be replaced by a checkpoint's, so that rebuilding a trained model
        needs neither the network nor a weights file.

    Returns
    -------
    The model, in training mode. A torchvision encoder's weights are its ImageNet ones
    (or ``weights_path``'s state_dict); a timm encoder's come through timm (its
    Hugging Face hub cache, or ``weights_path``). With one encoder for both streams of
    ``body_context``, both trunks start from the same weights; the heads are always new.

    Raises
    ------
    FileNotFoundError
        A weights file does not exist.
    ValueError
        A weights file does not fit its encoder, or an unknown timm model.
    RuntimeError
        Pretrained weights are neither cached nor downloadable (the message says how to
        provide them).
    """
    from emonet.models.encoders import is_timm

    model_config = config.model if isinstance(config, EmoNetConfig) else config
    sizes = (config.train.image_size, config.train.context_size) if isinstance(config, EmoNetConfig) else (None, None)
    use_pretrained = model_config.pretrained if pretrained is None else pretrained
    if not use_pretrained and pretrained is None:
        for field in ("weights_path", "context_weights_path"):
            if getattr(model_config, field) is not None:
                logger.warning(
                    "model.%s=%s is ignored because model.pretrained is false", field, getattr(model_config, field)
                )
    streams = [("body_trunk", model_config.backbone, model_config.weights_path, "model.weights_path")]
    if model_config.uses_context:
        streams.append(
            ("context_trunk", model_config.context_encoder, model_config.context_weights, "model.context_weights_path")
        )
    # torchvision weights are fetched before building anything, so a missing file fails fast.
    loaded = {
        attr: _load_torchvision_weights(backbone, weights_path, field)
        for attr, backbone, weights_path, field in streams
        if use_pretrained and not is_timm(backbone)
    }
    model = EmoNet(model_config, *sizes, timm_pretrained=use_pretrained)  # timm weights load as it builds
    for attr, backbone, _, _ in streams:
        if attr in loaded:
            state_dict, source = loaded[attr]
            load_trunk_weights(getattr(model, attr), state_dict, _BACKBONES[backbone][2], source)
            logger.info("loaded %s into the %s", source, attr.replace("_", " "))
    return model
