"""The demo archive: exact EMOTIC layout, archive quirks, real faces, cues and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emonet.data.annotations import load_annotations, scaled_box
from emonet.data.arrays import load_array
from emonet.data.demo import GLYPHS, MANIFEST_NAME, _sample_emotions, example_crop, make_demo_data
from emonet.data.face_visibility import FaceVisibilityScorer
from emonet.schema import (
    AGES,
    CSV_COLUMNS,
    EMOTIONS,
    GENDERS,
    SPLITS,
    annotations_path,
    arrays_dir,
    crop_name,
    image_name,
)

ROWS = {"train": 40, "val": 12, "test": 12}
SIZE = 112  # the default: the face landmarker needs faces of this size


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "emotic"
    returned = make_demo_data(root, seed=3, n_train=ROWS["train"], n_val=ROWS["val"], n_test=ROWS["test"], size=SIZE)
    assert returned == root
    return root


@pytest.fixture(scope="module")
def tables(demo_root: Path) -> dict[str, pd.DataFrame]:
    return {split: load_annotations(annotations_path(demo_root, split), strict=True) for split in SPLITS}


@pytest.fixture(scope="module")
def manifest(demo_root: Path) -> dict:
    return json.loads((demo_root / MANIFEST_NAME).read_text(encoding="utf-8"))


def test_csvs_follow_the_archive_schema(tables: dict[str, pd.DataFrame]) -> None:
    for split, df in tables.items():
        assert list(df.columns) == list(CSV_COLUMNS)
        assert len(df) == ROWS[split]
        assert df["Crop_name"].tolist() == [crop_name(split, i) for i in range(ROWS[split])]
        positives = df[list(EMOTIONS)].sum(axis=1)
        assert positives.between(1, 4).all()
        assert set(df["Age"]) <= set(AGES) and set(df["Gender"]) <= set(GENDERS)
        for column in ("Width", "Height", "X_min", "Y_min", "X_max", "Y_max", "Valence", "Arousal", "Dominance"):
            assert df[column].dtype == np.float64
        assert df[["Valence", "Arousal", "Dominance"]].stack().between(1.0, 10.0).all()
        assert (df["X_min"] < df["X_max"]).all() and (df["Y_min"] < df["Y_max"]).all()


def test_image_indices_are_global_across_splits(tables: dict[str, pd.DataFrame], manifest: dict) -> None:
    names = [set(df["Arr_name"]) for df in tables.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set().union(*names) == {image_name(i) for i in range(manifest["images"])}


def test_every_array_loads_and_crops_are_fixed_squares(demo_root: Path, tables: dict[str, pd.DataFrame]) -> None:
    img_dir = arrays_dir(demo_root)
    for df in tables.values():
        for crop, image in zip(df["Crop_name"], df["Arr_name"]):
            assert load_array(img_dir, crop).shape == (SIZE, SIZE, 3)
            assert load_array(img_dir, image).dtype == np.uint8


def _shrink(image: np.ndarray, side: int = 32) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR), dtype=float)


def test_boxes_rescaled_to_the_stored_image_give_the_crop(
    demo_root: Path, tables: dict[str, pd.DataFrame], manifest: dict
) -> None:
    """Swapped Width/Height, overflowing boxes and half-size images are undone by ``scaled_box``."""
    img_dir = arrays_dir(demo_root)
    half_size = 0
    swapped = sum(len(rows) for rows in manifest["swapped_rows"].values())
    overflowing = sum(len(rows) for rows in manifest["overflowing_rows"].values())
    for df in tables.values():
        for _, row in df.iterrows():
            image = np.asarray(load_array(img_dir, row["Arr_name"]))
            stated = sorted((row["Width"], row["Height"]))
            half_size += sorted(image.shape[:2]) != stated
            left, top, right, bottom = scaled_box(row, image.shape)
            # Half-size images lose detail, so compare at low resolution.
            recut = _shrink(image[top:bottom, left:right])
            crop = _shrink(np.asarray(load_array(img_dir, row["Crop_name"])))
            assert np.abs(recut - crop).mean() < 12, row["Crop_name"]
    assert swapped >= 2
    assert overflowing >= 2
    assert half_size >= 2


def test_swapped_and_overflowing_rows_are_what_the_manifest_says(
    demo_root: Path, tables: dict[str, pd.DataFrame], manifest: dict
) -> None:
    img_dir = arrays_dir(demo_root)
    for split, df in tables.items():
        swapped, overflowing = manifest["swapped_rows"][split], manifest["overflowing_rows"][split]
        assert not set(swapped) & set(overflowing)
        # Swapped rows: the box overflows the stated width, which is the photo's height.
        assert (df.loc[swapped, "X_max"] > df.loc[swapped, "Width"]).all()
        plain = df.drop(index=swapped + overflowing)
        assert (plain["X_max"] <= plain["Width"]).all() and (plain["Y_max"] <= plain["Height"]).all()
        for _, row in df.loc[overflowing].iterrows():
            # A correctly stated, clearly portrait photo; the box overflows its width by
            # 2 px but fits the swapped size, so only the aspect ratio tells.
            assert row["Height"] >= 1.25 * row["Width"]
            assert row["X_max"] - row["Width"] == 2.0
            assert row["X_max"] <= row["Height"] and row["Y_max"] <= row["Width"]
            image = load_array(img_dir, row["Arr_name"])
            height, width = image.shape[:2]
            assert height / width == pytest.approx(row["Height"] / row["Width"], abs=0.03)
            left, top, right, bottom = scaled_box(row, image.shape)
            assert right == width
            assert bottom == pytest.approx(row["Y_max"] * height / row["Height"], abs=1)


def test_several_persons_share_full_images(tables: dict[str, pd.DataFrame]) -> None:
    counts = tables["train"]["Arr_name"].value_counts()
    assert counts.max() >= 2 and counts.max() <= 3
    assert (counts == 1).any()
    # Persons of one photo share its file name and stated size.
    for _, group in tables["train"].groupby("Arr_name"):
        assert group["Filename"].nunique() == 1
        assert sorted(group[["Width", "Height"]].iloc[0]) == sorted(group[["Width", "Height"]].iloc[-1])


def test_every_emotion_has_positives_in_every_split(tables: dict[str, pd.DataFrame]) -> None:
    assert (tables["train"][list(EMOTIONS)].sum() >= 2).all()
    for split in ("val", "test"):
        assert (tables[split][list(EMOTIONS)].sum() >= 1).all()


def test_labels_are_imbalanced_like_emotic() -> None:
    rng = np.random.default_rng(0)
    labels = _sample_emotions(rng, rng.normal(size=2000))
    frequency = dict(zip(EMOTIONS, labels.mean(axis=0)))
    assert frequency["Engagement"] > 0.3
    rare = max(frequency["Pain"], frequency["Embarrassment"], frequency["Fear"])
    assert min(frequency["Happiness"], frequency["Anticipation"]) > 3 * rare
    assert min(frequency.values()) >= 0.05  # the guaranteed share
    assert labels.sum(axis=1).min() >= 1 and labels.sum(axis=1).max() <= 4
    assert 0.05 < labels.mean() < 0.12


def _glyph_pixels(crop: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((np.abs(crop.astype(int) - colour).max(axis=2) <= 10).sum())


def test_glyph_colours_match_positive_emotions(demo_root: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Each documented glyph colour is in the crop exactly when its emotion is positive."""
    from emonet.data.demo import _GLYPH_COLOURS

    img_dir = arrays_dir(demo_root)
    colours = {name: rgb for name, rgb in _GLYPH_COLOURS if rgb is not None}
    df = tables["train"]
    for _, row in df.iterrows():
        crop = np.asarray(load_array(img_dir, row["Crop_name"]))
        for emotion in EMOTIONS:
            if GLYPHS[emotion] not in colours:
                continue
            present = _glyph_pixels(crop, colours[GLYPHS[emotion]]) >= 40
            assert present == bool(row[emotion]), (row["Crop_name"], emotion)


def test_clothing_hue_follows_valence(demo_root: Path, tables: dict[str, pd.DataFrame]) -> None:
    """The valence cue: the torso's hue moves from blue (low) towards orange (high)."""
    img_dir = arrays_dir(demo_root)
    df = pd.concat(tables.values(), ignore_index=True)
    hues = []
    for name in df["Crop_name"]:
        torso = np.asarray(Image.fromarray(np.asarray(load_array(img_dir, name))).convert("HSV"))
        # The torso's edge columns: clothing, rarely covered by a glyph.
        strip = torso[int(0.6 * SIZE) :, int(0.08 * SIZE) : int(0.14 * SIZE)]
        hues.append(np.median(strip[..., 0]))
    rho = pd.Series(hues).corr(df["Valence"], method="spearman")
    assert rho < -0.6  # PIL hue grows from orange to blue: high valence, low hue


def test_faces_are_full_partial_or_absent_for_the_face_landmarker(demo_root: Path, manifest: dict) -> None:
    img_dir = arrays_dir(demo_root)
    modes = manifest["face_modes"]["train"]
    picked = {mode: [i for i, m in enumerate(modes) if m == mode][:3] for mode in ("full", "partial", "absent")}
    assert all(len(rows) == 3 for rows in picked.values()), picked
    scores: dict[str, list[float]] = {}
    with FaceVisibilityScorer() as scorer:
        for mode, rows in picked.items():
            for i in rows:
                scores.setdefault(mode, []).append(scorer(load_array(img_dir, crop_name("train", i))))
    assert all(score == 100.0 for score in scores["full"]), scores
    assert all(0.0 < score < 100.0 for score in scores["partial"]), scores
    assert all(score == 0.0 for score in scores["absent"]), scores


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    kwargs = {"n_train": 6, "n_val": 3, "n_test": 3, "size": 48}
    first = files(make_demo_data(tmp_path / "a", seed=7, **kwargs))
    second = files(make_demo_data(tmp_path / "b", seed=7, **kwargs))
    other = files(make_demo_data(tmp_path / "c", seed=8, **kwargs))
    assert first == second
    csv = str(Path("annots_arrs") / "annot_arrs_train.csv")
    assert first[csv] != other[csv]
    crop = str(Path("img_arrs") / crop_name("train", 0))
    assert first[crop] != other[crop]


def test_rerun_in_the_same_folder_removes_its_stale_arrays(tmp_path: Path) -> None:
    root = make_demo_data(tmp_path / "demo", n_train=10, n_val=2, n_test=2, size=40)
    make_demo_data(root, seed=1, n_train=4, n_val=2, n_test=2, size=40)
    assert len(load_annotations(annotations_path(root, "train"))) == 4
    assert not (arrays_dir(root) / crop_name("train", 4)).exists()
    referenced = set()
    for split in SPLITS:
        df = pd.read_csv(annotations_path(root, split))
        referenced |= set(df["Arr_name"]) | set(df["Crop_name"])
    assert {p.name for p in arrays_dir(root).glob("*.npy")} == referenced


def test_refuses_to_overwrite_an_archive_it_did_not_write(fake_archive: Path) -> None:
    csv = annotations_path(fake_archive, "train")
    before = csv.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite"):
        make_demo_data(fake_archive, n_train=2, n_val=2, n_test=2, size=40)
    assert csv.read_bytes() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_train": 0}, "n_train must be an integer >= 1, got 0"),
        ({"n_val": -3}, "n_val must be an integer >= 1, got -3"),
        ({"n_test": 2.5}, "n_test must be an integer >= 1, got 2.5"),
        ({"size": 16}, "size must be an integer >= 32, got 16"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ],
)
def test_bad_arguments_raise_naming_the_value(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        make_demo_data(tmp_path / "demo", **kwargs)
    assert not (tmp_path / "demo").exists()


def test_example_crop_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        example_crop("profile")
    with pytest.raises(ValueError, match="size"):
        example_crop("whole", 0)
