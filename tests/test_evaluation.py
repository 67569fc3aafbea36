"""Evaluating a checkpoint: metrics with stored thresholds, report files, split fingerprints."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emonet.metrics import evaluate_predictions, mean_average_precision_score, mean_voc11_average_precision_score
from emonet.metrics.bootstrap import bootstrap_intervals
from emonet.models.checkpoint import load_checkpoint
from emonet.reports.evaluation import evaluate_checkpoint, split_fingerprint
from emonet.schema import EMOTIONS, annotations_path, arrays_dir


def test_evaluate_checkpoint_writes_report_and_uses_stored_thresholds(tiny_checkpoint, tmp_path):
    root = tiny_checkpoint["root"]
    report = evaluate_checkpoint(
        tiny_checkpoint["checkpoint"], annotations_path(root, "test"), arrays_dir(root), tmp_path, progress=False
    )
    _, _, state = load_checkpoint(tiny_checkpoint["checkpoint"])
    np.testing.assert_allclose(report.thresholds, state["thresholds"])
    p = report.predictions
    voc11 = {"mAP_voc11": mean_voc11_average_precision_score(p.emotions_true, p.emotion_prob)}
    expected = evaluate_predictions(p.emotions_true, p.emotion_prob, p.affect_true, p.affect_pred, report.thresholds)
    assert report.metrics == pytest.approx({**expected, **voc11}, nan_ok=True)
    assert report.metrics_at_half == pytest.approx(
        {**evaluate_predictions(p.emotions_true, p.emotion_prob, p.affect_true, p.affect_pred, 0.5), **voc11},
        nan_ok=True,
    )
    assert list(report.per_emotion.index) == list(EMOTIONS)

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["n_samples"] == 6 and saved["metrics"]["mAP"] == pytest.approx(report.metrics["mAP"])
    assert saved["metrics"]["mAP_voc11"] == pytest.approx(voc11["mAP_voc11"])
    per_emotion = pd.read_csv(tmp_path / "per_emotion.csv")
    assert len(per_emotion) == len(EMOTIONS)
    assert {"average_precision", "average_precision_voc11"} <= set(per_emotion.columns)
    for name in (
        "cooccurrence_true",
        "cooccurrence_pred",
        "true_vs_predicted",
        "per_emotion_metrics",
        "affect_scatter",
        "learning_curves",
    ):
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


def test_evaluation_reports_intervals_the_benchmark_and_validation(tiny_checkpoint, tmp_path):
    """The bootstrap intervals (seeded, 1..10 affect errors included), the benchmark
    table's files, and the validation split predicted by the same loaded model."""
    root = tiny_checkpoint["root"]
    report = evaluate_checkpoint(
        tiny_checkpoint["checkpoint"],
        annotations_path(root, "test"),
        arrays_dir(root),
        tmp_path,
        progress=False,
        validation=annotations_path(root, "val"),
        model_name="tiny",
        n_resamples=200,
        bootstrap_seed=3,
    )
    p = report.predictions
    raw = pd.read_csv(annotations_path(root, "test"))[["Valence", "Arousal"]].to_numpy(dtype=float)[p.indices]
    expected = bootstrap_intervals(
        p.emotions_true,
        p.emotion_prob,
        raw,
        report.normalizer.inverse_transform(p.affect_pred),
        n_resamples=200,
        seed=3,
    )
    assert report.intervals == expected
    assert set(report.intervals) == {"mAP", "mAP_voc11", "mae_valence_1_10", "mae_arousal_1_10"}
    for key in report.intervals:  # the interval's estimate is the reported metric
        assert report.intervals[key].estimate == pytest.approx(report.metrics[key])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["intervals"]["mAP"]["low"] == pytest.approx(report.intervals["mAP"].low)
    assert saved["intervals"]["mAP"]["n_resamples"] == 200

    markdown = (tmp_path / "benchmark.md").read_text()
    assert "| tiny |" in markdown and "11-point interpolated AP" in markdown
    assert report.files["benchmark_markdown"] == tmp_path / "benchmark.md"
    assert set(pd.read_csv(tmp_path / "benchmark.csv")["section"]) == {"model", "published", "emotion"}

    validation = report.validation
    val_frame = pd.read_csv(annotations_path(root, "val"))
    assert validation.split_id == split_fingerprint(val_frame) != report.split_id
    np.testing.assert_array_equal(validation.predictions.emotions_true, val_frame[list(EMOTIONS)].to_numpy())
    assert validation.metrics["mAP"] == pytest.approx(
        mean_average_precision_score(validation.predictions.emotions_true, validation.predictions.emotion_prob)
    )
    assert saved["validation"]["mAP"] == pytest.approx(validation.metrics["mAP"])
