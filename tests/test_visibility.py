"""Tests of the face-visibility step on a real face photo and on a tiny fake archive."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from emonet.annotations import load_annotations
from emonet.arrays import load_array
from emonet.schema import FACE_VISIBILITY_COLUMN, annotations_path, arrays_dir, crop_name
from emonet.visibility import (
    FaceVisibilityScorer,
    VisibilityResult,
    add_face_visibility,
    example_crop,
    face_visibility_score,
    plot_visibility_histogram,
    score_crops,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def scorer():
    with FaceVisibilityScorer() as face_scorer:
        yield face_scorer


@pytest.fixture(scope="module")
def crop_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    """Crops with known scores, plus a missing and a corrupt one (last two names)."""
    folder = tmp_path_factory.mktemp("crops")
    crops = [
        example_crop("whole", 160),
        example_crop("partial", 160),
        np.full((160, 160, 3), 127, dtype=np.uint8),
        example_crop("none", 160),
        example_crop("whole"),
        example_crop("partial"),
    ]
    names = []
    for i, crop in enumerate(crops):
        names.append(f"crop_{i}.npy")
        np.save(folder / names[-1], crop)
    (folder / "corrupt.npy").write_bytes(b"not a numpy file")
    return folder, names + ["missing.npy", "corrupt.npy"]


def fake_mesh(points: list[tuple[float, float]] | None) -> SimpleNamespace:
    """An object with Face Mesh's ``process`` that returns the given landmarks."""
    faces = None if points is None else [SimpleNamespace(landmark=[SimpleNamespace(x=x, y=y) for x, y in points])]
    return SimpleNamespace(process=lambda image: SimpleNamespace(multi_face_landmarks=faces))


# --- the score of one crop ---------------------------------------------------------


@pytest.mark.parametrize("size", [None, 224, 112])
def test_whole_face_is_fully_visible(scorer, size):
    score = scorer(example_crop("whole", size))
    assert 95.0 <= score <= 100.0


@pytest.mark.parametrize("size", [None, 224, 112])
def test_face_cut_by_the_border_is_partly_visible(scorer, size):
    # Face Mesh extrapolates the landmarks of the cut-off part past the border.
    score = scorer(example_crop("partial", size))
    assert 0.0 < score < 100.0


@pytest.mark.parametrize(
    "crop",
    [np.full((128, 96, 3), 200, dtype=np.uint8), np.zeros((50, 50, 3), dtype=np.uint8), example_crop("none", 128)],
    ids=["uniform", "black", "body-without-face"],
)
def test_no_face_scores_zero(scorer, crop):
    assert scorer(crop) == 0.0


def test_score_divides_by_the_landmarks_returned():
    # With refine_landmarks the mesh returns 478 points; dividing by 468 would exceed 100.
    inside = [(0.5, 0.5)] * 470 + [(0.0, 1.0)] * 8  # the borders 0 and 1 count as inside
    assert face_visibility_score(np.zeros((8, 8, 3), np.uint8), fake_mesh(inside)) == 100.0
    cut = inside[:400] + [(-0.1, 0.5)] * 40 + [(0.5, 1.2)] * 38
    assert face_visibility_score(np.zeros((8, 8, 3), np.uint8), fake_mesh(cut)) == pytest.approx(100.0 * 400 / 478)
    assert face_visibility_score(np.zeros((8, 8, 3), np.uint8), fake_mesh(None)) == 0.0
    assert face_visibility_score(np.zeros((8, 8, 3), np.uint8), fake_mesh([])) == 0.0


@pytest.mark.parametrize(
    "crop",
    [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), [[0, 0, 0]]],
    ids=["float", "gray", "rgba", "list"],
)
def test_bad_crop_is_rejected(crop):
    with pytest.raises(ValueError, match="RGB uint8"):
        face_visibility_score(crop, fake_mesh(None))


def test_closed_scorer_refuses_to_score():
    scorer = FaceVisibilityScorer()
    scorer.close()
    scorer.close()  # harmless twice
    with pytest.raises(ValueError, match="closed"):
        scorer(np.zeros((8, 8, 3), np.uint8))


# --- many crops ---------------------------------------------------------------------


def test_score_crops_in_process(crop_dir, caplog):
    folder, names = crop_dir
    with caplog.at_level(logging.WARNING, logger="emonet.visibility"):
        scores = score_crops(folder, names, workers=1, progress=False)
    assert scores.dtype == np.float64 and scores.shape == (len(names),)
    assert scores[0] == 100.0 and scores[4] == 100.0
    assert 0.0 < scores[1] < 100.0 and 0.0 < scores[5] < 100.0
    assert scores[2] == 0.0 and scores[3] == 0.0
    assert np.isnan(scores[6:]).all() and np.isnan(scores).sum() == 2
    assert np.nanmax(scores) <= 100.0
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert "missing.npy" in messages and "not found" in messages
    assert "corrupt.npy" in messages and "cannot read" in messages
    assert "2 of 8 crops" in messages


def test_score_crops_parallel_equals_sequential(crop_dir):
    folder, names = crop_dir
    # Repeated and reversed so each of the 2 workers gets several chunks and the
    # order of results is really tested.
    many = (names + names[::-1]) * 3
    sequential = score_crops(folder, many, workers=1, progress=False)
    parallel = score_crops(folder, many, workers=2, progress=False)
    np.testing.assert_array_equal(parallel, sequential)


@pytest.mark.parametrize("workers", [0, -2, 1.5, True])
def test_score_crops_rejects_bad_workers(crop_dir, workers):
    with pytest.raises(ValueError, match="workers"):
        score_crops(crop_dir[0], crop_dir[1], workers=workers, progress=False)


def test_score_crops_needs_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        score_crops(tmp_path / "no_such_dir", ["a.npy"], workers=1)


def test_score_crops_of_nothing(crop_dir):
    assert score_crops(crop_dir[0], [], progress=False).shape == (0,)


def test_worker_module_does_not_import_torch():
    # Every pool worker imports emonet.visibility; torch would add seconds to start-up.
    code = "import sys, emonet.visibility; print(sorted({'torch', 'pandas', 'mediapipe'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- the CSV step -------------------------------------------------------------------


def test_add_face_visibility_writes_a_copy(fake_archive, tmp_path):
    csv_path = annotations_path(fake_archive, "val")
    img_dir = arrays_dir(fake_archive)
    np.save(img_dir / crop_name("val", 0), example_crop("whole", 128))
    np.save(img_dir / crop_name("val", 2), example_crop("partial", 128))
    (img_dir / crop_name("val", 1)).unlink()
    before = csv_path.read_bytes()
    out_csv = tmp_path / "out" / "val_visibility.csv"
    plot = tmp_path / "out" / "val_visibility.png"

    result = add_face_visibility(csv_path, img_dir, out_csv, workers=1, plot_path=plot)

    assert csv_path.read_bytes() == before
    original = pd.read_csv(csv_path)
    written = pd.read_csv(out_csv)
    assert list(written.columns) == list(original.columns) + [FACE_VISIBILITY_COLUMN]
    assert written["Crop_name"].tolist() == original["Crop_name"].tolist()
    pd.testing.assert_frame_equal(written[original.columns], original, check_dtype=False)
    visibility = written[FACE_VISIBILITY_COLUMN].to_numpy()
    assert visibility[0] == 100.0
    assert np.isnan(visibility[1])
    assert 0.0 < visibility[2] < 100.0
    # The fake archive's other crops are random noise: no face.
    assert (visibility[3:] == 0.0).all()
    # The written CSV is still a valid annotation CSV for the next steps.
    assert len(load_annotations(out_csv)) == len(original)

    assert isinstance(result, VisibilityResult)
    assert (result.rows, result.scored, result.failed, result.with_face, result.full) == (6, 5, 1, 2, 1)
    assert result.mean == pytest.approx(np.nanmean(visibility))
    assert result.out_csv == out_csv and result.plot_path == plot
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert result.as_dict()["failed"] == 1 and result.as_dict()["out_csv"] == str(out_csv)


def test_add_face_visibility_never_overwrites_its_input(fake_archive):
    csv_path = annotations_path(fake_archive, "test")
    before = csv_path.read_bytes()
    same_file_spellings = [csv_path, csv_path.parent / ".." / csv_path.parent.name / csv_path.name]
    link = csv_path.parent / "link.csv"
    link.symlink_to(csv_path)
    same_file_spellings.append(link)
    for out in same_file_spellings:
        with pytest.raises(ValueError, match="must differ from the input"):
            add_face_visibility(csv_path, arrays_dir(fake_archive), out, workers=1)
    with pytest.raises(ValueError, match="plot_path"):
        add_face_visibility(csv_path, arrays_dir(fake_archive), csv_path.with_name("o.csv"), plot_path=csv_path)
    assert csv_path.read_bytes() == before


def test_add_face_visibility_with_no_readable_crop(fake_archive, tmp_path):
    empty = tmp_path / "empty_img_dir"
    empty.mkdir()
    out_csv = tmp_path / "out.csv"
    with pytest.raises(ValueError, match="none of the 6 crops"):
        add_face_visibility(annotations_path(fake_archive, "val"), empty, out_csv, workers=1, progress=False)
    assert not out_csv.exists()
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        add_face_visibility(annotations_path(fake_archive, "val"), tmp_path / "no_such_dir", out_csv)


# --- helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores", [[0.0, 0.0, 50.0, 100.0, np.nan], [np.nan, np.nan], []], ids=["mixed", "all-nan", "empty"]
)
def test_histogram_is_written(tmp_path, scores):
    path = plot_visibility_histogram(np.asarray(scores), tmp_path / "plots" / "h.png", title="val")
    assert path == tmp_path / "plots" / "h.png"
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_example_crop_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        example_crop("profile")
    with pytest.raises(ValueError, match="size"):
        example_crop("whole", 0)


def test_strided_and_memory_mapped_crops_score_like_copies(scorer, tmp_path):
    crop = example_crop("partial", 160)
    np.save(tmp_path / "c.npy", crop)
    mapped = load_array(tmp_path, "c.npy")
    assert isinstance(mapped, np.memmap)
    wide = np.repeat(crop, 2, axis=1)[:, ::2]  # the same pixels as a strided view
    assert not wide.flags["C_CONTIGUOUS"]
    assert scorer(mapped) == scorer(wide) == scorer(crop)


def test_worker_that_cannot_create_a_face_mesh_fails_its_tasks(monkeypatch):
    # A raising Pool initializer would make the pool respawn workers forever; the
    # error must instead reach the parent through the first task.
    import emonet.visibility as visibility

    def broken() -> None:
        raise ImportError("no mediapipe here")

    monkeypatch.setattr(visibility, "FaceVisibilityScorer", broken)
    monkeypatch.setattr(visibility, "_worker_scorer", None)
    monkeypatch.setattr(visibility, "_worker_img_dir", None)
    monkeypatch.setattr(visibility, "_worker_error", None)
    visibility._init_worker("/nowhere")
    with pytest.raises(RuntimeError, match="no mediapipe here"):
        visibility._score_in_worker("crop.npy")
