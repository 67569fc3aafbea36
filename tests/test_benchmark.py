"""The benchmark table: its layout, the published rows and their protocols, the CSV and the
Markdown saying the same, and a real (tiny) model through the one prediction path."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from emonet.metrics import mean_average_precision_score, mean_voc11_average_precision_score
from emonet.reports.benchmark import (
    BENCHMARK_FILES,
    NOT_STATED,
    PROTOCOL_SKLEARN,
    PROTOCOL_VOC11,
    PUBLISHED_RESULTS,
    TABLE_COLUMNS,
    benchmark_model,
    benchmark_table,
    write_benchmark,
)
from emonet.schema import EMOTIONS, NUM_EMOTIONS, annotations_path, arrays_dir


def predictions(n: int = 150, seed: int = 0):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((n, NUM_EMOTIONS)) < np.linspace(0.05, 0.5, NUM_EMOTIONS)).astype(int)
    y_prob = np.clip(0.3 * y_true + rng.random((n, NUM_EMOTIONS)), 0, 1)
    affect_true = rng.uniform(1, 10, size=(n, 2))
    affect_true[0] = np.nan  # a masked row
    affect_pred = np.clip(affect_true + rng.normal(0, 1, size=(n, 2)), 1, 10)
    affect_pred[0] = 5.0
    return y_true, y_prob, affect_true, affect_pred


def check_table(table, frame: pd.DataFrame, markdown: str) -> None:
    """What every benchmark table must show, whatever the model."""
    assert list(table.per_emotion.index) == list(EMOTIONS)
    assert list(frame.columns) == list(TABLE_COLUMNS)
    emotion_ap = frame[(frame.section == "emotion") & (frame.metric == "AP")]
    for protocol in (PROTOCOL_SKLEARN, PROTOCOL_VOC11):
        assert emotion_ap[emotion_ap.ap_protocol == protocol].name.tolist() == list(EMOTIONS)  # paper order
    model_rows = frame[frame.section == "model"].set_index(["metric", "ap_protocol"])
    for key, protocol in (("mAP", PROTOCOL_SKLEARN), ("mAP_voc11", PROTOCOL_VOC11)):
        row = model_rows.loc[("mAP", protocol)]
        interval = table.intervals[key]
        assert row.value == pytest.approx(100 * interval.estimate)
        assert row.low <= row.high
    assert "not predicted" in model_rows.loc[("dominance MAE", "")].unit
    published = frame[(frame.section == "published") & (frame.metric == "mAP")]
    assert published.name.tolist() == [result.method for result in PUBLISHED_RESULTS]
    assert set(published.ap_protocol) <= {PROTOCOL_SKLEARN, PROTOCOL_VOC11, NOT_STATED}

    # The Markdown shows every number of the CSV, rounded as printed, on the line of its row.
    lines = markdown.splitlines()
    for row in frame.itertuples():
        if not np.isfinite(row.value):
            continue
        digits = 3 if row.metric == "VAD MAE" else (0 if row.metric == "support" else 2)
        text = f"{row.value:.{digits}f}"
        assert any(line.startswith(f"| {row.name} |") and text in line for line in lines), (
            f"{row.name} {row.metric} {text} is not in the Markdown"
        )
    for result in PUBLISHED_RESULTS:
        line = next(line for line in lines if line.startswith(f"| {result.method} |"))
        assert result.ap_protocol in line and f"{result.test_map:.2f}" in line


def test_table_from_predictions(tmp_path):
    y_true, y_prob, affect_true, affect_pred = predictions()
    table = benchmark_table(y_true, y_prob, affect_true, affect_pred, model="demo", n_resamples=200, seed=3)
    check_table(table, table.to_frame(), table.to_markdown())
    assert table.n_rows == 150
    for interval in table.intervals.values():
        assert interval.low <= interval.estimate <= interval.high
    assert table.intervals["mAP"].estimate == mean_average_precision_score(y_true, y_prob)
    assert table.intervals["mAP_voc11"].estimate == mean_voc11_average_precision_score(y_true, y_prob)
    assert table.per_emotion["average_precision"].mean() == pytest.approx(table.intervals["mAP"].estimate)
    assert table.per_emotion["average_precision_voc11"].mean() == pytest.approx(table.intervals["mAP_voc11"].estimate)
    used = np.isfinite(affect_true).all(axis=1)
    assert table.intervals["mae_valence_1_10"].estimate == pytest.approx(
        np.abs(affect_pred[used, 0] - affect_true[used, 0]).mean()
    )
    assert "200 resamples, seed 3" in table.to_markdown() and "95% percentile bootstrap" in table.to_markdown()

    paths = write_benchmark(table, tmp_path / "out")
    assert {path.name for path in paths.values()} == set(BENCHMARK_FILES.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(BENCHMARK_FILES.values())  # no temp files
    written = pd.read_csv(paths["csv"], keep_default_na=False, na_values=[""])
    written["ap_protocol"] = written["ap_protocol"].fillna("")
    check_table(table, written, paths["markdown"].read_text(encoding="utf-8"))
    np.testing.assert_allclose(written["value"].to_numpy(dtype=float), table.to_frame()["value"].to_numpy(dtype=float))


def test_an_emotion_without_a_positive_is_shown_as_such():
    y_true, y_prob, _, _ = predictions()
    y_true[:, EMOTIONS.index("Pain")] = 0
    with pytest.warns(match="Pain"):
        table = benchmark_table(y_true, y_prob, n_resamples=50)
    assert np.isnan(table.per_emotion.loc["Pain", "average_precision_voc11"])
    assert re.search(r"^\| Pain \| 0 \| n/a \| n/a \|$", table.to_markdown(), flags=re.MULTILINE)
    assert "not given" in table.to_markdown()  # no affect passed


def test_table_refuses_other_label_counts():
    y_true, y_prob, _, _ = predictions()
    with pytest.raises(ValueError, match="expected 26 label columns"):
        benchmark_table(y_true[:, :25], y_prob[:, :25])


def test_published_rows_carry_a_protocol_and_a_source():
    by_method = {result.method: result for result in PUBLISHED_RESULTS}
    kosti = next(result for method, result in by_method.items() if method.startswith("Kosti"))
    assert (kosti.test_map, kosti.ap_protocol) == (27.38, PROTOCOL_VOC11)
    tandon = next(result for method, result in by_method.items() if method.startswith("Tandon-A"))
    assert (tandon.test_map, tandon.ap_protocol, tandon.vad_error) == (25.27, PROTOCOL_SKLEARN, 0.958)
    emoticon = next(result for method, result in by_method.items() if "depth" in method)
    assert (emoticon.test_map, emoticon.ap_protocol) == (35.48, NOT_STATED)
    for result in PUBLISHED_RESULTS:
        assert result.source and result.protocol_source
        assert 0 < result.test_map < 100


def test_benchmark_of_a_trained_checkpoint(demo_checkpoint, tmp_path):
    root, checkpoint = demo_checkpoint
    table = benchmark_model(checkpoint, annotations_path(root, "test"), arrays_dir(root), n_resamples=100, device="cpu")
    frame = table.to_frame()
    check_table(table, frame, table.to_markdown())
    assert table.n_rows == len(pd.read_csv(annotations_path(root, "test")))
    for key in ("mae_valence_1_10", "mae_arousal_1_10"):
        interval = table.intervals[key]
        assert 0 <= interval.low <= interval.estimate <= interval.high <= 9
    assert str(checkpoint.name) in table.model


def test_bad_inputs_name_what_is_wrong(tmp_path, fake_archive):
    with pytest.raises(FileNotFoundError, match="annotation CSV not found"):
        benchmark_model(tmp_path / "missing.pt", tmp_path / "missing.csv", arrays_dir(fake_archive))
    broken = tmp_path / "broken.csv"
    pd.read_csv(annotations_path(fake_archive, "test")).drop(columns=["Peace", "Valence"]).to_csv(broken, index=False)
    with pytest.raises(ValueError, match=r"missing columns: \['Valence', 'Peace'\]"):
        benchmark_model(tmp_path / "missing.pt", broken, arrays_dir(fake_archive))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        benchmark_model(tmp_path / "missing.pt", annotations_path(fake_archive, "test"), arrays_dir(fake_archive))
