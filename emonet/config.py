"""Typed, validated configuration for the model and its training.

Every field has a default and a one-line reason. Unknown keys are rejected (pydantic's
``ValidationError`` is a ``ValueError`` and names them). The resolved config is saved
with every run and inside every checkpoint, so a model is rebuilt from its own
checkpoint, never from today's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# torchvision's ImageNet CNNs by name; any timm model as "timm:<name>" (emonet.models.encoders).
TORCHVISION_BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "efficientnet_b0")
TIMM_PREFIX = "timm:"
Variant = Literal["body", "body_context"]
Scheduler = Literal["plateau", "cosine"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_backbone(name: str, field: str = "model.backbone") -> str:
    """``name`` if it names an encoder: a torchvision backbone, or ``timm:<model name>``."""
    if not isinstance(name, str):
        raise ValueError(f"{field} must be a string, got {type(name).__name__}")
    if name.startswith(TIMM_PREFIX):
        if not name[len(TIMM_PREFIX) :].strip():
            raise ValueError(f"{field}={name!r} names no timm model: write timm:<name>, e.g. timm:convnext_tiny")
        return name
    if name not in TORCHVISION_BACKBONES:
        raise ValueError(
            f"unknown {field} {name!r}: expected one of {list(TORCHVISION_BACKBONES)} or timm:<name> "
            "(any timm model, e.g. timm:convnext_tiny or timm:vit_base_patch16_clip_224.openai)"
        )
    return name


class ModelConfig(_Frozen):
    backbone: str = "resnet50"  # body encoder: a torchvision name, or timm:<name>; resnet18 for CPU runs
    variant: Variant = "body"  # body: one stream on the crop; body_context: crop + full image
    context_backbone: str | None = None  # body_context's scene encoder; None: the body's
    pretrained: bool = False  # pretrained weights (torchvision's or timm's); needs internet or a local file
    weights_path: Path | None = None  # local weights of the body encoder (torchvision state_dict, timm file)
    context_weights_path: Path | None = None  # the same for the context encoder; None: weights_path if same encoder
    freeze_body: bool = False  # train the heads (and the context trunk) only; BatchNorm in eval mode
    freeze_context: bool = False  # the same for the context trunk (body_context)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)  # before both heads

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        return check_backbone(value)

    @field_validator("context_backbone")
    @classmethod
    def _known_context_backbone(cls, value: str | None) -> str | None:
        return None if value is None else check_backbone(value, "model.context_backbone")

    @model_validator(mode="after")
    def _context_fields_need_context(self) -> ModelConfig:
        if self.variant != "body_context":
            for name in ("context_backbone", "context_weights_path"):
                if getattr(self, name) is not None:
                    raise ValueError(f"model.{name} needs variant 'body_context', got variant {self.variant!r}")
            if self.freeze_context:
                raise ValueError(f"model.freeze_context needs variant 'body_context', got variant {self.variant!r}")
        return self

    @property
    def uses_context(self) -> bool:
        """Whether the model reads the full image beside the body crop (``body_context``)."""
        return self.variant == "body_context"

    @property
    def context_encoder(self) -> str:
        """The context stream's encoder: ``context_backbone``, else the body's."""
        return self.context_backbone or self.backbone

    @property
    def context_weights(self) -> Path | None:
        """The context encoder's local weights: its own, else the body's when both are one encoder."""
        if self.context_weights_path is not None:
            return self.context_weights_path
        return self.weights_path if self.context_encoder == self.backbone else None


class LossConfig(_Frozen):
    gamma_neg: float = Field(4.0, ge=0.0)  # ASL focusing on negatives (Ridnik et al. 2021)
    gamma_pos: float = Field(1.0, ge=0.0)  # ASL focusing on positives
    clip: float = Field(0.05, ge=0.0, lt=1.0)  # probability shift of negatives
    emotion_weight: float = Field(1.0, ge=0.0)  # weight of the emotion loss in the total
    affect_weight: float = Field(1.0, ge=0.0)  # weight of the valence/arousal Smooth L1
    affect_beta: float = Field(1 / 9, gt=0.0)  # Smooth L1 switch point: half a 1..10 scale point in [-1, 1] units


class DistributedConfig(_Frozen):
    """Data-parallel training with ``torchrun`` (see ``emonet.training.launcher``); 1 x 1 trains in-process."""

    nproc_per_node: int = Field(1, ge=1)  # processes per machine: one per GPU (or a few CPU processes)
    nnodes: int = Field(1, ge=1)  # machines; each runs torchrun with the same settings
    rdzv_endpoint: str | None = None  # host:port of the c10d rendezvous; None: a free local port (one machine)
    rdzv_id: str = "emonet"  # names the job at the rendezvous; the same on every machine
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    sync_batchnorm: bool = False  # BatchNorm statistics over the whole effective batch (CUDA only)

    @model_validator(mode="after")
    def _multi_node_needs_an_endpoint(self) -> DistributedConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"train.distributed.nnodes={self.nnodes} needs rdzv_endpoint (host:port on node 0)")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class TrainConfig(_Frozen):
    # Sides of the square network inputs. None: the encoder's own (timm's pretrained input
    # size, 224 for torchvision's: the default of earlier releases).
    image_size: int | None = Field(None, ge=32)  # the body crop's
    context_size: int | None = Field(None, ge=32)  # the full image's (body_context)
    batch_size: int = Field(32, ge=1)  # the original project's batch size
    epochs: int = Field(50, ge=1)  # the original project's epoch count; early stopping may end sooner
    lr: float = Field(1e-4, gt=0.0)  # AdamW learning rate
    weight_decay: float = Field(1e-4, ge=0.0)  # AdamW decoupled weight decay
    # plateau: ReduceLROnPlateau on val mAP, per epoch (the original project's);
    # cosine: per-step decay to 0 after warm-up
    scheduler: Scheduler = "plateau"
    warmup_epochs: float = Field(0.0, ge=0.0)  # cosine only: linear rise from 0 to lr; spares AdamW's first noisy steps
    scheduler_factor: float = Field(0.1, gt=0.0, lt=1.0)  # ReduceLROnPlateau factor
    scheduler_patience: int = Field(3, ge=0)  # epochs without val mAP gain before lowering lr
    early_stopping_patience: int | None = Field(8, ge=1)  # None disables early stopping
    grad_clip_norm: float | None = Field(None, gt=0.0)  # max gradient norm; None: no clipping
    augment: bool = True  # flips, colour jitter and rotation on the train split
    num_workers: int = Field(2, ge=0)  # DataLoader worker processes
    seed: int = 0  # seeds weight init, data order, augmentation and loader workers
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    amp: bool = True  # mixed precision, used on CUDA only
    deterministic: bool = False  # deterministic CUDA kernels (slower); CPU runs are deterministic anyway
    distributed: DistributedConfig = DistributedConfig()  # torchrun data parallelism; batch_size is per process

    @model_validator(mode="after")
    def _warmup_needs_cosine(self) -> TrainConfig:
        if self.warmup_epochs > 0 and self.scheduler != "cosine":
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} needs scheduler='cosine', got scheduler={self.scheduler!r}"
            )
        return self


class EmoNetConfig(_Frozen):
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()


ConfigSource = EmoNetConfig | Mapping[str, Any] | str | Path | None


def load_config(source: ConfigSource = None, **overrides: Any) -> EmoNetConfig:
    """An :class:`EmoNetConfig` from a YAML file, a mapping or a config; missing fields
    take their defaults.

    Parameters
    ----------
    source : the path of a YAML file, a nested mapping (``{"train": {"epochs": 3}}``),
        an :class:`EmoNetConfig`, or None for the defaults.
    overrides : merged section by section over ``source``, e.g. ``train={"epochs": 3}``.

    Raises
    ------
    FileNotFoundError
        ``source`` names a missing file.
    ValueError
        A file that is not a YAML mapping, an unknown section or field (named), or a
        value out of range.
    """
    if isinstance(source, EmoNetConfig):
        data: dict[str, Any] = source.model_dump()
    elif isinstance(source, Mapping):
        data = {section: dict(values) for section, values in source.items()}
    elif source is not None:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as handle:
            try:
                data = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                raise ValueError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    else:
        data = {}
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return EmoNetConfig.model_validate(data)


def config_to_dict(config: EmoNetConfig) -> dict[str, Any]:
    """The config as plain JSON/YAML-safe types (paths as strings)."""
    return config.model_dump(mode="json")
