"""EmoNet model: shapes, gradients, input checks and weight loading, all offline on CPU."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

from emonet.config import ModelConfig
from emonet.models.network import (
    EMOTION_PRIOR,
    EmoNet,
    EmoNetOutput,
    _hub_checkpoint_path,
    build_model,
    create_trunk,
)
from emonet.schema import NUM_EMOTIONS
from emonet.training.losses import EmoNetLoss

BACKBONES = ["resnet18", "resnet34", "resnet50", "efficientnet_b0"]
FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "efficientnet_b0": 1280}
SIZE = 64


def _inputs(model: EmoNet, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    body = torch.randn(batch, 3, SIZE, SIZE, generator=gen)
    # A different size for the full image: the two trunks must not need equal inputs.
    context = torch.randn(batch, 3, SIZE + 16, SIZE, generator=gen) if model.variant == "body_context" else None
    return body, context


@pytest.mark.parametrize("variant", ["body", "body_context"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_forward_backward(backbone: str, variant: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, variant=variant))
    assert model.variant == variant and model.config.backbone == backbone
    assert model.num_features == FEATURES[backbone] * (2 if variant == "body_context" else 1)
    body, context = _inputs(model)

    model.train()  # BatchNorm in train mode: batch of 2 so the statistics are defined
    out = model(body, context)
    assert isinstance(out, EmoNetOutput)
    assert out.emotion_logits.shape == (2, NUM_EMOTIONS)
    assert out.affect.shape == (2, 2)
    assert torch.isfinite(out.emotion_logits).all() and torch.isfinite(out.affect).all()
    assert (out.affect.abs() <= 1).all()

    emotions = (torch.rand(2, NUM_EMOTIONS) < 0.3).float()
    affect = torch.rand(2, 2) * 2 - 1
    EmoNetLoss()(out, emotions, affect).total.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if variant == "body_context":
        # The full image really reaches the heads through its own trunk.
        assert any(p.grad.abs().sum() > 0 for p in model.context_trunk.parameters())


def test_features_and_head_compose_in_eval() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", variant="body_context")).eval()
    body, context = _inputs(model, batch=2)
    with torch.inference_mode():
        features = model.forward_features(body, context)
        assert features.shape == (2, model.num_features)
        split = model.forward_head(features)
        whole = model(body, context)
        # channels_last inputs and weights give the same answer.
        model_cl = model.to(memory_format=torch.channels_last)
        cl = model_cl(body.to(memory_format=torch.channels_last), context.to(memory_format=torch.channels_last))
    torch.testing.assert_close(split.emotion_logits, whole.emotion_logits)
    torch.testing.assert_close(split.affect, whole.affect)
    torch.testing.assert_close(cl.emotion_logits, whole.emotion_logits, rtol=1e-4, atol=1e-4)


def test_heads_start_at_the_label_prior() -> None:
    model = build_model(ModelConfig(backbone="resnet18"))
    bias = torch.sigmoid(model.emotion_head.bias)
    torch.testing.assert_close(bias, torch.full_like(bias, EMOTION_PRIOR))
    assert torch.count_nonzero(model.affect_head.bias) == 0


def test_input_errors() -> None:
    body_model = build_model(ModelConfig(backbone="resnet18", variant="body"))
    ctx_model = build_model(ModelConfig(backbone="resnet18", variant="body_context"))
    x = torch.randn(2, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="needs the full image"):
        ctx_model(x)
    with pytest.raises(ValueError, match="context was given"):
        body_model(x, x)
    with pytest.raises(ValueError, match=r"body must have shape \(B, 3, H, W\), got \(3, 64, 64\)"):
        body_model(x[0])
    with pytest.raises(ValueError, match=r"got \(2, 1, 64, 64\)"):
        body_model(x[:, :1])
    with pytest.raises(ValueError, match="context must have shape"):
        ctx_model(x, x[:, :2])
    with pytest.raises(ValueError, match="batch sizes differ: 2 vs 1"):
        ctx_model(x, x[:1])
    with pytest.raises(ValueError, match="features must have shape"):
        body_model.forward_head(torch.randn(2, 7))


def test_config_rejects_unknown_and_bad_values() -> None:
    with pytest.raises(ValueError, match="foo"):
        ModelConfig(foo=1)
    with pytest.raises(ValueError, match="backbone"):
        ModelConfig(backbone="vgg16")
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        create_trunk("vgg16")


def _random_backbone_state(backbone: str, seed: int) -> dict[str, torch.Tensor]:
    """A full torchvision state_dict (classifier included), random but reproducible."""
    torch.manual_seed(seed)
    return getattr(tvm, backbone)(weights=None).state_dict()


@pytest.mark.parametrize("variant", ["body", "body_context"])
def test_weights_path_loads_into_every_trunk(tmp_path: Path, variant: str) -> None:
    state = _random_backbone_state("resnet18", seed=123)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(backbone="resnet18", variant=variant, pretrained=True, weights_path=path))
    for trunk in model.trunks:
        torch.testing.assert_close(trunk.conv1.weight, state["conv1.weight"], rtol=0, atol=0)
        torch.testing.assert_close(trunk.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"], rtol=0, atol=0)
    # The override skips loading, as when a checkpoint is about to replace the weights.
    fresh = build_model(ModelConfig(backbone="resnet18", pretrained=True, weights_path=path), pretrained=False)
    assert not torch.equal(fresh.body_trunk.conv1.weight, state["conv1.weight"])


def test_weights_path_without_classifier_or_counters(tmp_path: Path) -> None:
    # A trunk saved with its head removed and no num_batches_tracked still loads.
    state = {
        k: v
        for k, v in _random_backbone_state("efficientnet_b0", seed=1).items()
        if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "effnet.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(backbone="efficientnet_b0", pretrained=True, weights_path=path))
    torch.testing.assert_close(model.body_trunk.features[0][0].weight, state["features.0.0.weight"], rtol=0, atol=0)


def test_weights_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(ModelConfig(backbone="resnet18", pretrained=True, weights_path=tmp_path / "nope.pth"))

    state = _random_backbone_state("resnet18", seed=0)
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing.pth does not match.*missing keys \['layer4"):
        build_model(ModelConfig(backbone="resnet18", pretrained=True, weights_path=tmp_path / "missing.pth"))

    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"1 unexpected keys \['extra.weight'\]"):
        build_model(ModelConfig(backbone="resnet18", pretrained=True, weights_path=tmp_path / "extra.pth"))

    # resnet18 weights for a resnet50: wrong keys and shapes, refused with a clear message.
    torch.save(state, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="does not match the ResNet backbone"):
        build_model(ModelConfig(backbone="resnet50", pretrained=True, weights_path=tmp_path / "r18.pth"))

    resized = {**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}
    torch.save(resized, tmp_path / "resized.pth")
    with pytest.raises(ValueError, match=r"shape mismatch.*conv1.weight"):
        build_model(ModelConfig(backbone="resnet18", pretrained=True, weights_path=tmp_path / "resized.pth"))

    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth is not a readable torch state_dict"):
        build_model(ModelConfig(backbone="resnet18", pretrained=True, weights_path=tmp_path / "junk.pth"))


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """An empty torch hub cache whose downloads fail as if offline; returns the URLs tried."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case something called set_dir
    tried: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert Path(torch.hub.get_dir()).is_relative_to(tmp_path)
    return tried


def test_pretrained_offline_error_says_how_to_fix(empty_hub: list[str]) -> None:
    weights = tvm.ResNet18_Weights.DEFAULT
    cached = _hub_checkpoint_path(weights.url)
    with pytest.raises(RuntimeError) as info:
        build_model(ModelConfig(backbone="resnet18", pretrained=True))
    message = str(info.value)
    assert weights.url in message
    assert str(cached) in message
    assert "weights_path" in message and "pretrained: false" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert empty_hub == [weights.url]


def test_pretrained_uses_hub_cache_without_download(empty_hub: list[str]) -> None:
    state = _random_backbone_state("resnet18", seed=7)
    cached = _hub_checkpoint_path(tvm.ResNet18_Weights.DEFAULT.url)
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    model = build_model(ModelConfig(backbone="resnet18", variant="body_context", pretrained=True))
    assert empty_hub == []  # nothing downloaded
    for trunk in model.trunks:
        torch.testing.assert_close(trunk.layer1[0].conv1.weight, state["layer1.0.conv1.weight"], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_channels_last_on_cuda() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", variant="body_context"))
    model = model.to(device, memory_format=torch.channels_last)
    body = torch.randn(4, 3, SIZE, SIZE, device=device).to(memory_format=torch.channels_last)
    context = torch.randn(4, 3, SIZE, SIZE, device=device).to(memory_format=torch.channels_last)
    emotions = (torch.rand(4, NUM_EMOTIONS, device=device) < 0.3).float()
    affect = torch.rand(4, 2, device=device) * 2 - 1
    with torch.autocast("cuda", dtype=torch.float16):
        out = model(body, context)
        loss = EmoNetLoss()(out, emotions, affect)
    assert out.emotion_logits.dtype == torch.float16
    assert loss.total.dtype == torch.float32 and torch.isfinite(loss.total)
    loss.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
