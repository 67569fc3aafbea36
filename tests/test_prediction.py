"""The one prediction loop: every sample once and in order, labels when the split has them,
losses with a criterion, and the same outputs through a dataset, a loader or a sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from emonet.config import load_config
from emonet.data.annotations import affect_targets
from emonet.data.dataset import EmoticDataset
from emonet.data.loaders import make_loader
from emonet.inference.loop import ImageInputs, eval_transform, predict_split
from emonet.models.network import build_model
from emonet.schema import EMOTIONS, NUM_EMOTIONS, annotations_path, arrays_dir
from emonet.training.losses import EmoNetLoss

CONFIG = load_config(model={"backbone": "resnet18"}, train={"image_size": 32, "context_size": 32, "device": "cpu"})


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(CONFIG.model)


@pytest.fixture
def val_set(fake_archive: Path) -> EmoticDataset:
    return EmoticDataset(annotations_path(fake_archive, "val"), arrays_dir(fake_archive), eval_transform(CONFIG))


def test_labelled_split_returns_every_sample_in_order(model, val_set):
    predictions = predict_split(model, val_set, batch_size=4)  # 6 rows: a full and a partial batch
    n = len(val_set)
    assert len(predictions) == n and predictions.labelled
    assert predictions.emotion_prob.shape == (n, NUM_EMOTIONS) and predictions.affect_pred.shape == (n, 2)
    assert np.all((predictions.emotion_prob >= 0) & (predictions.emotion_prob <= 1))
    assert np.all(np.abs(predictions.affect_pred) <= 1)
    np.testing.assert_array_equal(predictions.indices, np.arange(n))
    np.testing.assert_array_equal(predictions.emotions_true, val_set.annotations[list(EMOTIONS)].to_numpy())
    np.testing.assert_allclose(predictions.affect_true, affect_targets(val_set.annotations))
    assert predictions.losses is None


def test_batch_size_and_workers_do_not_change_the_outputs(model, val_set):
    one = predict_split(model, val_set, batch_size=1)
    workers = predict_split(model, val_set, batch_size=4, num_workers=2)
    np.testing.assert_allclose(one.emotion_prob, workers.emotion_prob, atol=1e-5)
    np.testing.assert_allclose(one.affect_pred, workers.affect_pred, atol=1e-5)


def test_unlabelled_inputs_match_the_labelled_split(model, val_set):
    """The serving path (ImageInputs) preprocesses exactly like the Dataset of training."""
    labelled = predict_split(model, val_set, batch_size=4)
    img_dir, names = val_set.img_dir, val_set.annotations["Crop_name"].tolist()
    inputs = ImageInputs(lambda i: (np.load(img_dir / names[i]), None), len(names), eval_transform(CONFIG))
    unlabelled = predict_split(model, inputs, batch_size=3)
    assert not unlabelled.labelled and unlabelled.affect_true is None
    np.testing.assert_allclose(unlabelled.emotion_prob, labelled.emotion_prob, atol=1e-6)
    np.testing.assert_allclose(unlabelled.affect_pred, labelled.affect_pred, atol=1e-6)


def test_criterion_gives_sample_weighted_losses(model, val_set):
    criterion = EmoNetLoss.from_config(CONFIG.loss)
    predictions = predict_split(model, val_set, batch_size=4, criterion=criterion)
    batch = next(iter(DataLoader(val_set, batch_size=len(val_set))))
    with torch.inference_mode():
        whole = criterion(model(batch["body"]), batch["emotions"], batch["affect"])
    assert predictions.losses["total"] == pytest.approx(whole.total.item(), rel=1e-5)
    assert predictions.losses["affect"] == pytest.approx(whole.affect.item(), rel=1e-5)
    inputs = ImageInputs(lambda i: (np.zeros((8, 8, 3), np.uint8), None), 2, eval_transform(CONFIG))
    with pytest.raises(ValueError, match="criterion needs labelled data"):
        predict_split(model, inputs, criterion=criterion)


def test_a_sampler_predicts_its_shard_only(model, val_set):
    everything = predict_split(model, val_set, batch_size=4)
    loader = make_loader(val_set, batch_size=2, sampler=[4, 1, 3])
    shard = predict_split(model, loader)
    np.testing.assert_array_equal(shard.indices, [4, 1, 3])
    np.testing.assert_allclose(shard.emotion_prob, everything.emotion_prob[[4, 1, 3]], atol=1e-6)


def test_errors_are_named(model, val_set):
    context_model = build_model(load_config(model={"backbone": "resnet18", "variant": "body_context"}).model)
    with pytest.raises(ValueError, match="no 'context'"):
        predict_split(context_model, val_set, batch_size=4)
    bad = ImageInputs(lambda i: (np.zeros((8, 8, 3), np.float32), None), 3, eval_transform(CONFIG))
    with pytest.raises(ValueError, match="row 0: crop: expected dtype uint8"):
        predict_split(model, bad)
    with pytest.raises(ValueError, match="holds no sample"):
        predict_split(model, ImageInputs(lambda i: (None, None), 0, eval_transform(CONFIG)))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        predict_split(model, val_set, batch_size=0)
