"""The prediction review: per-sample scores, the documented orderings, and every promised
file (decodable PNGs, an index.html whose links all resolve)."""

from __future__ import annotations

import json
import logging
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emonet.data.normalize import AffectNormalizer
from emonet.inference.loop import Predictions
from emonet.inference.predictor import PROB_COLUMNS
from emonet.metrics import (
    affect_sample_error,
    confidence_score,
    mean_voc11_average_precision_score,
    sample_f1_score,
)
from emonet.reports.evaluation import SPLIT_REPORT_FILES
from emonet.reports.review import SORT_OPTIONS, rank_samples, review_predictions, review_predictions_with_visualization
from emonet.schema import EMOTIONS, FACE_VISIBILITY_COLUMN, annotations_path, arrays_dir

TINY = {"image_size": 32, "epochs": 1, "batch_size": 8, "num_workers": 0, "device": "cpu", "augment": False}


# --------------------------------------------------------------------------- per-sample scores


def test_sample_f1_handles_empty_sets():
    y_true = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]])
    y_pred = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 1, 1]])
    np.testing.assert_allclose(sample_f1_score(y_true, y_pred), [2 / 3, 1.0, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="same shape"):
        sample_f1_score(y_true, y_pred[:, :2])


def test_affect_error_and_confidence():
    np.testing.assert_allclose(affect_sample_error([[0.0, 0.5], [1.0, -1.0]], [[0.2, 0.1], [1.0, -1.0]]), [0.3, 0.0])
    probs = np.array([[0.9, 0.1], [0.5, 0.6]])
    np.testing.assert_allclose(confidence_score(probs, np.array([0.5, 0.5])), [0.4, 0.05])
    np.testing.assert_allclose(confidence_score(probs, np.array([0.9, 0.1])), [0.0, 0.45])


def test_rank_samples_orders_as_documented():
    f1 = np.array([0.5, 1.0, 0.5, 0.0, 1.0, 0.5])
    va_error = np.array([0.3, 0.2, 0.1, 0.4, 0.2, 0.3])
    confidence = np.array([0.1, 0.3, 0.2, 0.3, 0.05, 0.0])
    # Best: F1 down, then lower error; rows 1 and 4 tie on both and keep row order.
    assert rank_samples("best", f1, va_error, confidence).tolist() == [1, 4, 2, 0, 5, 3]
    assert rank_samples("worst", f1, va_error, confidence).tolist() == [3, 0, 5, 2, 1, 4]
    assert rank_samples("confidence", f1, va_error, confidence).tolist() == [1, 3, 2, 0, 4, 5]
    first = rank_samples("random", f1, va_error, confidence, seed=7)
    assert sorted(first.tolist()) == list(range(6))
    assert rank_samples("random", f1, va_error, confidence, seed=7).tolist() == first.tolist()
    others = {tuple(rank_samples("random", f1, va_error, confidence, seed=s).tolist()) for s in range(8, 14)}
    assert len(others | {tuple(first.tolist())}) > 1  # the seed matters


def test_long_label_lists_wrap_and_fold_into_more():
    from emonet.reports.review.drawing import _wrap_tokens

    tokens = [(emotion, "red") for emotion in EMOTIONS]
    lines = _wrap_tokens(tokens, width=30, max_lines=3)
    assert len(lines) == 3
    for line in lines:
        assert sum(len(text) + 1 for text, _ in line) - 1 <= 30
    shown = [text.rstrip(",") for line in lines for text, _ in line]
    more = shown.pop()
    assert more == f"+{len(EMOTIONS) - len(shown)} more" and shown == list(EMOTIONS[: len(shown)])
    assert _wrap_tokens(tokens[:2], width=30, max_lines=3) == [[("Peace,", "red"), ("Affection", "red")]]


def test_unknown_sort_by_and_bad_counts_fail_before_any_work(tmp_path):
    missing = tmp_path / "no_model.pt"
    with pytest.raises(ValueError, match=r"unknown sort_by 'nope'.*'random', 'best', 'worst', 'confidence'"):
        review_predictions_with_visualization(missing, tmp_path / "x.csv", tmp_path, tmp_path / "out", sort_by="nope")
    with pytest.raises(ValueError, match="num_samples must be an int >= 1, got 0"):
        review_predictions_with_visualization(missing, tmp_path / "x.csv", tmp_path, tmp_path / "out", num_samples=0)
    with pytest.raises(ValueError, match="detailed_samples must be an int >= 0, got -1"):
        review_predictions_with_visualization(
            missing, tmp_path / "x.csv", tmp_path, tmp_path / "out", detailed_samples=-1
        )
    with pytest.raises(ValueError, match="unknown sort_by"):
        rank_samples("median", np.zeros(2), np.zeros(2), np.zeros(2))
    assert not (tmp_path / "out").exists()


# The original project's sort_by values, which its README documents.
SEED_SORT_OPTIONS = ("random", "best", "worst", "confidence")


def test_the_seeds_keywords_and_sort_by_values_still_work(tmp_path):
    """``model_checkpoint_path``, ``img_arrays_dir`` and ``output_dir`` name today's ``model``,
    ``img_dir`` and ``out_dir``, with a FutureWarning naming the new name; both names at once,
    or neither, is a TypeError."""
    assert set(SEED_SORT_OPTIONS) <= set(SORT_OPTIONS)
    missing = tmp_path / "no_model.pt"
    csv_path, out = tmp_path / "x.csv", tmp_path / "out"
    old = {"model_checkpoint_path": missing, "img_arrays_dir": tmp_path, "output_dir": out}
    with pytest.warns(FutureWarning) as caught, pytest.raises(ValueError, match="unknown sort_by 'nope'"):
        review_predictions_with_visualization(test_csv_path=csv_path, sort_by="nope", **old)
    messages = {str(w.message) for w in caught if issubclass(w.category, FutureWarning)}
    assert {
        "review_predictions_with_visualization(): model_checkpoint_path= is deprecated, pass model= instead",
        "review_predictions_with_visualization(): img_arrays_dir= is deprecated, pass img_dir= instead",
        "review_predictions_with_visualization(): output_dir= is deprecated, pass out_dir= instead",
    } <= messages
    assert all(w.filename == __file__ for w in caught), "the warning points at the caller"
    for new, old_name in (("model", "model_checkpoint_path"), ("img_dir", "img_arrays_dir"), ("out_dir", "output_dir")):
        arguments = {"model": missing, "test_csv_path": csv_path, "img_dir": tmp_path, "out_dir": out}
        with pytest.raises(TypeError, match=f"got both {new}= and its deprecated name {old_name}="):
            review_predictions_with_visualization(**arguments, **{old_name: arguments[new]})
    with pytest.raises(TypeError, match="missing required argument.*'img_dir', 'out_dir'"):
        review_predictions_with_visualization(missing, csv_path)
    assert not out.exists()


def test_the_seeds_readme_call_runs_verbatim(demo_checkpoint, tmp_path):
    """The original project's README call, pasted as it is there."""
    root, checkpoint = demo_checkpoint
    test_csv = annotations_path(root, "test")
    img_arrays = arrays_dir(root)
    output = tmp_path / "review"
    with pytest.warns(FutureWarning, match="deprecated"):
        # fmt: off
        review_predictions_with_visualization(model_checkpoint_path=str(checkpoint), test_csv_path=str(test_csv), img_arrays_dir=str(img_arrays), output_dir=str(output), num_samples=20, detailed_samples=20, sort_by='random')  # noqa: E501
        # fmt: on
    summary = json.loads((output / "summary.json").read_text())
    n = len(pd.read_csv(test_csv))
    assert summary["sort_by"] == "random" and summary["n_selected"] == summary["n_detailed"] == n
    assert (output / "index.html").is_file() and len(summary["files"]["samples"]) == n


# --------------------------------------------------------------------------- orderings end to end

# (true emotions, predicted emotions, valence/arousal error, confidence) per row.
CASES = [
    ({"Peace", "Affection"}, {"Peace", "Affection"}, 0.2, 0.30),  # F1 1
    ({"Peace"}, {"Peace"}, 0.1, 0.10),  # F1 1, smaller error
    ({"Anger", "Fear"}, {"Anger"}, 0.0, 0.40),  # F1 2/3
    ({"Sadness"}, {"Happiness"}, 0.3, 0.05),  # F1 0
    ({"Fear"}, set(), 0.5, 0.20),  # F1 0, larger error
    (set(), set(), 0.3, 0.25),  # both empty: F1 1
]
EXPECTED_ORDER = {
    "best": [1, 0, 5, 2, 3, 4],
    "worst": [4, 3, 2, 5, 0, 1],
    "confidence": [2, 0, 5, 4, 1, 3],
}


@pytest.fixture
def constructed(demo_checkpoint, tmp_path):
    """A 6-row split with chosen labels, and chosen predictions of it at 0.5 thresholds."""
    root, _ = demo_checkpoint
    frame = pd.read_csv(annotations_path(root, "test")).head(len(CASES)).copy()
    probs = np.empty((len(CASES), len(EMOTIONS)), dtype=np.float32)
    affect = np.empty((len(CASES), 2), dtype=np.float32)
    for i, (true, pred, error, confidence) in enumerate(CASES):
        frame.loc[i, list(EMOTIONS)] = [float(e in true) for e in EMOTIONS]
        # Probabilities sit `confidence` above or below the 0.5 threshold.
        probs[i] = [0.5 + confidence if e in pred else 0.5 - confidence for e in EMOTIONS]
        affect[i] = error  # truth is 5.5, i.e. 0 on [-1, 1]
    frame[["Valence", "Arousal"]] = 5.5
    csv_path = tmp_path / "constructed.csv"
    frame.to_csv(csv_path, index=False)

    predictions = Predictions(emotion_prob=probs, affect_pred=affect, indices=np.arange(len(CASES)))
    return csv_path, arrays_dir(root), frame, predictions


@pytest.fixture
def no_split_figures(monkeypatch):
    """Skip the split-wide heatmaps, which these ordering tests do not look at."""
    import emonet.reports.review as review

    def fake_split_report(*args):
        out_dir = Path(args[-1])
        return None, {key: out_dir / name for key, name in SPLIT_REPORT_FILES.items()}

    monkeypatch.setattr(review, "write_split_report", fake_split_report)


# The 6-row split lacks most emotions, so AP is undefined for them: expected here.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
@pytest.mark.parametrize("sort_by", SORT_OPTIONS)
def test_each_sort_by_orders_the_review(constructed, no_split_figures, tmp_path, sort_by):
    csv_path, img_dir, frame, predictions = constructed
    out = tmp_path / f"review_{sort_by}"
    table = review_predictions(
        predictions,
        csv_path,
        img_dir,
        out,
        thresholds=np.full(len(EMOTIONS), 0.5),
        normalizer=AffectNormalizer(),
        model_name="chosen outputs",
        num_samples=3,
        detailed_samples=1,
        sort_by=sort_by,
        seed=5,
        progress=False,
    )
    assert table["rank"].tolist() == list(range(1, len(CASES) + 1))
    by_row = table.sort_values("csv_row")
    np.testing.assert_allclose(by_row["f1"], [1.0, 1.0, 2 / 3, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(by_row["va_error"], [case[2] for case in CASES], atol=1e-6)
    np.testing.assert_allclose(by_row["confidence"], [case[3] for case in CASES], atol=1e-6)
    assert by_row["pred_emotions"].tolist()[:3] == ["Peace;Affection", "Peace", "Anger"]
    assert by_row["true_emotions"].tolist()[2] == "Anger;Fear"

    if sort_by == "random":
        expected = rank_samples("random", by_row["f1"], by_row["va_error"], by_row["confidence"], seed=5).tolist()
    else:
        expected = EXPECTED_ORDER[sort_by]
    assert table["csv_row"].tolist() == expected
    assert table["selected"].tolist() == [True] * 3 + [False] * 3
    assert table["detailed"].tolist() == [True] + [False] * 5

    crops = frame["Crop_name"].tolist()
    pages = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert pages == [f"sample_001_{Path(crops[expected[0]]).stem}.png"]
    assert table["sample_page"].tolist() == [f"samples/{pages[0]}"] + [""] * 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sort_by"] == sort_by and summary["seed"] == 5
    assert summary["selected"] == [crops[i] for i in expected[:3]]
    assert summary["mean_sample_f1"] == pytest.approx(np.mean([1, 1, 2 / 3, 0, 0, 1]))


def test_review_refuses_predictions_of_another_split(constructed, tmp_path):
    csv_path, img_dir, _, predictions = constructed
    fewer = Predictions(
        emotion_prob=predictions.emotion_prob[:3], affect_pred=predictions.affect_pred[:3], indices=np.arange(3)
    )
    with pytest.raises(ValueError, match="predictions cover 3 rows, not the 6 rows of constructed.csv"):
        review_predictions(
            fewer,
            csv_path,
            img_dir,
            tmp_path / "out",
            thresholds=np.full(len(EMOTIONS), 0.5),
            normalizer=AffectNormalizer(),
            model_name="chosen outputs",
        )
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- files of a real review


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for key, value in attrs if key in ("src", "href") and value]


def test_review_writes_every_promised_file(demo_checkpoint, tmp_path, caplog):
    root, checkpoint = demo_checkpoint
    frame = pd.read_csv(annotations_path(root, "test"))
    frame[FACE_VISIBILITY_COLUMN] = np.linspace(0.0, 100.0, len(frame))
    csv_path = tmp_path / "test_with_visibility.csv"
    frame.to_csv(csv_path, index=False)
    out = tmp_path / "review"
    (out / "samples").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "samples" / "sample_999_old.png").write_bytes(b"not ours")

    with caplog.at_level(logging.WARNING, logger="emonet.reports.review"):
        table = review_predictions_with_visualization(
            str(checkpoint),
            csv_path,
            arrays_dir(root),
            out,
            num_samples=50,
            detailed_samples=2,
            sort_by="worst",
            progress=False,
        )
    assert f"num_samples=50 exceeds the {len(frame)} samples" in caplog.text
    assert len(table) == len(frame) and table["selected"].all()
    assert set(table["crop_name"]) == set(frame["Crop_name"])
    assert list(PROB_COLUMNS) == [c for c in table.columns if c.startswith("prob_")]
    probs = table[list(PROB_COLUMNS)].to_numpy()
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_allclose(table.sort_values("csv_row")[FACE_VISIBILITY_COLUMN], frame[FACE_VISIBILITY_COLUMN])
    np.testing.assert_allclose(table.sort_values("csv_row")["valence_true_1_10"], frame["Valence"])
    assert table["f1"].is_monotonic_increasing  # worst first

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_samples"] == summary["n_selected"] == len(frame) and summary["n_detailed"] == 2
    assert 0.0 <= summary["mAP"] <= 1.0 and 0.0 <= summary["f1_macro"] <= 1.0
    # Both AP protocols, on the page too, and per face-visibility group.
    truth = frame[list(EMOTIONS)].to_numpy()
    assert summary["mAP_voc11"] == pytest.approx(
        mean_voc11_average_precision_score(truth, table.sort_values("csv_row")[list(PROB_COLUMNS)].to_numpy())
    )
    assert "mAP_voc11_face_whole" in summary["by_face_visibility"]
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "11-point AP" in page and f"{summary['mAP_voc11']:.4f}" in page
    assert summary["mean_sample_f1"] == pytest.approx(table["f1"].mean())
    assert summary["sort_by"] == "worst" and summary["seed"] == 0

    pngs = [
        "grid.png",
        *(name for name in SPLIT_REPORT_FILES.values() if name.endswith(".png")),
        *summary["files"]["samples"],
    ]
    assert len(summary["files"]["samples"]) == 2
    for name in pngs:
        with Image.open(out / name) as image:
            image.verify()
    with Image.open(out / "grid.png") as image:
        assert image.width > 800 and image.height > 400
    per_emotion = pd.read_csv(out / "per_emotion.csv")
    assert per_emotion["emotion"].tolist() == list(EMOTIONS)
    assert {"average_precision", "average_precision_voc11"} <= set(per_emotion.columns)
    assert len(pd.read_csv(out / "review.csv")) == len(frame)

    parser = _Links()
    parser.feed((out / "index.html").read_text(encoding="utf-8"))
    assert len(parser.links) >= len(pngs)
    for link in parser.links:
        parsed = urlparse(link)
        assert not parsed.scheme and not parsed.netloc and not link.startswith("/"), link
        assert (out / unquote(parsed.path)).is_file(), link
    for name in pngs:
        assert name in parser.links

    # Files that are not ours survive; nothing else is removed.
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "samples" / "sample_999_old.png").read_bytes() == b"not ours"
    assert not list(out.rglob("*.tmp"))
