"""Encoders by name (torchvision's and timm's), per-stream preprocessing, frozen trunks and
pretrained weights offline: small timm models with random weights, no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emonet.config import load_config
from emonet.models.encoders import (
    MissingWeightsError,
    Preprocessing,
    config_transforms,
    encoder_preprocessing,
    stream_preprocessing,
)
from emonet.models.network import build_model, check_pretrained_weights
from emonet.schema import IMAGENET_MEAN, IMAGENET_STD

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
TWO_TRUNKS = {
    "backbone": "timm:resnet10t",
    "variant": "body_context",
    "context_backbone": "timm:vit_tiny_patch16_224",
    "dropout": 0.0,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a machine without the network: timm's hub lookups fail at once, not after retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_each_encoder_brings_its_own_size_mean_and_std():
    assert encoder_preprocessing("resnet18") == Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD)
    assert encoder_preprocessing("timm:resnet10t") == Preprocessing(176, IMAGENET_MEAN, IMAGENET_STD)
    clip = encoder_preprocessing("timm:vit_base_patch16_clip_224.openai")
    assert clip.size == 224 and clip.mean == pytest.approx(CLIP_MEAN)
    assert encoder_preprocessing("timm:vit_base_patch16_clip_224.openai", 112).size == 112  # the config's side wins
    body, context = stream_preprocessing(load_config(model=TWO_TRUNKS, train={"image_size": 64}))
    assert body == Preprocessing(64, IMAGENET_MEAN, IMAGENET_STD)
    assert context == Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # vit_tiny's augreg statistics


def test_each_stream_is_normalized_with_its_encoders_statistics():
    config = load_config(model=TWO_TRUNKS, train={"image_size": 48, "context_size": 32})
    transform = config_transforms(config, train=False)
    white = torch.full((3, 20, 20), 255, dtype=torch.uint8)
    body, context = transform(white, white)
    assert body.shape == (3, 48, 48) and context.shape == (3, 32, 32)
    expected_body = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(body[:, 0, 0], expected_body, atol=1e-5)
    assert torch.allclose(context[:, 0, 0], torch.ones(3), atol=1e-5)  # (1 - 0.5) / 0.5


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"backbone": "timm:"}, "names no timm model"),
        ({"backbone": "vgg16"}, "unknown model.backbone 'vgg16'"),
        ({"context_backbone": "timm:resnet10t"}, "needs variant 'body_context'"),
        ({"freeze_context": True}, "needs variant 'body_context'"),
    ],
)
def test_bad_encoder_settings_are_refused_by_name(model, match):
    with pytest.raises(ValueError, match=match):
        load_config(model=model)


def test_an_unknown_timm_model_or_tag_is_named():
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        build_model(load_config(model={"backbone": "timm:no_such_net"}))
    with pytest.raises(ValueError, match="no pretrained tag 'resnet10t.nope'"):
        encoder_preprocessing("timm:resnet10t.nope")


def test_two_different_trunks_with_a_frozen_context_train_only_the_rest():
    config = load_config(model={**TWO_TRUNKS, "freeze_context": True}, train={"image_size": 64, "context_size": 64})
    model = build_model(config)
    assert model.num_features == 512 + 192  # resnet10t's and vit_tiny's pooled widths
    model.train()
    assert model.body_trunk.training and not model.context_trunk.training  # BatchNorm/dropout as at inference
    assert not any(p.requires_grad for p in model.context_trunk.parameters())
    assert all(p.requires_grad for p in model.body_trunk.parameters())
    output = model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))  # the ViT built for 64 px
    assert output.emotion_logits.shape == (2, 26) and output.features.shape == (2, 704)


def test_pretrained_weights_offline_give_one_line_naming_the_model_the_file_and_the_ways(tmp_path: Path):
    config = load_config(model={"backbone": "timm:resnet10t", "pretrained": True})
    with pytest.raises(MissingWeightsError) as caught:
        check_pretrained_weights(config.model)
    message = str(caught.value)
    assert "\n" not in message and "timm:resnet10t" in message
    assert "hf-hub:timm/resnet10t.c3_in1k" in message  # the file expected
    assert "model.weights_path" in message and "HF_HUB_OFFLINE=1" in message
    missing = load_config(model={"backbone": "timm:resnet10t", "pretrained": True, "weights_path": tmp_path / "x"})
    with pytest.raises(FileNotFoundError, match="model.weights_path not found"):
        check_pretrained_weights(missing.model)


def test_a_local_weights_file_loads_into_a_timm_trunk(tmp_path: Path):
    import timm

    source = timm.create_model("resnet10t", pretrained=False)  # with its classifier, as timm saves it
    weights = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), weights)
    config = load_config(model={"backbone": "timm:resnet10t", "pretrained": True, "weights_path": weights})
    check_pretrained_weights(config.model)
    model = build_model(config)
    assert torch.equal(model.body_trunk.conv1[0].weight, source.conv1[0].weight)


def test_the_flow_refuses_missing_weights_before_any_data_work(tmp_path: Path):
    from flows.training_pipeline import emonet_training_pipeline

    config = tmp_path / "recipe.yaml"
    config.write_text("model:\n  backbone: timm:resnet10t\n  pretrained: true\n")
    # The flow's own body (without Prefect's engine, which adds nothing to this check).
    with pytest.raises(MissingWeightsError, match="pretrained weights of timm:resnet10t not found"):
        emonet_training_pipeline.fn(config=str(config), demo_dir=tmp_path / "demo", out_dir=tmp_path / "out")
    assert not (tmp_path / "demo").exists()  # the demo archive was not even generated


def test_emonet_train_gives_one_line_for_missing_weights(tmp_path: Path, capsys):
    from emonet.cli import main

    config = tmp_path / "recipe.yaml"
    config.write_text("model:\n  backbone: timm:resnet10t\n  pretrained: true\n")
    missing = str(tmp_path / "missing.csv")
    args = ["train", "--config", str(config), "--train-csv", missing, "--val-csv", missing, "--img-dir", str(tmp_path)]
    assert main([*args, "--checkpoint-dir", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("emonet train: error: pretrained weights of timm:resnet10t not found")


# --------------------------------------------------------------------------- trained on the demo data


def _train(root: Path, out: Path, model: dict, size: int = 32):
    from emonet.schema import annotations_path, arrays_dir
    from emonet.training.trainer import train_from_csvs

    config = load_config(
        model={"dropout": 0.0, **model},
        train={"image_size": size, "context_size": size, "epochs": 1, "batch_size": 8, "num_workers": 0},
    )
    train_csv, val_csv = annotations_path(root, "train"), annotations_path(root, "val")
    return config, train_from_csvs(train_csv, val_csv, arrays_dir(root), config, out, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model",
    [
        {"backbone": "timm:resnet10t"},
        {"backbone": "timm:vit_tiny_patch16_224"},
    ],
    ids=["resnet10t", "vit_tiny"],
)
def test_an_epoch_trains_with_timm_encoders_and_the_checkpoint_rebuilds_them(demo_checkpoint, tmp_path, model):
    from emonet.models.checkpoint import load_checkpoint

    config, result = _train(demo_checkpoint[0], tmp_path / "run", model)
    reloaded, stored, _ = load_checkpoint(result.best_checkpoint)  # rebuilt from the stored config, no network
    assert stored.model == config.model
    _assert_trained(config, reloaded)


def _assert_trained(config, reloaded) -> None:
    """The body trunk moved from its initial weights; a frozen context trunk did not."""
    from emonet.training.seeding import seed_everything

    seed_everything(config.train.seed)  # as the run did before building its model
    fresh = build_model(config)
    if config.model.freeze_context:
        pairs = zip(
            fresh.context_trunk.state_dict().values(), reloaded.context_trunk.state_dict().values(), strict=True
        )
        assert all(torch.equal(a, b) for a, b in pairs)
    trained = reloaded.body_trunk.state_dict()
    assert any(
        not torch.equal(v, trained[k]) for k, v in fresh.body_trunk.state_dict().items() if v.is_floating_point()
    )


@pytest.mark.slow
def test_a_two_trunk_model_with_a_frozen_context_serves_in_a_fresh_process(demo_checkpoint, mlflow_store, tmp_path):
    import json
    import textwrap

    import numpy as np
    from mlflow import MlflowClient

    from emonet.inference.loading import load_predictor
    from emonet.models.checkpoint import load_checkpoint
    from emonet.tracking.run_logging import log_emonet_model

    config, result = _train(demo_checkpoint[0], tmp_path / "run", {**TWO_TRUNKS, "freeze_context": True})
    _assert_trained(config, load_checkpoint(result.best_checkpoint)[0])
    client = MlflowClient()
    run_id = client.create_run(mlflow_store["experiment_id"]).info.run_id
    version = log_emonet_model(run_id, result.best_checkpoint, registered_model_name="emonet-timm")
    client.set_terminated(run_id)
    rng = np.random.default_rng(0)
    crop, scene = rng.integers(0, 256, (40, 30, 3), np.uint8), rng.integers(0, 256, (60, 80, 3), np.uint8)
    np.save(tmp_path / "crop.npy", crop)
    np.save(tmp_path / "scene.npy", scene)
    here = load_predictor(result.best_checkpoint, device="cpu").predict_proba([crop], [scene])[0]
    script = textwrap.dedent(
        f"""
        import json, mlflow, pandas as pd
        mlflow.set_tracking_uri({mlflow_store["uri"]!r}); mlflow.set_registry_uri({mlflow_store["uri"]!r})
        model = mlflow.pyfunc.load_model("models:/emonet-timm/{version.version}")
        served = model.unwrap_python_model()
        out = model.predict(pd.DataFrame({{"image_path": ["crop.npy"], "context_path": ["scene.npy"]}}))
        print(json.dumps({{"runtime": served.predictor.runtime, "probs": out.filter(like="prob_").iloc[0].tolist()}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"}}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert np.allclose(served["probs"], here[0], atol=1e-4), (served, here[0])
    assert served["runtime"] == "onnxruntime"  # both trunks exported to ONNX and checked at registration
    import mlflow

    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/emonet-timm/{version.version}")).read_text()
    assert "timm==1.0.31" in requirements  # the served model installs the encoder's library
