"""Asymmetric and combined losses: identities with BCE, grad-mode hygiene, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from emonet.config import LossConfig
from emonet.models.network import EmoNetOutput
from emonet.schema import NUM_EMOTIONS
from emonet.training.losses import AFFECT_BETA, AsymmetricLoss, EmoNetLoss, LossOutput


def _batch(batch: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, NUM_EMOTIONS, generator=gen) * 3
    targets = (torch.rand(batch, NUM_EMOTIONS, generator=gen) < 0.3).float()
    return logits, targets


def _bce(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return {"mean": loss.sum(1).mean(), "sum": loss.sum(), "none": loss}[reduction]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("disable_grad", [True, False])
def test_asl_without_focusing_or_clip_is_bce(reduction: str, disable_grad: bool) -> None:
    logits, targets = _batch()
    asl = AsymmetricLoss(
        gamma_neg=0, gamma_pos=0, clip=0, reduction=reduction, disable_torch_grad_focal_loss=disable_grad
    )
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    ours = asl(x1, targets)
    ref = _bce(x2, targets, reduction)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.rand_like(ref)  # a non-uniform upstream gradient for reduction="none"
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_asl_matches_closed_form() -> None:
    logits, targets = _batch(seed=1)
    gamma_neg, gamma_pos, clip = 4.0, 1.0, 0.05
    ours = AsymmetricLoss(gamma_neg, gamma_pos, clip, reduction="none")(logits, targets)
    p = torch.sigmoid(logits)
    p_neg = (1 - p + clip).clamp(max=1)
    expected = -(
        targets * torch.log(p.clamp(min=1e-8)) * (1 - p) ** gamma_pos
        + (1 - targets) * torch.log(p_neg.clamp(min=1e-8)) * (1 - p_neg) ** gamma_neg
    )
    torch.testing.assert_close(ours, expected)
    # "mean" is the per-sample sum over labels averaged over the batch; "sum" the total.
    torch.testing.assert_close(AsymmetricLoss(reduction="mean")(logits, targets), expected.sum(1).mean())
    torch.testing.assert_close(AsymmetricLoss(reduction="sum")(logits, targets), expected.sum())


def test_asl_focusing_and_shift_properties() -> None:
    # One easy negative (p ~ 0.018 < clip), one hard negative and one positive.
    logits = torch.tensor([[-4.0, 2.0, 1.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 0.0, 1.0]])
    loss = AsymmetricLoss(reduction="none")(logits, targets)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert loss[0, 0] == 0  # shifted below zero probability: discarded
    assert (loss[0, 1:] < bce[0, 1:]).all()  # focusing only lowers the loss
    loss.sum().backward()
    assert logits.grad[0, 0] == 0
    assert logits.grad[0, 1] > 0 and logits.grad[0, 2] < 0  # still pushes the right way


def test_focal_weights_are_constants_when_grad_disabled() -> None:
    logits, targets = _batch(seed=2)
    x_const = logits.clone().requires_grad_()
    x_full = logits.clone().requires_grad_()
    AsymmetricLoss(disable_torch_grad_focal_loss=True)(x_const, targets).backward()
    AsymmetricLoss(disable_torch_grad_focal_loss=False)(x_full, targets).backward()
    # Reference: the same loss with the focusing weight detached by hand.
    x_ref = logits.clone().requires_grad_()
    p = torch.sigmoid(x_ref)
    p_neg = (1 - p + 0.05).clamp(max=1)
    pt = (p * targets + p_neg * (1 - targets)).detach()
    w = (1 - pt) ** (1.0 * targets + 4.0 * (1 - targets))
    ce = targets * torch.log(p.clamp(min=1e-8)) + (1 - targets) * torch.log(p_neg.clamp(min=1e-8))
    (-(ce * w).sum(1).mean()).backward()
    torch.testing.assert_close(x_const.grad, x_ref.grad)
    assert not torch.allclose(x_const.grad, x_full.grad)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_asl_leaves_grad_mode_alone(context) -> None:
    logits, targets = _batch()
    logits.requires_grad_()
    with context():
        loss = AsymmetricLoss()(logits, targets)
        assert not torch.is_grad_enabled()
    assert loss.grad_fn is None and not loss.requires_grad
    assert torch.is_grad_enabled()
    # And with grad enabled the loss is differentiable and grad mode stays on.
    assert AsymmetricLoss()(logits, targets).requires_grad
    assert torch.is_grad_enabled()


def test_asl_computes_in_float32() -> None:
    logits, targets = _batch(seed=3)
    logits[0, :3] = torch.tensor([-30.0, 30.0, 12.0])  # far in the tails
    half = logits.to(torch.bfloat16).requires_grad_()
    loss = AsymmetricLoss()(half, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, AsymmetricLoss()(half.detach().float(), targets))
    loss.backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()


def test_asl_label_weights() -> None:
    logits, targets = _batch(seed=4)
    weights = torch.ones(NUM_EMOTIONS)
    weights[:5] = 0.0
    weights[5] = 3.0
    weighted = AsymmetricLoss(reduction="none", label_weights=weights)(logits, targets)
    plain = AsymmetricLoss(reduction="none")(logits, targets)
    torch.testing.assert_close(weighted, plain * weights)
    with pytest.raises(ValueError, match="label_weights has 3 entries for 26 labels"):
        AsymmetricLoss(label_weights=[1.0, 1.0, 1.0])(logits, targets)
    with pytest.raises(ValueError, match="non-negative"):
        AsymmetricLoss(label_weights=[1.0, -1.0])


def test_asl_validation() -> None:
    logits, targets = _batch()
    with pytest.raises(ValueError, match=r"reduction must be one of \['mean', 'sum', 'none'\], got 'avg'"):
        AsymmetricLoss(reduction="avg")
    with pytest.raises(ValueError, match="targets have shape"):
        AsymmetricLoss()(logits, targets[:, :-1])
    with pytest.raises(ValueError, match=r"predictions must have shape \(B, C\)"):
        AsymmetricLoss()(logits[0], targets[0])
    with pytest.raises(ValueError, match="clip"):
        AsymmetricLoss(clip=1.0)
    with pytest.raises(ValueError, match="gammas"):
        AsymmetricLoss(gamma_neg=-1.0)
    # Boolean labels are accepted and mean the same as floats.
    torch.testing.assert_close(AsymmetricLoss()(logits, targets.bool()), AsymmetricLoss()(logits, targets))


def _output(batch: int = 4, seed: int = 0) -> tuple[EmoNetOutput, torch.Tensor, torch.Tensor]:
    logits, emotions = _batch(batch, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    affect_pred = torch.tanh(torch.randn(batch, 2, generator=gen))
    affect = torch.rand(batch, 2, generator=gen) * 2 - 1
    return EmoNetOutput(logits, affect_pred), emotions, affect


def test_emonet_loss_combines_weighted_parts() -> None:
    out, emotions, affect = _output()
    parts = EmoNetLoss()(out, emotions, affect)
    assert isinstance(parts, LossOutput)
    assert all(t.ndim == 0 and t.dtype == torch.float32 for t in parts)
    torch.testing.assert_close(parts.emotion, AsymmetricLoss()(out.emotion_logits, emotions))
    expected_affect = F.smooth_l1_loss(out.affect, affect, reduction="none", beta=AFFECT_BETA).sum(1).mean()
    torch.testing.assert_close(parts.affect, expected_affect)
    torch.testing.assert_close(parts.total, parts.emotion + parts.affect)

    weighted = EmoNetLoss(emotion_weight=0.25, affect_weight=3.0)(out, emotions, affect)
    torch.testing.assert_close(weighted.emotion, parts.emotion)
    torch.testing.assert_close(weighted.affect, parts.affect)
    torch.testing.assert_close(weighted.total, 0.25 * parts.emotion + 3.0 * parts.affect)
    only_affect = EmoNetLoss(emotion_weight=0.0)(out, emotions, affect)
    torch.testing.assert_close(only_affect.total, parts.affect)


def test_affect_loss_is_quadratic_within_beta_and_linear_beyond() -> None:
    out, emotions, affect = _output()
    small = EmoNetOutput(out.emotion_logits, affect + 0.05)  # within beta: quadratic
    large = EmoNetOutput(out.emotion_logits, affect - 0.5 * torch.sign(affect))  # towards 0, inside [-1, 1]
    loss = EmoNetLoss()
    torch.testing.assert_close(loss(small, emotions, affect).affect, torch.tensor(2 * 0.5 * 0.05**2 / AFFECT_BETA))
    torch.testing.assert_close(loss(large, emotions, affect).affect, torch.tensor(2 * (0.5 - 0.5 * AFFECT_BETA)))


def test_emonet_loss_from_config_and_validation() -> None:
    config = LossConfig(gamma_neg=2.0, gamma_pos=0.0, clip=0.1, emotion_weight=0.5, affect_weight=2.0)
    loss = EmoNetLoss.from_config(config)
    assert (loss.emotion_weight, loss.affect_weight) == (0.5, 2.0)
    asl = loss.emotion_loss
    assert (asl.gamma_neg, asl.gamma_pos, asl.clip, asl.reduction) == (2.0, 0.0, 0.1, "mean")
    assert EmoNetLoss.from_config(config, affect_beta=0.3).affect_beta == 0.3
    assert EmoNetLoss.from_config(LossConfig(affect_beta=0.2)).affect_beta == 0.2
    with pytest.raises(ValueError, match="foo"):
        LossConfig(foo=1)

    out, emotions, affect = _output()
    with pytest.raises(ValueError, match="affect targets have shape"):
        loss(out, emotions, affect[:, :1])
    with pytest.raises(ValueError, match="emotion targets have shape"):
        loss(out, emotions[:2], affect)
    with pytest.raises(ValueError, match="loss weights must be >= 0"):
        EmoNetLoss(affect_weight=-1.0)


def test_emonet_loss_gradients_reach_both_heads() -> None:
    out, emotions, affect = _output()
    logits = out.emotion_logits.clone().requires_grad_()
    pre_tanh = torch.randn(4, 2, requires_grad=True)
    EmoNetLoss()(EmoNetOutput(logits, torch.tanh(pre_tanh)), emotions, affect).total.backward()
    assert logits.grad.abs().sum() > 0 and pre_tanh.grad.abs().sum() > 0


def test_nan_affect_targets_are_skipped_in_loss_and_gradient() -> None:
    out, emotions, affect = _output(batch=4)
    masked = affect.clone()
    masked[1] = float("nan")  # a row with an invalid affect annotation
    pre_tanh = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), requires_grad=True)
    logits = out.emotion_logits.clone().requires_grad_()
    prediction = torch.tanh(pre_tanh)
    parts = EmoNetLoss()(EmoNetOutput(logits, prediction), emotions, masked)
    # The mean over the 3 valid rows of the per-row sum over (valence, arousal).
    keep = [0, 2, 3]
    expected = F.smooth_l1_loss(prediction[keep], affect[keep], reduction="none", beta=AFFECT_BETA).sum(1).mean()
    torch.testing.assert_close(parts.affect, expected)
    # The masked row still trains the emotions: the emotion loss covers all 4 rows.
    torch.testing.assert_close(parts.emotion, AsymmetricLoss()(out.emotion_logits, emotions))
    parts.total.backward()
    assert torch.isfinite(pre_tanh.grad).all() and torch.isfinite(logits.grad).all()
    assert pre_tanh.grad[1].abs().sum() == 0 and pre_tanh.grad[0].abs().sum() > 0
    assert logits.grad[1].abs().sum() > 0


def test_single_nan_affect_value_masks_only_that_value() -> None:
    out, emotions, affect = _output(batch=2)
    masked = affect.clone()
    masked[0, 1] = float("nan")
    elementwise = F.smooth_l1_loss(out.affect, affect, reduction="none", beta=AFFECT_BETA)
    # Three valid values; the mean over them times the 2 outputs per row.
    expected = (elementwise[0, 0] + elementwise[1].sum()) / 3 * 2
    torch.testing.assert_close(EmoNetLoss()(out, emotions, masked).affect, expected)


def test_all_nan_affect_batch_gives_zero_affect_loss() -> None:
    out, emotions, _ = _output(batch=3)
    pre_tanh = torch.randn(3, 2, requires_grad=True)
    nan_affect = torch.full((3, 2), float("nan"))
    parts = EmoNetLoss()(EmoNetOutput(out.emotion_logits, torch.tanh(pre_tanh)), emotions, nan_affect)
    assert parts.affect.item() == 0.0
    assert torch.isfinite(parts.total) and parts.total == parts.emotion
    parts.total.backward()
    assert torch.equal(pre_tanh.grad, torch.zeros_like(pre_tanh))
