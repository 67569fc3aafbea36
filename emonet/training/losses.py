"""Training losses: the asymmetric multi-label loss on the 26 emotions and the combined
EmoNet loss (plus Smooth L1 on valence/arousal)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emonet.config import LossConfig
from emonet.models.network import EmoNetOutput
from emonet.schema import SCALE_MAX, SCALE_MIN

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")

# Smooth L1's switch point for valence/arousal in [-1, 1]: half a point of the 1..10
# annotation scale (one point is 2 / 9 after normalisation). Errors below it are
# within annotator noise and get the smooth quadratic; larger ones get L1, so a few
# outlying annotations do not dominate as under MSE. torch's default beta=1.0 would
# leave almost every error (at most 2, usually far below 1) in the quadratic zone,
# i.e. plain MSE / 2.
AFFECT_BETA = 0.5 * 2.0 / (SCALE_MAX - SCALE_MIN)


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    return reduction


def _check_pair(prediction: Tensor, target: Tensor, name: str) -> Tensor:
    """Check a (B, C) prediction and its target; return the target as float32."""
    if prediction.ndim != 2:
        raise ValueError(f"{name} predictions must have shape (B, C), got {tuple(prediction.shape)}")
    if target.shape != prediction.shape:
        raise ValueError(f"{name} targets have shape {tuple(target.shape)}, predictions {tuple(prediction.shape)}")
    if target.is_complex():
        raise ValueError(f"{name} targets must be real, got {target.dtype}")
    return target.float()  # bool / integer labels are fine too


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    """Reduce a (B, C) element-wise loss: per-sample sum over C, then mean over B."""
    if reduction == "mean":
        return loss.sum(dim=1).mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class AsymmetricLoss(nn.Module):
    """Asymmetric loss for multi-label classification (Ridnik et al., ICCV 2021).

    Per label with probability ``p = sigmoid(logit)`` and target ``y``::

        p_neg = min(1 - p + clip, 1)                      # probability shifting
        loss  = -[y log(max(p, eps)) (1 - p)^gamma_pos
                  + (1 - y) log(max(p_neg, eps)) (1 - p_neg)^gamma_neg]

    Shifting discards negatives that are already easy (``p < clip`` gives zero loss
    and gradient, which also rejects some mislabelled negatives) and the larger
    ``gamma_neg`` down-weights the many easy negatives of a 26-label problem. With
    ``gamma_neg = gamma_pos = clip = 0`` it is binary cross-entropy.

    Args:
        gamma_neg: focusing exponent of negatives.
        gamma_pos: focusing exponent of positives.
        clip: probability shift of negatives, in [0, 1).
        eps: floor of the probabilities inside the logs.
        disable_torch_grad_focal_loss: compute the focusing weights without gradient,
            i.e. as constants, as in the reference implementation.
        reduction: ``"mean"`` (default) sums over labels and averages over the batch;
            ``"sum"`` sums over everything, as the reference does; ``"none"`` returns
            the (B, C) element-wise losses. The reference's plain sum makes the gradient
            grow with the batch size, so the learning rate would have to be retuned
            whenever the batch size changes; the per-sample sum keeps the scale of one
            sample's 26 binary losses while the batch mean removes that coupling.
        label_weights: optional (C,) non-negative weights multiplying each label's loss,
            e.g. to up-weight rare emotions; kept as a buffer so it follows ``.to()``.

    Shapes: logits (B, C), targets (B, C) in [0, 1] (bool and integer labels are
    cast). Targets' values are not checked, since that would synchronise with the GPU
    on every step.
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 1.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        disable_torch_grad_focal_loss: bool = True,
        reduction: str = "mean",
        label_weights: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        if gamma_neg < 0 or gamma_pos < 0:
            raise ValueError(f"gammas must be >= 0, got gamma_neg={gamma_neg}, gamma_pos={gamma_pos}")
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"clip must be in [0, 1), got {clip}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = float(clip)
        self.eps = float(eps)
        self.disable_torch_grad_focal_loss = disable_torch_grad_focal_loss
        self.reduction = _check_reduction(reduction)
        weights = None
        if label_weights is not None:
            weights = torch.as_tensor(label_weights, dtype=torch.float32).detach().clone()
            if weights.ndim != 1 or not bool((weights >= 0).all()):
                raise ValueError(f"label_weights must be a 1-D sequence of non-negative numbers, got {label_weights!r}")
        self.label_weights: Tensor | None
        self.register_buffer("label_weights", weights)

    def extra_repr(self) -> str:
        return (
            f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, "
            f"eps={self.eps}, reduction={self.reduction!r}"
        )

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The loss of (B, C) ``logits`` against (B, C) ``targets``, reduced as configured."""
        y = _check_pair(logits, targets, "emotion")  # (B, C) float32
        if self.label_weights is not None and self.label_weights.numel() != logits.shape[1]:
            raise ValueError(f"label_weights has {self.label_weights.numel()} entries for {logits.shape[1]} labels")
        # float32 throughout: under AMP the logits arrive in float16/bfloat16, where
        # 1 - sigmoid rounds to 0 for moderate logits and eps=1e-8 is below float16's
        # smallest subnormal (~6e-8), so the clamped logs would become -inf or lose the
        # small losses that carry the signal. Autograd casts the gradient back.
        x = logits.float()
        xs_pos = torch.sigmoid(x)  # (B, C)
        # sigmoid(-x), not 1 - sigmoid(x): the subtraction cancels catastrophically for
        # large logits (at x = 10 the reference's log(1 - p) is off by ~4e-4).
        xs_neg = torch.sigmoid(-x)
        if self.clip > 0:
            xs_neg = (xs_neg + self.clip).clamp(max=1.0)
        loss = y * torch.log(xs_pos.clamp(min=self.eps)) + (1.0 - y) * torch.log(xs_neg.clamp(min=self.eps))

        if self.gamma_neg > 0 or self.gamma_pos > 0:
            # A scoped context restores the caller's grad mode on exit, so a call under
            # torch.no_grad() or inference_mode() stays gradient-free (the reference
            # toggles grad mode globally and switches it back *on*).
            no_grad = self.disable_torch_grad_focal_loss and torch.is_grad_enabled()
            with torch.set_grad_enabled(False) if no_grad else contextlib.nullcontext():
                pt = xs_pos * y + xs_neg * (1.0 - y)  # probability of the true outcome
                gamma = self.gamma_pos * y + self.gamma_neg * (1.0 - y)
                weight = torch.pow(1.0 - pt, gamma)  # (B, C)
            loss = loss * weight

        loss = -loss
        if self.label_weights is not None:
            loss = loss * self.label_weights
        return _reduce(loss, self.reduction)


def masked_affect_loss(prediction: Tensor, target: Tensor, beta: float) -> Tensor:
    """Smooth L1 of (B, C) predictions against targets, skipping NaN targets.

    The mean over the finite targets times ``C``: with every target finite this is the
    per-sample sum over the C outputs averaged over the batch, the scale of the emotion
    loss, whatever the share of masked targets. A batch without a finite target gives 0
    (and zero gradients), not NaN. Rows with an invalid affect annotation keep training
    the emotion head this way, and their NaN never reaches the weights.
    """
    valid = torch.isfinite(target)  # (B, C)
    # Masked targets are replaced before the loss, not after: NaN * 0 is still NaN, and
    # its gradient would poison the prediction's.
    filled = torch.where(valid, target, torch.zeros_like(target))
    # float32 for the same reason as the emotion loss: AMP's half precision.
    elementwise = F.smooth_l1_loss(prediction.float(), filled, reduction="none", beta=beta) * valid
    # A tensor count, not .item(): no synchronisation with the GPU on every step.
    n_valid = valid.sum().clamp(min=1)
    return elementwise.sum() / n_valid * prediction.shape[1]


class LossOutput(NamedTuple):
    """The combined loss and its unweighted parts (scalar float32 tensors)."""

    total: Tensor  # emotion_weight * emotion + affect_weight * affect; call backward on this
    emotion: Tensor  # asymmetric loss on the 26 emotions
    affect: Tensor  # Smooth L1 on valence and arousal


class EmoNetLoss(nn.Module):
    """Asymmetric loss on emotion logits plus Smooth L1 on valence/arousal.

    Both parts use the same scale: summed over a sample's outputs (26 labels, or
    valence and arousal), averaged over the batch.

    Args:
        emotion_weight: weight of the emotion part in the total.
        affect_weight: weight of the valence/arousal part in the total.
        gamma_neg, gamma_pos, clip, eps, label_weights: see :class:`AsymmetricLoss`.
        affect_beta: Smooth L1's switch from quadratic to linear, in units of the
            [-1, 1] targets; the default is half a point of the 1..10 scale.
    """

    def __init__(
        self,
        emotion_weight: float = 1.0,
        affect_weight: float = 1.0,
        gamma_neg: float = 4.0,
        gamma_pos: float = 1.0,
        clip: float = 0.05,
        affect_beta: float = AFFECT_BETA,
        eps: float = 1e-8,
        label_weights: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        if emotion_weight < 0 or affect_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got emotion_weight={emotion_weight}, affect_weight={affect_weight}"
            )
        if affect_beta < 0:
            raise ValueError(f"affect_beta must be >= 0, got {affect_beta}")
        self.emotion_weight = float(emotion_weight)
        self.affect_weight = float(affect_weight)
        self.affect_beta = float(affect_beta)
        self.emotion_loss = AsymmetricLoss(
            gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps, reduction="mean", label_weights=label_weights
        )

    @classmethod
    def from_config(cls, config: LossConfig, **kwargs: object) -> EmoNetLoss:
        """Build from the loss section of the run config; ``kwargs`` override or add arguments."""
        # Every LossConfig field is a constructor argument, so a field added there is
        # picked up here without another edit.
        return cls(**{**config.model_dump(), **kwargs})

    def extra_repr(self) -> str:
        return (
            f"emotion_weight={self.emotion_weight}, affect_weight={self.affect_weight}, affect_beta={self.affect_beta}"
        )

    def forward(self, output: EmoNetOutput, emotions: Tensor, affect: Tensor) -> LossOutput:
        """Loss of a model output against (B, 26) emotion labels and (B, 2) valence/arousal
        in [-1, 1]; NaN affect targets (invalid annotations) are skipped, see
        :func:`masked_affect_loss`."""
        emotion_loss = self.emotion_loss(output.emotion_logits, emotions)
        affect_target = _check_pair(output.affect, affect, "affect")
        if affect_target.shape[0] != emotions.shape[0]:
            raise ValueError(f"batch sizes differ: emotions {emotions.shape[0]}, affect {affect_target.shape[0]}")
        affect_loss = masked_affect_loss(output.affect, affect_target, self.affect_beta)
        total = self.emotion_weight * emotion_loss + self.affect_weight * affect_loss
        return LossOutput(total=total, emotion=emotion_loss, affect=affect_loss)
