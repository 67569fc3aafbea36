"""Affect normalization: the scale map, its inverse, and fitting on train only."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from emonet.data.normalize import PARAMS_FILENAME, AffectNormalizer, normalize_dataset
from emonet.schema import (
    AFFECT_NORM_COLUMNS,
    ANNOTATIONS_DIRNAME,
    FACE_VISIBILITY_COLUMN,
    annotations_path,
    normalized_filename,
)


def test_scale_bounds_map_1_10_to_minus1_1():
    norm, clipped = AffectNormalizer().transform(np.array([[1.0, 10.0], [5.5, 3.25]]))
    np.testing.assert_allclose(norm, [[-1.0, 1.0], [0.0, -0.5]])
    assert clipped == 0


def test_round_trip_through_inverse():
    rng = np.random.default_rng(0)
    values = rng.uniform(1, 10, size=(50, 2))
    for normalizer in (AffectNormalizer(), AffectNormalizer(low=(2.0, 1.5), high=(9.0, 8.0))):
        norm, _ = normalizer.transform(np.clip(values, normalizer.low, normalizer.high))
        np.testing.assert_allclose(normalizer.inverse_transform(norm), np.clip(values, normalizer.low, normalizer.high))


def test_invalid_bounds_and_shapes_are_errors():
    with pytest.raises(ValueError, match="Valence.*low=5.0, high=5.0"):
        AffectNormalizer(low=(5.0, 1.0), high=(5.0, 10.0))
    with pytest.raises(ValueError, match=r"\(N, 2\).*\(3,\)"):
        AffectNormalizer().transform(np.zeros(3))
    with pytest.raises(ValueError, match="unknown normalization parameters: \\['scale'\\]"):
        AffectNormalizer.from_dict({"scale": 3})


def test_normalize_dataset_writes_outputs_and_params(fake_archive, tmp_path):
    out = tmp_path / "normalized"
    inputs = {s: annotations_path(fake_archive, s).read_bytes() for s in ("train", "val", "test")}
    result = normalize_dataset(fake_archive / ANNOTATIONS_DIRNAME, out)
    for split in ("train", "val", "test"):
        df = pd.read_csv(out / normalized_filename(split))
        assert not any(c.startswith("Unnamed") for c in df.columns), "no pandas index column"
        expected = 2 * (df[["Valence", "Arousal"]].to_numpy() - 1) / 9 - 1
        np.testing.assert_allclose(df[list(AFFECT_NORM_COLUMNS)].to_numpy(), expected, atol=1e-9)
        assert annotations_path(fake_archive, split).read_bytes() == inputs[split]
    params = json.loads((out / PARAMS_FILENAME).read_text())
    assert params["method"] == "scale" and params["low"] == [1.0, 1.0]
    assert AffectNormalizer.load(result.params_path) == result.normalizer
    assert not list(out.glob(".*.tmp")), "no temporary files left behind"


def test_fit_on_train_uses_train_only_and_clips_others(fake_archive, tmp_path):
    # Give val and test values far outside train's range: they must not move the bounds.
    for split, value in (("val", 10.0), ("test", 1.0)):
        path = annotations_path(fake_archive, split)
        pd.read_csv(path).assign(Valence=value).to_csv(path, index=False)
    train = pd.read_csv(annotations_path(fake_archive, "train"))
    result = normalize_dataset(fake_archive / ANNOTATIONS_DIRNAME, tmp_path / "out", fit_on_train=True)
    assert result.normalizer.method == "fit_on_train"
    assert result.normalizer.low == pytest.approx((train["Valence"].min(), train["Arousal"].min()))
    assert result.normalizer.high == pytest.approx((train["Valence"].max(), train["Arousal"].max()))
    train_out = pd.read_csv(result.outputs["train"])
    assert train_out["Valence_norm"].min() == pytest.approx(-1.0) and train_out["Valence_norm"].max() == pytest.approx(
        1.0
    )
    for split in ("val", "test"):
        arousal = pd.read_csv(annotations_path(fake_archive, split))["Arousal"]
        arousal_outside = int(((arousal < train["Arousal"].min()) | (arousal > train["Arousal"].max())).sum())
        assert result.counts[split]["values_clipped"] == 6 + arousal_outside
    assert pd.read_csv(result.outputs["val"])["Valence_norm"].eq(1.0).all()


def _with_visibility(fake_archive, out_dir):
    out_dir.mkdir()
    for split in ("train", "val", "test"):
        df = pd.read_csv(annotations_path(fake_archive, split))
        df[FACE_VISIBILITY_COLUMN] = [0.0, 100.0, 55.0, np.nan, 100.0, 0.0]
        df.to_csv(out_dir / annotations_path(fake_archive, split).name, index=False)
    return out_dir


def test_min_visibility_filters_train_and_val_but_not_test(fake_archive, tmp_path):
    vis_dir = _with_visibility(fake_archive, tmp_path / "vis")
    result = normalize_dataset(vis_dir, tmp_path / "out", min_visibility=50)
    for split in ("train", "val"):
        assert result.counts[split]["rows_below_visibility"] == 3
        assert len(pd.read_csv(result.outputs[split])) == 3
    # The benchmark split keeps every row, so its mAP stays comparable.
    assert "rows_below_visibility" not in result.counts["test"]
    assert len(pd.read_csv(result.outputs["test"])) == 6
    with pytest.raises(ValueError, match=r"min_visibility must lie in \[0, 100\], got 150"):
        normalize_dataset(vis_dir, tmp_path / "out", min_visibility=150)


def test_filter_test_by_visibility_filters_the_test_split_too(fake_archive, tmp_path):
    vis_dir = _with_visibility(fake_archive, tmp_path / "vis")
    result = normalize_dataset(vis_dir, tmp_path / "out", min_visibility=50, filter_test_by_visibility=True)
    assert result.counts["test"]["rows_below_visibility"] == 3
    test = pd.read_csv(result.outputs["test"])
    assert test[FACE_VISIBILITY_COLUMN].tolist() == [100.0, 55.0, 100.0]
    with pytest.raises(ValueError, match="filter_test_by_visibility needs min_visibility"):
        normalize_dataset(vis_dir, tmp_path / "out", filter_test_by_visibility=True)


def test_masked_affect_stays_nan_through_normalization(fake_archive, tmp_path):
    for split, row in (("train", 2), ("test", 4)):
        path = annotations_path(fake_archive, split)
        df = pd.read_csv(path)
        df.loc[row, "Valence"] = 0.0  # outside 1..10: masked, not dropped
        df.to_csv(path, index=False)
    train = pd.read_csv(annotations_path(fake_archive, "train")).drop(index=2)
    result = normalize_dataset(fake_archive / ANNOTATIONS_DIRNAME, tmp_path / "out", fit_on_train=True)
    # The masked train value does not move the fitted bounds.
    assert result.normalizer.low[0] == pytest.approx(train["Valence"].min())
    for split, row in (("train", 2), ("test", 4)):
        out = pd.read_csv(result.outputs[split])
        assert len(out) == 6
        assert result.counts[split]["rows_affect_masked"] == 1 and result.counts[split]["rows_rejected"] == 0
        assert np.isnan(out.loc[row, "Valence"]) and np.isnan(out.loc[row, "Valence_norm"])
        assert np.isfinite(out.drop(index=row)["Valence_norm"]).all()
        assert np.isfinite(out["Arousal_norm"]).all()
    assert result.counts["val"]["rows_affect_masked"] == 0


def test_min_visibility_needs_the_column(fake_archive, tmp_path):
    with pytest.raises(ValueError, match="Face_Visibility"):
        normalize_dataset(fake_archive / ANNOTATIONS_DIRNAME, tmp_path / "out", min_visibility=10)


def test_cli_filter_test_by_visibility_flag(fake_archive, tmp_path):
    from emonet.cli import main

    vis_dir = _with_visibility(fake_archive, tmp_path / "vis")
    base = ["normalize", "--annotations-dir", str(vis_dir), "--min-visibility", "50"]
    assert main([*base, "--out-dir", str(tmp_path / "kept")]) == 0
    assert len(pd.read_csv(tmp_path / "kept" / normalized_filename("test"))) == 6
    assert main([*base, "--out-dir", str(tmp_path / "filtered"), "--filter-test-by-visibility"]) == 0
    assert len(pd.read_csv(tmp_path / "filtered" / normalized_filename("test"))) == 3
