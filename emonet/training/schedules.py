"""The learning-rate schedules of ``train.scheduler``."""

from __future__ import annotations

import math

import torch

from emonet.config import TrainConfig

__all__ = ["build_scheduler"]


def build_scheduler(
    optimizer: torch.optim.Optimizer, train_config: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau, bool]:
    """The learning-rate schedule of ``train_config.scheduler`` and whether it steps per batch.

    ``"plateau"``: ReduceLROnPlateau on val mAP (``scheduler_factor``,
    ``scheduler_patience``), stepped once per epoch with the metric. ``"cosine"``: a
    linear rise from 0 to ``lr`` over ``warmup_epochs``, then a cosine decay to 0 at
    the end of ``epochs``, stepped after every optimizer step. Both keep their
    position in ``state_dict()``, so a resumed run continues the same curve.

    Returns
    -------
    (scheduler, per_step) : ``per_step`` is True when ``scheduler.step()`` follows every
        batch, False when ``scheduler.step(val_mAP)`` follows every epoch.
    """
    if train_config.scheduler == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=train_config.scheduler_factor, patience=train_config.scheduler_patience
        )
        return plateau, False
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    warmup_steps = round(train_config.warmup_epochs * steps_per_epoch)
    total_steps = max(train_config.epochs * steps_per_epoch, warmup_steps + 1)

    def lr_factor(step: int) -> float:
        # Step s sets the rate of batch s + 1, so the first batch already trains (lr / warmup_steps).
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor), True
