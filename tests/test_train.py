"""Tests for the training loop: learning, callbacks, checkpoints, exact resume,
early stopping, the two-stream variant and the loader helpers (tiny, CPU)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import emonet.train as train_module
from emonet.config import EmoNetConfig, config_to_dict, load_config
from emonet.demo_data import make_demo_data
from emonet.losses import EmoNetLoss, LossOutput
from emonet.metrics import EVALUATION_KEYS
from emonet.models import EmoNet, build_model
from emonet.data import affect_targets
from emonet.schema import EMOTIONS, NUM_EMOTIONS, annotations_path, arrays_dir
from emonet.train import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    build_datasets,
    build_scheduler,
    evaluate,
    fit,
    load_checkpoint,
    make_loader,
    make_loaders,
    predict,
    resolve_device,
    train_one_epoch,
)

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")

EPOCH_KEYS = {
    "epoch",
    "train_loss",
    "train_loss_emotion",
    "train_loss_affect",
    "val_loss",
    "val_loss_emotion",
    "val_loss_affect",
    "lr",
} | {f"val_{key}" for key in EVALUATION_KEYS}


def _config(variant: str = "body", **train: Any) -> EmoNetConfig:
    settings = {
        "image_size": 32,
        "context_size": 32,
        "batch_size": 16,
        "epochs": 3,
        "lr": 1e-3,
        "num_workers": 0,
        "device": "cpu",
        "seed": 7,
    }
    return load_config(model={"backbone": "resnet18", "variant": variant}, train={**settings, **train})


def _loaders(root: Path, config: EmoNetConfig):
    return make_loaders(annotations_path(root, "train"), annotations_path(root, "val"), arrays_dir(root), config)


def _model(config: EmoNetConfig) -> EmoNet:
    torch.manual_seed(0)
    return build_model(config.model)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 train / 16 val rows of 32 px demo crops with learnable glyph cues."""
    return make_demo_data(tmp_path_factory.mktemp("demo"), seed=0, n_train=32, n_val=16, n_test=1, size=32)


@pytest.fixture(scope="module")
def straight_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted 3-epoch run with augmentation and dropout, recording callbacks."""
    config = _config()
    received: list[dict[str, float]] = []
    model = _model(config)
    train_loader, val_loader = _loaders(demo_root, config)
    checkpoint_dir = tmp_path_factory.mktemp("straight")
    result = fit(
        model, train_loader, val_loader, config,
        callbacks=[received.append], checkpoint_dir=checkpoint_dir, progress=False,
    )
    return {"config": config, "model": model, "result": result, "received": received, "dir": checkpoint_dir}


def test_fit_lowers_the_training_loss(straight_run: dict[str, Any]) -> None:
    history = straight_run["result"].history
    assert len(history) == 3
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert all(math.isfinite(row["val_loss"]) for row in history)


def test_callbacks_receive_the_documented_keys(straight_run: dict[str, Any]) -> None:
    received = straight_run["received"]
    assert [row["epoch"] for row in received] == [1, 2, 3]
    for row in received:
        assert set(row) == EPOCH_KEYS
        assert all(isinstance(value, (int, float)) and math.isfinite(value) for value in row.values())
        assert 0.0 <= row["val_mAP"] <= 1.0
    assert received[0]["lr"] == pytest.approx(1e-3)
    assert received == straight_run["result"].history


def test_fit_result_and_best_checkpoint(straight_run: dict[str, Any]) -> None:
    result, directory = straight_run["result"], straight_run["dir"]
    history = result.history
    best = max(range(len(history)), key=lambda i: history[i]["val_mAP"])
    assert result.best_epoch == history[best]["epoch"]
    assert result.best_metric == pytest.approx(history[best]["val_mAP"])
    assert result.best_checkpoint == directory / BEST_CHECKPOINT
    assert result.last_checkpoint == directory / LAST_CHECKPOINT
    assert result.thresholds.shape == (NUM_EMOTIONS,)
    assert np.all((result.thresholds > 0) & (result.thresholds <= 1))
    assert not result.stopped_early

    checkpoint = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "best_epoch",
                "history", "bad_epochs", "rng", "config", "thresholds"):
        assert key in checkpoint, key
    assert checkpoint["epoch"] == result.best_epoch
    assert checkpoint["config"] == config_to_dict(straight_run["config"])
    np.testing.assert_allclose(checkpoint["thresholds"], result.thresholds)
    assert {"python", "numpy", "torch", "train_loader", "val_loader"} <= set(checkpoint["rng"])
    # fit leaves the best epoch's weights in the model (not the last epoch's).
    for name, tensor in straight_run["model"].state_dict().items():
        assert torch.equal(tensor, checkpoint["model"][name]), name
    last = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert last["epoch"] == 3 and last["thresholds"] is None and len(last["history"]) == 3


def test_load_checkpoint_rebuilds_the_model_from_its_own_config(straight_run: dict[str, Any]) -> None:
    result = straight_run["result"]
    model, config, checkpoint = load_checkpoint(result.best_checkpoint)
    assert config == straight_run["config"]
    # Today's default backbone is resnet50; the checkpoint's own config says resnet18.
    assert EmoNetConfig().model.backbone != "resnet18" and config.model.backbone == "resnet18"
    assert not model.training
    saved = checkpoint["model"]
    assert set(model.state_dict()) == set(saved)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    # The reloaded model predicts exactly as the trained one.
    body = torch.randn(2, 3, 32, 32)
    trained = straight_run["model"].eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(body).emotion_logits, trained(body).emotion_logits, rtol=0, atol=0)


def test_resume_reproduces_the_uninterrupted_run(
    straight_run: dict[str, Any], demo_root: Path, tmp_path: Path
) -> None:
    config = straight_run["config"]

    def stop_after_two(metrics: dict[str, float]) -> None:
        if metrics["epoch"] == 2:
            raise Interrupted

    train_loader, val_loader = _loaders(demo_root, config)
    with pytest.raises(Interrupted):
        fit(_model(config), train_loader, val_loader, config,
            callbacks=[stop_after_two], checkpoint_dir=tmp_path, progress=False)
    assert torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)["epoch"] == 2

    # A fresh process would rebuild everything: another initialisation, new loaders.
    torch.manual_seed(123)
    model = build_model(config.model)
    train_loader, val_loader = _loaders(demo_root, config)
    received: list[dict[str, float]] = []
    result = fit(model, train_loader, val_loader, config, callbacks=[received.append],
                 resume_from=tmp_path / LAST_CHECKPOINT, progress=False)

    assert [row["epoch"] for row in received] == [3]
    straight = straight_run["result"]
    assert len(result.history) == len(straight.history)
    for resumed_row, straight_row in zip(result.history, straight.history):
        assert resumed_row == pytest.approx(straight_row, rel=0, abs=1e-6)
    resumed_last, straight_last = _state(tmp_path / LAST_CHECKPOINT), _state(straight.last_checkpoint)
    for name, tensor in straight_last.items():
        torch.testing.assert_close(resumed_last[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert result.best_epoch == straight.best_epoch
    np.testing.assert_allclose(result.thresholds, straight.thresholds, atol=1e-6)


def test_resume_refuses_a_different_model(straight_run: dict[str, Any], demo_root: Path) -> None:
    config = _config(variant="body_context")
    train_loader, val_loader = _loaders(demo_root, config)
    with pytest.raises(ValueError, match="model config"):
        fit(_model(config), train_loader, val_loader, config,
            resume_from=straight_run["result"].last_checkpoint, progress=False)


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ValueError, match="not an EmoNet checkpoint"):
        load_checkpoint(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(garbage)


@pytest.mark.parametrize(("patience", "expected_epochs"), [(2, 3), (None, 4)])
def test_early_stopping_and_lr_schedule(
    fake_archive: Path, monkeypatch: pytest.MonkeyPatch, patience: int | None, expected_epochs: int
) -> None:
    # Val mAP falls every epoch after the first, so epoch 1 stays the best.
    scores = iter([0.5, 0.4, 0.3, 0.2])
    real_evaluate = train_module.evaluate

    def falling_map(*args: Any, **kwargs: Any) -> dict[str, float]:
        return {**real_evaluate(*args, **kwargs), "val_mAP": next(scores)}

    monkeypatch.setattr(train_module, "evaluate", falling_map)
    config = _config(batch_size=6, epochs=4, early_stopping_patience=patience, scheduler_patience=0)
    train_loader, val_loader = _loaders(fake_archive, config)
    result = fit(_model(config), train_loader, val_loader, config, progress=False)
    assert len(result.history) == expected_epochs
    assert result.stopped_early is (patience is not None)
    assert result.best_epoch == 1 and result.best_metric == 0.5
    # ReduceLROnPlateau (patience 0, factor 0.1) cuts the rate after every bad epoch.
    lrs = [row["lr"] for row in result.history]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5][:expected_epochs])


def _lr_curve(config: EmoNetConfig, steps_per_epoch: int) -> tuple[list[float], bool]:
    """The learning rate of every batch of ``config``'s schedule, and its per_step flag."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.train.lr)
    scheduler, per_step = build_scheduler(optimizer, config.train, steps_per_epoch)
    lrs = []
    for _ in range(config.train.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, per_step


def test_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    config = _config(scheduler="cosine", warmup_epochs=2, epochs=10, lr=1e-3)
    lrs, per_step = _lr_curve(config, steps_per_epoch=5)
    assert per_step
    warmup, decay = lrs[:10], lrs[10:]
    # A linear rise over the first 2 epochs: the first batch already trains, the 10th is at lr.
    assert warmup == pytest.approx([1e-3 * (k + 1) / 10 for k in range(10)])
    assert decay[0] == pytest.approx(1e-3)
    assert all(later < earlier for earlier, later in zip(decay, decay[1:]))
    assert lrs[30] == pytest.approx(0.5e-3)  # halfway through the decay: half the rate
    assert 0 < lrs[-1] < 1e-5


def test_cosine_schedule_without_warmup_starts_at_the_full_rate() -> None:
    lrs, _ = _lr_curve(_config(scheduler="cosine", epochs=3, lr=1e-3), steps_per_epoch=4)
    assert lrs[0] == pytest.approx(1e-3) and lrs[6] == pytest.approx(0.5e-3)


def test_plateau_schedule_steps_per_epoch() -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler, per_step = build_scheduler(optimizer, _config().train, steps_per_epoch=5)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and not per_step


def test_warmup_needs_the_cosine_schedule() -> None:
    with pytest.raises(ValueError, match="warmup_epochs=1.0 needs scheduler='cosine'"):
        _config(warmup_epochs=1)
    with pytest.raises(ValueError, match="scheduler"):
        _config(scheduler="step")


def test_cosine_run_follows_the_schedule_and_resumes_exactly(demo_root: Path, tmp_path: Path) -> None:
    config = _config(scheduler="cosine", warmup_epochs=1, epochs=3, batch_size=8)
    train_loader, val_loader = _loaders(demo_root, config)
    steps = len(train_loader)
    straight = fit(_model(config), train_loader, val_loader, config, checkpoint_dir=tmp_path / "straight",
                   progress=False)
    expected, _ = _lr_curve(config, steps)
    # Each epoch logs the rate of its first batch: the warm-up's first step, then the cosine.
    assert [row["lr"] for row in straight.history] == pytest.approx(expected[::steps])

    def stop_after_two(metrics: dict[str, float]) -> None:
        if metrics["epoch"] == 2:
            raise Interrupted

    train_loader, val_loader = _loaders(demo_root, config)
    with pytest.raises(Interrupted):
        fit(_model(config), train_loader, val_loader, config, callbacks=[stop_after_two],
            checkpoint_dir=tmp_path / "resumed", progress=False)
    train_loader, val_loader = _loaders(demo_root, config)
    resumed = fit(build_model(config.model), train_loader, val_loader, config,
                  resume_from=tmp_path / "resumed" / LAST_CHECKPOINT, progress=False)
    # The scheduler's position came back from last.pt: the third epoch has the same rate and weights.
    assert resumed.history[-1]["lr"] == pytest.approx(straight.history[-1]["lr"], rel=1e-12)
    resumed_last, straight_last = _state(resumed.last_checkpoint), _state(straight.last_checkpoint)
    for name, tensor in straight_last.items():
        torch.testing.assert_close(resumed_last[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_body_context_variant_trains_one_step(fake_archive: Path) -> None:
    config = _config(variant="body_context", batch_size=4, context_size=48)
    train_dataset, val_dataset = build_datasets(
        annotations_path(fake_archive, "train"), annotations_path(fake_archive, "val"), arrays_dir(fake_archive), config
    )
    batch = next(iter(make_loader(train_dataset, 4, shuffle=True)))
    assert batch["body"].shape == (4, 3, 32, 32) and batch["context"].shape == (4, 3, 48, 48)
    model = _model(config)
    assert model.variant == "body_context"
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    criterion = EmoNetLoss.from_config(config.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    metrics = train_one_epoch(model, [batch], criterion, optimizer, torch.device("cpu"), progress=False)
    assert set(metrics) == {"train_loss", "train_loss_emotion", "train_loss_affect"}
    assert math.isfinite(metrics["train_loss"])
    for name in ("body_trunk.conv1.weight", "context_trunk.conv1.weight", "emotion_head.weight"):
        assert not torch.equal(before[name], model.get_parameter(name)), name
    val = evaluate(model, make_loader(val_dataset, 4, shuffle=False), criterion, torch.device("cpu"))
    assert set(val) == {key for key in EPOCH_KEYS if key.startswith("val_")}


def test_body_model_refuses_a_loader_without_context(fake_archive: Path) -> None:
    config = _config(variant="body_context", batch_size=6)
    body_only = _config(batch_size=6)
    _, val_loader = _loaders(fake_archive, body_only)
    with pytest.raises(ValueError, match="with_context"):
        predict(_model(config), val_loader, torch.device("cpu"), progress=False)


def test_predict_returns_every_sample_in_order(fake_archive: Path) -> None:
    config = _config(batch_size=4)
    _, val_loader = _loaders(fake_archive, config)
    predictions = predict(_model(config), val_loader, torch.device("cpu"), progress=False)
    n = len(val_loader.dataset)
    assert len(predictions) == n
    assert predictions.emotion_prob.shape == (n, NUM_EMOTIONS) and predictions.affect_pred.shape == (n, 2)
    assert np.all((predictions.emotion_prob >= 0) & (predictions.emotion_prob <= 1))
    assert np.all(np.abs(predictions.affect_pred) <= 1)
    np.testing.assert_array_equal(predictions.indices, np.arange(n))
    annotations = val_loader.dataset.annotations
    np.testing.assert_array_equal(predictions.emotions_true, annotations[list(EMOTIONS)].to_numpy())
    np.testing.assert_allclose(predictions.affect_true, affect_targets(annotations))


def test_evaluate_prefix_and_thresholds(fake_archive: Path) -> None:
    config = _config(batch_size=6)
    _, val_loader = _loaders(fake_archive, config)
    model, criterion, cpu = _model(config), EmoNetLoss.from_config(config.loss), torch.device("cpu")
    everything = evaluate(model, val_loader, criterion, cpu, thresholds=0.0, prefix="test_")
    assert "test_loss" in everything and "test_mAP" in everything
    # Threshold 0 predicts every label, so recall is 1 and Hamming loss is the negative rate.
    negatives = 1.0 - val_loader.dataset.annotations[list(EMOTIONS)].to_numpy().mean()
    assert everything["test_hamming_loss"] == pytest.approx(negatives)
    nothing = evaluate(model, val_loader, criterion, cpu, thresholds=1.01)
    assert nothing["val_f1_micro"] == 0.0
    assert nothing["val_mAP"] == pytest.approx(everything["test_mAP"])


def test_gradient_clipping_bounds_the_step(fake_archive: Path) -> None:
    config = _config(batch_size=6)
    train_loader, _ = _loaders(fake_archive, config)
    model = _model(config)
    before = [p.detach().clone() for p in model.parameters()]
    # Plain SGD with lr 1: the step equals the (clipped) gradient.
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    criterion = EmoNetLoss.from_config(config.loss)
    train_one_epoch(model, train_loader, criterion, optimizer, torch.device("cpu"),
                    grad_clip_norm=1e-3, progress=False)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < step.item() <= 1e-3 * (1 + 1e-4)


def test_non_finite_loss_raises(fake_archive: Path) -> None:
    config = _config(batch_size=6)
    train_loader, _ = _loaders(fake_archive, config)
    model = _model(config)

    def nan_loss(output: Any, emotions: torch.Tensor, affect: torch.Tensor) -> LossOutput:
        nan = output.emotion_logits.sum() * float("nan")
        return LossOutput(total=nan, emotion=nan, affect=nan)

    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(FloatingPointError, match="epoch 5"):
        train_one_epoch(model, train_loader, nan_loss, optimizer, torch.device("cpu"), epoch=5, progress=False)


def test_make_loader_is_reproducible_with_workers(fake_archive: Path) -> None:
    config = _config(batch_size=3, num_workers=2)
    dataset, _ = build_datasets(
        annotations_path(fake_archive, "train"), annotations_path(fake_archive, "val"), arrays_dir(fake_archive), config
    )

    def first_epoch(seed: int) -> list[dict[str, torch.Tensor]]:
        loader = make_loader(dataset, 3, shuffle=True, num_workers=2, seed=seed)
        assert loader.persistent_workers and not loader.pin_memory
        return list(loader)

    a, b, c = first_epoch(0), first_epoch(0), first_epoch(1)
    # Same seed: same order and the same random augmentation in the workers.
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["body"], y["body"])
    assert any(not torch.equal(x["body"], y["body"]) for x, y in zip(a, c))


def test_make_loaders_drops_the_last_partial_train_batch(fake_archive: Path) -> None:
    train_loader, val_loader = _loaders(fake_archive, _config(batch_size=4))  # 6 rows per split
    assert [len(batch["index"]) for batch in train_loader] == [4]
    assert [len(batch["index"]) for batch in val_loader] == [4, 2]
    whole, _ = _loaders(fake_archive, _config(batch_size=8))  # smaller than a batch: kept
    assert [len(batch["index"]) for batch in whole] == [6]


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_make_loader_rejects_bad_arguments(fake_archive: Path) -> None:
    dataset, _ = build_datasets(
        annotations_path(fake_archive, "train"), annotations_path(fake_archive, "val"), arrays_dir(fake_archive),
        _config(),
    )
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(dataset, 0, shuffle=False)
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(dataset, 2, shuffle=False, num_workers=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_with_mixed_precision(fake_archive: Path, tmp_path: Path) -> None:
    config = _config(batch_size=6, epochs=2, device="cuda", amp=True, grad_clip_norm=1.0)
    train_loader, val_loader = _loaders(fake_archive, config)
    result = fit(_model(config), train_loader, val_loader, config, checkpoint_dir=tmp_path, progress=False)
    assert len(result.history) == 2 and all(math.isfinite(r["train_loss"]) for r in result.history)
    model, _, checkpoint = load_checkpoint(result.best_checkpoint)
    assert checkpoint["scaler"]  # the GradScaler's state was saved
    assert next(model.parameters()).device.type == "cpu"
