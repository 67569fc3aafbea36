"""Typed, validated configuration for the model and its training.

Every field has a default and a one-line reason. Unknown keys are rejected (pydantic's
``ValidationError`` is a ``ValueError`` and names them). The resolved config is saved
with every run and inside every checkpoint, so a model is rebuilt from its own
checkpoint, never from today's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

Backbone = Literal["resnet18", "resnet34", "resnet50", "efficientnet_b0"]
Variant = Literal["body", "body_context"]
Scheduler = Literal["plateau", "cosine"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Frozen):
    backbone: Backbone = "resnet50"  # the seed's backbone; resnet18 for CPU runs
    variant: Variant = "body"  # body: one stream on the crop; body_context: crop + full image
    pretrained: bool = False  # ImageNet weights; needs internet or weights_path
    weights_path: Path | None = None  # local torchvision state_dict for the backbone(s)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)  # before both heads


class LossConfig(_Frozen):
    gamma_neg: float = Field(4.0, ge=0.0)  # ASL focusing on negatives (Ridnik et al. 2021)
    gamma_pos: float = Field(1.0, ge=0.0)  # ASL focusing on positives
    clip: float = Field(0.05, ge=0.0, lt=1.0)  # probability shift of negatives
    emotion_weight: float = Field(1.0, ge=0.0)  # weight of the emotion loss in the total
    affect_weight: float = Field(1.0, ge=0.0)  # weight of the valence/arousal Smooth L1
    affect_beta: float = Field(1 / 9, gt=0.0)  # Smooth L1 switch point: half a 1..10 scale point in [-1, 1] units


class TrainConfig(_Frozen):
    image_size: int = Field(224, ge=32)  # side of the square network input
    context_size: int = Field(224, ge=32)  # side of the full-image input (body_context)
    batch_size: int = Field(32, ge=1)  # the seed's batch size
    epochs: int = Field(50, ge=1)  # the seed's epoch count; early stopping may end sooner
    lr: float = Field(1e-4, gt=0.0)  # AdamW learning rate
    weight_decay: float = Field(1e-4, ge=0.0)  # AdamW decoupled weight decay
    # plateau: ReduceLROnPlateau on val mAP, per epoch (the seed's); cosine: per-step decay to 0 after warm-up
    scheduler: Scheduler = "plateau"
    warmup_epochs: float = Field(0.0, ge=0.0)  # cosine only: linear rise from 0 to lr; spares AdamW's first noisy steps
    scheduler_factor: float = Field(0.1, gt=0.0, lt=1.0)  # ReduceLROnPlateau factor
    scheduler_patience: int = Field(3, ge=0)  # epochs without val mAP gain before lowering lr
    early_stopping_patience: int | None = Field(8, ge=1)  # None disables early stopping
    grad_clip_norm: float | None = Field(None, gt=0.0)  # max gradient norm; None: no clipping
    augment: bool = True  # flips, colour jitter and rotation on the train split
    num_workers: int = Field(2, ge=0)  # DataLoader worker processes
    seed: int = 0  # seeds Python, NumPy and torch
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    amp: bool = True  # mixed precision, used on CUDA only

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


def load_config(path: str | Path | None = None, **overrides: Any) -> EmoNetConfig:
    """Load an :class:`EmoNetConfig` from YAML; missing sections take their defaults.

    ``overrides`` are merged section by section, e.g. ``train={"epochs": 3}``.
    """
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return EmoNetConfig.model_validate(data)


def config_to_dict(config: EmoNetConfig) -> dict[str, Any]:
    """The config as plain JSON/YAML-safe types (paths as strings)."""
    return config.model_dump(mode="json")
