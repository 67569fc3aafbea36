"""Every figure writes one readable PNG atomically and rejects inputs it cannot draw."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from emonet.metrics import (
    binarize,
    cooccurrence_matrix,
    per_emotion_report,
    true_vs_predicted_matrix,
)
from emonet.plots import (
    plot_affect_scatter,
    plot_cooccurrence,
    plot_learning_curves,
    plot_per_emotion_metrics,
    plot_true_vs_predicted,
    plot_visibility_histogram,
)
from emonet.schema import NUM_EMOTIONS


@pytest.fixture(scope="module")
def labels_and_probs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = (rng.random((80, NUM_EMOTIONS)) < 0.25).astype(int)
    y[:, 5] = 0  # one emotion without positives: NaN AP, blank rows
    prob = np.clip(0.3 * y + 0.7 * rng.random(y.shape), 0.0, 1.0)
    return y, prob


def assert_png(path: Path, returned: Path, min_width: int, min_height: int) -> np.ndarray:
    """The PNG decodes, is large enough, and is the only file the plot left behind."""
    assert returned == path
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, (width, height)
    assert image.std() > 0.05  # not a blank canvas
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no leftover temp file
    assert plt.get_fignums() == []  # figures are not left open in pyplot
    return image


def test_plot_cooccurrence_counts_and_normalized(tmp_path: Path, labels_and_probs) -> None:
    y, _ = labels_and_probs
    matrix = cooccurrence_matrix(y)
    counts = tmp_path / "counts" / "cooccurrence.png"
    assert_png(counts, plot_cooccurrence(matrix, counts), 1200, 1200)
    normalized = tmp_path / "normalized" / "cooccurrence.png"
    assert_png(normalized, plot_cooccurrence(matrix, normalized, normalize=True, title="P(j | i)"), 1200, 1200)


def test_plot_true_vs_predicted_overwrites_in_place(tmp_path: Path, labels_and_probs) -> None:
    y, prob = labels_and_probs
    matrix = true_vs_predicted_matrix(y, binarize(prob, 0.5))
    path = tmp_path / "true_vs_predicted.png"
    path.write_bytes(b"old")
    assert_png(path, plot_true_vs_predicted(matrix, path, normalize=True, support=y.sum(axis=0)), 1200, 1200)


def test_heatmaps_take_custom_labels_and_reject_bad_shapes(tmp_path: Path) -> None:
    matrix = cooccurrence_matrix([[1, 1, 0], [1, 0, 1]])
    path = tmp_path / "small.png"
    assert_png(path, plot_true_vs_predicted(matrix, path, labels=["a", "b", "c"], normalize=True), 300, 300)
    with pytest.raises(ValueError, match=r"matrix has shape \(3, 3\) but 26 labels"):
        plot_cooccurrence(matrix, tmp_path / "x.png")
    with pytest.raises(ValueError, match="square 2-D matrix"):
        plot_cooccurrence(np.zeros((2, 3)), tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match=r"support must have shape \(3,\)"):
        plot_true_vs_predicted(matrix, tmp_path / "x.png", labels=["a", "b", "c"], normalize=True, support=[1, 2])
    assert not (tmp_path / "x.png").exists()


def test_plot_per_emotion_metrics(tmp_path: Path, labels_and_probs) -> None:
    y, prob = labels_and_probs
    with pytest.warns(UserWarning, match="Confidence"):
        report = per_emotion_report(y, prob)
    path = tmp_path / "per_emotion.png"
    assert_png(path, plot_per_emotion_metrics(report, path), 1000, 1000)
    with pytest.raises(ValueError, match=r"missing columns: \['support'\]"):
        plot_per_emotion_metrics(report.drop(columns="support"), tmp_path / "x.png")
    with pytest.raises(ValueError, match="no rows"):
        plot_per_emotion_metrics(report.iloc[:0], tmp_path / "x.png")


def test_plot_affect_scatter(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    affect_true = rng.uniform(-1, 1, (50, 2))
    affect_pred = np.clip(affect_true + rng.normal(0, 0.2, affect_true.shape), -1, 1)
    path = tmp_path / "affect.png"
    image = assert_png(path, plot_affect_scatter(affect_true, affect_pred, path), 1200, 400)
    assert image.shape[1] > 2 * image.shape[0]  # three panels side by side
    with pytest.raises(ValueError, match=r"affect_pred must have shape \(n_samples, 2\)"):
        plot_affect_scatter(affect_true, affect_pred[:, 0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="same shape"):
        plot_affect_scatter(affect_true, affect_pred[:10], tmp_path / "x.png")


@pytest.mark.parametrize(
    "scores", [[0.0, 0.0, 50.0, 100.0, np.nan], [np.nan, np.nan], []], ids=["mixed", "all-nan", "empty"]
)
def test_plot_visibility_histogram(tmp_path: Path, scores) -> None:
    path = tmp_path / "plots" / "h.png"
    assert_png(path, plot_visibility_histogram(np.asarray(scores), path, title="val"), 600, 400)


def full_history(epochs: int = 4) -> list[dict[str, float]]:
    return [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "train_loss_emotion": 0.7 / e,
            "train_loss_affect": 0.3 / e,
            "val_loss": 1.1 / e,
            "val_mAP": 0.2 + 0.01 * e,
            "val_f1_macro": 0.1 + 0.02 * e,
            "val_mae_valence": 0.4 - 0.01 * e,
            "val_mae_arousal": 0.45 - 0.01 * e,
            "lr": 1e-3 * 0.5**e,
        }
        for e in range(1, epochs + 1)
    ]


def test_plot_learning_curves_full_history(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    # Four panels (loss, scores, errors, lr) in a 2 x 2 grid.
    assert_png(path, plot_learning_curves(full_history(), path), 1200, 800)


def test_plot_learning_curves_partial_history(tmp_path: Path) -> None:
    # One key, no epoch numbers, a missing value and a non-numeric entry: still one panel.
    history = [{"train_loss": 0.9, "note": "warmup"}, {"note": "x"}, {"train_loss": 0.5}]
    path = tmp_path / "partial.png"
    image = assert_png(path, plot_learning_curves(history, path), 500, 300)
    one_panel_width = image.shape[1]
    wide = tmp_path / "wide" / "full.png"
    full_width = matplotlib.image.imread(plot_learning_curves(full_history(2), wide)).shape[1]
    assert full_width > 1.5 * one_panel_width


@pytest.mark.parametrize(
    ("history", "match"),
    [
        ([], "history is empty"),
        ({"train_loss": [0.5]}, "sequence of per-epoch dicts"),
        ([{"epoch": 1}, {"epoch": 2, "note": "x"}], "no numeric values"),
        ([{"train_loss": 1.0}, 3.0], r"history\[1\] must be a mapping"),
    ],
)
def test_plot_learning_curves_rejects_bad_history(tmp_path: Path, history, match) -> None:
    with pytest.raises(ValueError, match=match):
        plot_learning_curves(history, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_report_from_dataframe_without_nan(tmp_path: Path) -> None:
    report = pd.DataFrame(
        {
            "average_precision": [0.9, 0.4],
            "precision": [1.0, 0.5],
            "recall": [0.5, 0.5],
            "f1": [2 / 3, 0.5],
            "support": [4, 2],
        },
        index=["a", "b"],
    )
    path = tmp_path / "two.png"
    assert_png(path, plot_per_emotion_metrics(report, path, title="two labels"), 600, 300)
