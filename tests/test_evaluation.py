"""Evaluating a checkpoint: metrics with stored thresholds, report files, split fingerprints."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emonet.evaluation import evaluate_checkpoint, split_fingerprint
from emonet.metrics import evaluate_predictions
from emonet.schema import EMOTIONS, annotations_path, arrays_dir
from emonet.checkpoint import load_checkpoint


def test_evaluate_checkpoint_writes_report_and_uses_stored_thresholds(tiny_checkpoint, tmp_path):
    root = tiny_checkpoint["root"]
    report = evaluate_checkpoint(
        tiny_checkpoint["checkpoint"], annotations_path(root, "test"), arrays_dir(root), tmp_path, progress=False
    )
    _, _, state = load_checkpoint(tiny_checkpoint["checkpoint"])
    np.testing.assert_allclose(report.thresholds, state["thresholds"])
    p = report.predictions
    expected = evaluate_predictions(p.emotions_true, p.emotion_prob, p.affect_true, p.affect_pred, report.thresholds)
    assert report.metrics == pytest.approx(expected, nan_ok=True)
    assert report.metrics_at_half == pytest.approx(
        evaluate_predictions(p.emotions_true, p.emotion_prob, p.affect_true, p.affect_pred, 0.5), nan_ok=True
    )
    assert list(report.per_emotion.index) == list(EMOTIONS)

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["n_samples"] == 6 and saved["metrics"]["mAP"] == pytest.approx(report.metrics["mAP"])
    assert len(pd.read_csv(tmp_path / "per_emotion.csv")) == len(EMOTIONS)
    for name in ("cooccurrence_true", "cooccurrence_pred", "true_vs_predicted", "per_emotion_metrics", "affect_scatter", "learning_curves"):
        with Image.open(report.files[name]) as image:
            image.verify()
    assert not list(tmp_path.glob(".*.tmp"))


def test_split_fingerprint_follows_crops_and_labels_only(fake_archive):
    df = pd.read_csv(annotations_path(fake_archive, "test"))
    base = split_fingerprint(df)
    assert split_fingerprint(df.assign(Valence_norm=0.3, Face_Visibility=100.0)) == base
    relabelled = df.copy()
    relabelled.loc[0, "Fear"] = 1.0 - relabelled.loc[0, "Fear"]
    assert split_fingerprint(relabelled) != base
    assert split_fingerprint(df.iloc[1:]) != base
