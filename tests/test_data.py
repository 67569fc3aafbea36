"""The data layer: CSV validation, safe array loading and the Dataset on quirky rows."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from emonet.data.annotations import affect_targets, load_annotations, raw_affect, scaled_box
from emonet.data.arrays import check_file_name, load_array
from emonet.data.dataset import EmoticDataset
from emonet.schema import CSV_COLUMNS, EMOTIONS, annotations_path, arrays_dir


def _rewrite(csv_path, mutate):
    df = pd.read_csv(csv_path)
    df = mutate(df)
    df.to_csv(csv_path, index=False)


def test_load_annotations_keeps_rows_and_extra_columns(fake_archive):
    csv_path = annotations_path(fake_archive, "train")
    _rewrite(csv_path, lambda df: df.assign(Extra=1))
    df = load_annotations(csv_path)
    assert list(df.columns[: len(CSV_COLUMNS)]) == list(CSV_COLUMNS)
    assert "Extra" in df.columns
    assert len(df) == 6
    assert df.attrs["rejected_rows"] == 0


def test_missing_columns_are_all_named(fake_archive):
    csv_path = annotations_path(fake_archive, "train")
    _rewrite(csv_path, lambda df: df.drop(columns=["Valence", "Crop_name"]))
    with pytest.raises(ValueError, match=r"missing columns: \['Valence', 'Crop_name'\]"):
        load_annotations(csv_path)


def test_empty_csv_is_an_error(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_annotations(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(CSV_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="no rows"):
        load_annotations(header_only)


def test_missing_csv_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_annotations(tmp_path / "nope.csv")


def test_emotions_must_be_binary(fake_archive):
    csv_path = annotations_path(fake_archive, "val")

    def corrupt(df):
        df.loc[2, "Fear"] = 0.5
        return df

    _rewrite(csv_path, corrupt)
    with pytest.raises(ValueError, match=r"row 2 has Fear=0.5"):
        load_annotations(csv_path)


def _corrupt_vad(df):
    df.loc[1, "Valence"] = np.nan
    df.loc[3, "Arousal"] = 11.0
    df.loc[4, "Dominance"] = 0.0
    return df


def test_bad_vad_rows_are_kept_with_their_affect_masked(fake_archive, caplog):
    csv_path = annotations_path(fake_archive, "train")
    original = pd.read_csv(csv_path)
    _rewrite(csv_path, _corrupt_vad)
    with caplog.at_level(logging.WARNING):
        df = load_annotations(csv_path)
    assert len(df) == 6, "no row is dropped for an invalid affect annotation"
    assert df.attrs["rejected_rows"] == 0
    assert df.attrs["affect_masked_rows"] == 3
    assert [r["row"] for r in df.attrs["affect_masked"]] == [1, 3, 4]
    assert "row 1" in caplog.text and "row 3" in caplog.text and "masked" in caplog.text
    # Only the invalid values become NaN; emotion labels and the valid values stay.
    assert np.isnan(df.loc[1, "Valence"]) and df.loc[1, "Arousal"] == original.loc[1, "Arousal"]
    assert np.isnan(df.loc[3, "Arousal"]) and np.isnan(df.loc[4, "Dominance"])
    np.testing.assert_array_equal(df[list(EMOTIONS)].to_numpy(), original[list(EMOTIONS)].to_numpy())
    # Valence/arousal targets: NaN for both values of rows 1 and 3; row 4 (dominance
    # only, which the model does not predict) keeps its targets.
    targets = affect_targets(df)
    assert np.isnan(targets[[1, 3]]).all() and np.isfinite(targets[[0, 2, 4, 5]]).all()
    raw = raw_affect(df)
    assert np.isnan(raw[1, 0]) and raw[1, 1] == original.loc[1, "Arousal"]


def test_bad_vad_rows_can_still_be_dropped_or_be_fatal(fake_archive, caplog):
    csv_path = annotations_path(fake_archive, "train")
    _rewrite(csv_path, _corrupt_vad)
    with caplog.at_level(logging.WARNING):
        df = load_annotations(csv_path, invalid_affect="drop")
    assert len(df) == 3
    assert df.attrs["rejected_rows"] == 3 and df.attrs["affect_masked_rows"] == 0
    assert [r["row"] for r in df.attrs["rejected"]] == [1, 3, 4]
    assert "dropped" in caplog.text
    for invalid_affect in ("mask", "drop"):
        with pytest.raises(ValueError, match="3 rows with invalid VAD"):
            load_annotations(csv_path, strict=True, invalid_affect=invalid_affect)
    with pytest.raises(ValueError, match=r"invalid_affect must be one of \['mask', 'drop'\], got 'keep'"):
        load_annotations(csv_path, invalid_affect="keep")


def test_dataset_item_of_a_masked_row_has_nan_affect_and_its_labels(fake_archive):
    csv_path = annotations_path(fake_archive, "test")
    _rewrite(csv_path, _corrupt_vad)
    dataset = EmoticDataset(csv_path, arrays_dir(fake_archive))
    assert len(dataset) == 6
    item = dataset[1]
    assert torch.isnan(item["affect"]).all()
    assert item["emotions"].sum() >= 1
    assert torch.isfinite(dataset[0]["affect"]).all()


def test_affect_targets_mask_normalized_rows_whose_raw_value_is_missing():
    df = pd.DataFrame(
        {
            "Valence": [1.0, np.nan, 10.0],
            "Arousal": [5.5, 5.0, 12.0],
            "Valence_norm": [-1.0, np.nan, 1.0],
            "Arousal_norm": [0.0, -0.1, 1.0],
        }
    )
    targets = affect_targets(df)
    np.testing.assert_allclose(targets[[0, 2]], [[-1.0, 0.0], [1.0, 1.0]])
    assert np.isnan(targets[1]).all()


@pytest.mark.parametrize("name", ["../secret.npy", "/etc/passwd", "sub/crop.npy", "..", "a\\b.npy", ""])
def test_traversal_names_are_rejected(name):
    with pytest.raises(ValueError, match="file name"):
        check_file_name(name)


def test_traversal_name_in_csv_is_rejected(fake_archive):
    csv_path = annotations_path(fake_archive, "test")

    def corrupt(df):
        df.loc[4, "Crop_name"] = "../../outside.npy"
        return df

    _rewrite(csv_path, corrupt)
    with pytest.raises(ValueError, match=r"row 4: Crop_name .*'\.\./\.\./outside\.npy'"):
        load_annotations(csv_path)


def test_load_array_is_memory_mapped_and_checked(tmp_path):
    np.save(tmp_path / "ok.npy", np.zeros((4, 5, 3), dtype=np.uint8))
    array = load_array(tmp_path, "ok.npy")
    assert isinstance(array, np.memmap) and array.shape == (4, 5, 3)

    np.save(tmp_path / "gray.npy", np.zeros((4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"H x W x 3.*\(4, 5\)"):
        load_array(tmp_path, "gray.npy")
    np.save(tmp_path / "float.npy", np.zeros((4, 5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8, got float32"):
        load_array(tmp_path, "float.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(0, 5, 3\)"):
        load_array(tmp_path, "empty.npy")
    (tmp_path / "truncated.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="truncated.npy"):
        load_array(tmp_path, "truncated.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="junk.npy"):
        load_array(tmp_path, "junk.npy")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_array(tmp_path, "missing.npy")


def test_scaled_box_rescales_unswaps_and_clamps():
    # Array at half the photo's size: the box halves.
    row = {"Width": 200.0, "Height": 100.0, "X_min": 20.0, "Y_min": 10.0, "X_max": 120.0, "Y_max": 90.0}
    assert scaled_box(row, (50, 100, 3)) == (10, 5, 60, 45)
    # Width and Height swapped in the CSV: the box only fits the swapped size.
    swapped = {**row, "Width": 100.0, "Height": 200.0}
    assert scaled_box(swapped, (50, 100, 3)) == (10, 5, 60, 45)
    # A box beyond the image is clamped and never empty.
    beyond = {**row, "X_min": 250.0, "X_max": 400.0, "Y_min": -30.0, "Y_max": 500.0}
    left, top, right, bottom = scaled_box(beyond, (50, 100, 3))
    assert 0 <= left < right <= 100 and 0 <= top < bottom <= 50


def test_scaled_box_keeps_a_correctly_stated_portrait_row_whose_box_overflows():
    # A portrait photo (100 x 200) stored at half size; the box overflows the width by
    # 2 px, as annotation tools allow. The box alone would fit the swapped size, but the
    # array's aspect says the stated order is right.
    row = {"Width": 100.0, "Height": 200.0, "X_min": 10.0, "Y_min": 20.0, "X_max": 102.0, "Y_max": 90.0}
    assert scaled_box(row, (100, 50, 3)) == (5, 10, 50, 45)


def test_scaled_box_unswaps_by_aspect_even_when_the_box_overflows():
    # A landscape photo (200 x 100) stated swapped; its box overflows the true width by
    # 2 px, so the box fits neither order: the aspect alone tells.
    row = {"Width": 100.0, "Height": 200.0, "X_min": 40.0, "Y_min": 20.0, "X_max": 202.0, "Y_max": 60.0}
    assert scaled_box(row, (50, 100, 3)) == (20, 10, 100, 30)


def test_scaled_box_uses_the_box_only_when_the_aspect_cannot_tell():
    # A 300 x 200 photo stored as a square array: both orders match the aspect equally.
    # Stated swapped (200 x 300), the box fits only the swapped size: swap.
    swapped = {"Width": 200.0, "Height": 300.0, "X_min": 100.0, "Y_min": 30.0, "X_max": 280.0, "Y_max": 150.0}
    assert scaled_box(swapped, (60, 60, 3)) == (20, 9, 56, 45)
    # A correctly stated 200 x 300 photo whose box overflows the width by 2 px: within
    # the tolerance, it fits as stated, so it is not swapped.
    overflowing = {"Width": 200.0, "Height": 300.0, "X_min": 100.0, "Y_min": 30.0, "X_max": 202.0, "Y_max": 150.0}
    assert scaled_box(overflowing, (60, 60, 3)) == (30, 6, 60, 30)


def test_dataset_items_on_quirky_rows(fake_archive):
    # Row 0 has swapped Width/Height; rows 0 and 1 share one full image.
    df = load_annotations(annotations_path(fake_archive, "train"))
    assert df.loc[0, "Arr_name"] == df.loc[1, "Arr_name"]
    dataset = EmoticDataset(df, arrays_dir(fake_archive), with_context=True)
    assert len(dataset) == 6
    item = dataset[0]
    assert item["body"].shape == (3, 40, 40) and item["body"].dtype == torch.uint8
    assert item["context"].shape == (3, 60, 100)
    assert item["emotions"].shape == (len(EMOTIONS),) and item["emotions"].dtype == torch.float32
    assert torch.equal(item["emotions"], torch.tensor(df.loc[0, list(EMOTIONS)].to_numpy(dtype=np.float32)))
    assert item["affect"].shape == (2,) and item["affect"].abs().max() <= 1
    expected = 2 * (df.loc[0, "Valence"] - 1) / 9 - 1
    assert item["affect"][0].item() == pytest.approx(expected, abs=1e-6)
    # The swapped row's box, rescaled to its half-size full image, matches the unswapped one.
    image = load_array(arrays_dir(fake_archive), df.loc[0, "Arr_name"])
    height, width = image.shape[:2]
    x0, y0, x1, y1 = scaled_box(df.loc[0], image.shape)
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert [x0 / width, y0 / height, x1 / width, y1 / height] == pytest.approx(
        [0.05, 5 / 120, 0.45, 115 / 120], abs=0.02
    )


def test_dataset_applies_transform_to_both_streams(fake_archive):
    calls = []

    def transform(body, context=None):
        calls.append(context is not None)
        return body.float() / 255, context.float() / 255

    dataset = EmoticDataset(
        annotations_path(fake_archive, "val"), arrays_dir(fake_archive), transform, with_context=True
    )
    item = dataset[3]
    assert calls == [True]
    assert item["body"].dtype == torch.float32 and item["context"].dtype == torch.float32


def test_dataset_missing_array_names_the_file(fake_archive):
    (arrays_dir(fake_archive) / "crop_arr_test_2.npy").unlink()
    dataset = EmoticDataset(annotations_path(fake_archive, "test"), arrays_dir(fake_archive))
    with pytest.raises(FileNotFoundError, match="crop_arr_test_2.npy"):
        dataset[2]
