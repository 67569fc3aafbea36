"""Tests of the face-visibility step on a real face photo and on a tiny fake archive."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import emonet.data.face_visibility as visibility
from emonet.cli import main
from emonet.data.annotations import load_annotations
from emonet.data.arrays import load_array
from emonet.data.demo import example_crop
from emonet.data.face_visibility import (
    FACE_LANDMARKER_ENV,
    FACE_LANDMARKER_SHA256,
    FACE_LANDMARKER_URL,
    MAX_CROP_PIXELS,
    FaceVisibilityScorer,
    default_face_landmarker_path,
    default_workers,
    face_landmarker_path,
    face_visibility_score,
    score_crops,
    score_names,
)
from emonet.data.visibility_column import VisibilityResult, add_face_visibility, write_visibility_csv
from emonet.schema import FACE_VISIBILITY_COLUMN, annotations_path, arrays_dir, crop_name

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


def fake_landmarker(points: list[tuple[float, float]] | None) -> SimpleNamespace:
    """An object with the face landmarker's ``detect`` that returns the given landmarks."""
    faces = [] if points is None else [[SimpleNamespace(x=x, y=y) for x, y in points]]
    return SimpleNamespace(detect=lambda image: SimpleNamespace(face_landmarks=faces))


# --- the score of one crop ---------------------------------------------------------


@pytest.mark.parametrize("size", [None, 224, 112])
def test_whole_face_is_fully_visible(scorer, size):
    score = scorer(example_crop("whole", size))
    assert 95.0 <= score <= 100.0


@pytest.mark.parametrize("size", [None, 224, 112])
def test_face_cut_by_the_border_is_partly_visible(scorer, size):
    # The landmarker extrapolates the landmarks of the cut-off part past the border.
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
    # The landmarker returns 478 points (the mesh and the irises); dividing by 468 would exceed 100.
    inside = [(0.5, 0.5)] * 470 + [(0.0, 1.0)] * 8  # the borders 0 and 1 count as inside
    assert face_visibility_score(np.zeros((8, 8, 3), np.uint8), fake_landmarker(inside)) == 100.0
    cut = inside[:400] + [(-0.1, 0.5)] * 40 + [(0.5, 1.2)] * 38
    assert face_visibility_score(np.zeros((8, 8, 3), np.uint8), fake_landmarker(cut)) == pytest.approx(
        100.0 * 400 / 478
    )
    assert face_visibility_score(np.zeros((8, 8, 3), np.uint8), fake_landmarker(None)) == 0.0
    assert face_visibility_score(np.zeros((8, 8, 3), np.uint8), fake_landmarker([])) == 0.0


@pytest.mark.parametrize(
    "crop",
    [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), [[0, 0, 0]]],
    ids=["float", "gray", "rgba", "list"],
)
def test_bad_crop_is_rejected(crop):
    with pytest.raises(ValueError, match="RGB uint8"):
        face_visibility_score(crop, fake_landmarker(None))


def test_closed_scorer_refuses_to_score():
    scorer = FaceVisibilityScorer()
    scorer.close()
    scorer.close()  # harmless twice
    with pytest.raises(ValueError, match="closed"):
        scorer(np.zeros((8, 8, 3), np.uint8))


# --- many crops ---------------------------------------------------------------------


def test_score_crops_in_process(crop_dir, caplog):
    folder, names = crop_dir
    with caplog.at_level(logging.WARNING, logger="emonet.data.face_visibility"):
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
    # Every pool worker imports emonet.data.face_visibility; torch would add seconds to start-up,
    # and the split step (pandas, the CSV, the histogram) runs in the parent only.
    code = (
        "import sys, emonet.data.face_visibility; "
        "print(sorted({'torch', 'pandas', 'emonet.data.visibility_column'} & set(sys.modules)))"
    )
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


def test_strided_and_memory_mapped_crops_score_like_copies(scorer, tmp_path):
    crop = example_crop("partial", 160)
    np.save(tmp_path / "c.npy", crop)
    mapped = load_array(tmp_path, "c.npy")
    assert isinstance(mapped, np.memmap)
    wide = np.repeat(crop, 2, axis=1)[:, ::2]  # the same pixels as a strided view
    assert not wide.flags["C_CONTIGUOUS"]
    assert scorer(mapped) == scorer(wide) == scorer(crop)


def test_a_landmarker_that_cannot_be_created_fails_the_chunk(monkeypatch):
    # The error must reach the parent through the chunk's result, not kill the worker.
    def broken(face_landmarker: Path) -> None:
        raise ImportError("no mediapipe here")

    monkeypatch.setattr(visibility, "FaceVisibilityScorer", broken)
    monkeypatch.setattr(visibility, "_thread_state", threading.local())
    with pytest.raises(ImportError, match="no mediapipe here"):
        score_names("/nowhere", ["crop.npy"])


def test_one_landmarker_per_thread_is_reused(monkeypatch, crop_dir):
    created = []

    class CountingScorer(FaceVisibilityScorer):
        def __init__(self, face_landmarker: Path) -> None:
            created.append(threading.get_ident())
            super().__init__(face_landmarker)

    monkeypatch.setattr(visibility, "FaceVisibilityScorer", CountingScorer)
    monkeypatch.setattr(visibility, "_thread_state", threading.local())
    folder, names = crop_dir
    first = score_crops(folder, names, workers=1, progress=False)
    second, failures = score_names(folder, names)
    np.testing.assert_array_equal(first, second)
    assert sorted(failures) == [6, 7]
    assert len(created) == 1
    other_thread = threading.Thread(target=score_names, args=(folder, names[:1]))
    other_thread.start()
    other_thread.join()
    assert len(created) == 2 and created[1] != created[0]


# --- hostile and unusual arrays ----------------------------------------------------


def test_fortran_order_crop_scores_like_c_order(tmp_path):
    # A valid .npy in Fortran order maps as a read-only, non-C-contiguous array, which
    # MediaPipe refused ("not c_contiguous", legacy API) or would read as other pixels
    # (mediapipe.Image takes the data pointer as packed rows).
    crop = example_crop("partial", 160)
    np.save(tmp_path / "c.npy", crop)
    np.save(tmp_path / "f.npy", np.asfortranarray(crop))
    assert not load_array(tmp_path, "f.npy").flags["C_CONTIGUOUS"]
    in_process = score_crops(tmp_path, ["c.npy", "f.npy"] * 2, workers=1, progress=False)
    pooled = score_crops(tmp_path, ["c.npy", "f.npy"] * 2, workers=2, progress=False)
    assert 0.0 < in_process[0] < 100.0
    np.testing.assert_array_equal(in_process, np.full(4, in_process[0]))
    np.testing.assert_array_equal(pooled, in_process)


def write_sparse_crop(path: Path, height: int, width: int) -> None:
    """A valid .npy whose header declares height x width x 3, as a sparse file: the
    pixels are a hole, so it takes a few KB on disk whatever its size."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(height, width, 3))
    del array
    assert path.stat().st_size > height * width * 3


@pytest.mark.parametrize("workers", [1, 2])
def test_oversize_crop_scores_nan_with_a_reason(tmp_path, caplog, workers):
    # MediaPipe aborted the process on it (rc 134, legacy API) with workers=1, and the pool hung.
    write_sparse_crop(tmp_path / "huge.npy", 100_000, 100_000)
    np.save(tmp_path / "face.npy", example_crop("whole", 128))
    with caplog.at_level(logging.WARNING, logger="emonet.data.face_visibility"):
        scores = score_crops(tmp_path, ["huge.npy", "face.npy"] * 2, workers=workers, progress=False)
    assert np.isnan(scores[0]) and np.isnan(scores[2])
    assert scores[1] == scores[3] == 100.0
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert "huge.npy" in messages and "100000 x 100000 px is over the limit" in messages
    assert 100_000 * 100_000 > MAX_CROP_PIXELS


def test_large_crop_is_subsampled_before_scoring(monkeypatch):
    shapes: list[tuple[int, ...]] = []
    landmarks = fake_landmarker([(0.5, 0.5)] * 10)
    recording = SimpleNamespace(detect=lambda image: shapes.append(image.numpy_view().shape) or landmarks.detect(image))
    monkeypatch.setattr(visibility, "MAX_SCORED_SIDE", 100)
    assert face_visibility_score(np.zeros((450, 230, 3), np.uint8), recording) == 100.0
    assert face_visibility_score(np.zeros((100, 60, 3), np.uint8), recording) == 100.0
    assert shapes == [(90, 46, 3), (100, 60, 3)]  # every 5th pixel; a crop within the limit as it is


def test_subsampling_keeps_the_score(scorer, monkeypatch):
    # Visibility is a ratio of landmarks inside the crop: a crop subsampled to half
    # its side keeps a whole face whole and a cut face cut.
    whole, partial = example_crop("whole"), example_crop("partial")  # about 400 x 230
    monkeypatch.setattr(visibility, "MAX_SCORED_SIDE", 200)
    assert scorer(whole) == 100.0
    assert 0.0 < scorer(partial) < 100.0


def _worker_pid(img_dir: str, names: list[str], face_landmarker: str):
    """Stands in for ``score_names`` in pool workers: each crop's score is the worker's process id."""
    return np.full(len(names), float(os.getpid())), {}


def test_the_pool_is_kept_for_the_next_call(crop_dir, monkeypatch):
    folder, names = crop_dir
    visibility.shutdown_pools()
    monkeypatch.setattr(visibility, "score_names", _worker_pid)
    score_crops(folder, names * 4, workers=2, progress=False)
    (pool,) = visibility._idle_pools[2]
    first_workers = set(pool._processes)
    second = score_crops(folder, names * 4, workers=2, progress=False)
    # Every chunk of the second call ran in a worker started for the first one.
    assert set(second.astype(int)) <= first_workers
    visibility.shutdown_pools()
    assert not visibility._idle_pools


def _exit_on_poison(img_dir: str, names: list[str], face_landmarker: str):
    """Stands in for ``score_names`` in pool workers: a worker sent the crop named
    "poison.npy" dies at once, as on a SIGKILL or an abort in native code."""
    if "poison.npy" in names:
        os._exit(70)
    return visibility.score_names(img_dir, names, face_landmarker)


def test_a_dead_worker_fails_the_call_instead_of_hanging(crop_dir, monkeypatch):
    folder, names = crop_dir
    monkeypatch.setattr(visibility, "score_names", _exit_on_poison)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            score_crops(folder, names[:4] * 4 + ["poison.npy"] + names[:4] * 4, workers=2, progress=False)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = err

    # A daemon thread, so that a hang fails this test instead of blocking the suite.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "score_crops hung after a worker process died"
    assert isinstance(outcome.get("error"), RuntimeError)
    assert "worker process died" in str(outcome["error"]) and str(folder) in str(outcome["error"])
    # The broken pool is not kept: the next call starts a working one.
    monkeypatch.undo()
    np.testing.assert_array_equal(
        score_crops(folder, names, workers=2, progress=False), score_crops(folder, names, workers=1, progress=False)
    )


def test_link_out_of_the_image_folder_scores_nan(tmp_path, caplog):
    img_dir, outside = tmp_path / "img_arrs", tmp_path / "outside"
    img_dir.mkdir()
    outside.mkdir()
    np.save(outside / "face.npy", example_crop("whole", 128))
    (img_dir / "escape.npy").symlink_to(outside / "face.npy")
    np.save(img_dir / "face.npy", example_crop("whole", 128))
    with caplog.at_level(logging.WARNING, logger="emonet.data.face_visibility"):
        scores = score_crops(img_dir, ["escape.npy", "face.npy"], workers=1, progress=False)
    assert np.isnan(scores[0]) and scores[1] == 100.0
    assert "escape.npy" in caplog.text and "outside the image folder" in caplog.text


# --- the model asset ----------------------------------------------------------------


def test_the_default_asset_is_in_the_environment_and_checked(monkeypatch):
    monkeypatch.delenv(FACE_LANDMARKER_ENV, raising=False)
    assert default_face_landmarker_path() == Path(sys.prefix) / "share" / "emonet" / "face_landmarker.task"
    assert face_landmarker_path() == default_face_landmarker_path()


def test_a_missing_asset_names_the_path_the_hash_and_both_remedies(tmp_path, crop_dir):
    missing = tmp_path / "nowhere" / "face_landmarker.task"
    for call in (
        lambda: face_landmarker_path(missing),
        lambda: FaceVisibilityScorer(missing),
        lambda: score_crops(crop_dir[0], crop_dir[1], workers=2, progress=False, face_landmarker=missing),
    ):
        with pytest.raises(FileNotFoundError) as error:
            call()
        message = str(error.value)
        assert str(missing) in message and FACE_LANDMARKER_SHA256 in message
        assert "make venv" in message and FACE_LANDMARKER_URL in message and FACE_LANDMARKER_ENV in message


def test_an_asset_with_another_hash_is_refused(tmp_path, crop_dir):
    other = tmp_path / "face_landmarker.task"
    other.write_bytes(b"not the model")
    with pytest.raises(ValueError, match="refusing it") as error:
        face_landmarker_path(other)
    assert str(other) in str(error.value) and FACE_LANDMARKER_SHA256 in str(error.value)
    with pytest.raises(ValueError, match="refusing it"):
        score_crops(crop_dir[0], crop_dir[1], workers=1, progress=False, face_landmarker=other)


def test_the_environment_variable_points_at_another_copy(tmp_path, monkeypatch):
    copy = tmp_path / "copy.task"
    shutil.copyfile(default_face_landmarker_path(), copy)
    monkeypatch.setenv(FACE_LANDMARKER_ENV, str(copy))
    assert face_landmarker_path() == copy
    with FaceVisibilityScorer() as scorer:
        assert scorer.asset == copy and scorer(example_crop("whole", 128)) == 100.0
    # An explicit path wins over the variable.
    assert face_landmarker_path(default_face_landmarker_path()) == default_face_landmarker_path()
    monkeypatch.setenv(FACE_LANDMARKER_ENV, str(tmp_path / "gone.task"))
    with pytest.raises(FileNotFoundError, match=f"gone.task \\(\\${FACE_LANDMARKER_ENV}\\)"):
        face_landmarker_path()


def test_a_spawned_worker_finds_the_default_asset_without_a_setting(crop_dir, monkeypatch):
    # A fresh interpreter (as a Dask or Prefect worker is) with no setting at all.
    monkeypatch.delenv(FACE_LANDMARKER_ENV, raising=False)
    folder, names = crop_dir
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        found = pool.submit(face_landmarker_path).result()
        scores, failures = pool.submit(score_names, str(folder), names).result()
    assert found == default_face_landmarker_path()
    np.testing.assert_array_equal(scores, score_crops(folder, names, workers=1, progress=False))
    assert sorted(failures) == [6, 7]


def test_the_cli_takes_the_asset_path(fake_archive, tmp_path, capsys):
    args = [
        "visibility",
        "--annotations",
        str(annotations_path(fake_archive, "val")),
        "--img-dir",
        str(arrays_dir(fake_archive)),
        "--out",
        str(tmp_path / "out.csv"),
        "--workers",
        "1",
    ]
    assert main([*args, "--face-landmarker", str(tmp_path / "none.task")]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and f"{tmp_path / 'none.task'} (the path given)" in error
    assert not (tmp_path / "out.csv").exists()
    copy = tmp_path / "copy.task"
    shutil.copyfile(default_face_landmarker_path(), copy)
    assert main([*args, "--face-landmarker", str(copy)]) == 0
    assert len(pd.read_csv(tmp_path / "out.csv")) == 6


_THREAD_PROBE = """
import json, time
import psutil
from emonet.data.demo import example_crop
from emonet.data.face_visibility import FaceVisibilityScorer

process = psutil.Process()
crops = [example_crop(kind, 160) for kind in ("whole", "partial", "none")] * 10
before = len(process.threads())
with FaceVisibilityScorer() as scorer:
    scorer(crops[0])
    created = len(process.threads())
    cpu, start = sum(process.cpu_times()[:2]), time.perf_counter()
    for crop in crops:
        scorer(crop)
    cpu_per_wall = (sum(process.cpu_times()[:2]) - cpu) / (time.perf_counter() - start)
    after = len(process.threads())
print(json.dumps({"before": before, "created": created, "after": after, "cpu_per_wall": cpu_per_wall}))
"""


def test_the_landmarker_computes_on_one_core_and_starts_no_thread_per_crop():
    # A pool worker is given one core: its landmarker must not spread over more.
    # Creating it starts the graph's executor (one thread per core of the machine,
    # taken in turns for one image) and four service threads (measured: 6 on 2 cores);
    # scoring must start none, and the process's CPU time must stay within one core's
    # worth of the wall time (XNNPACK single-threaded, one calculator at a time).
    result = subprocess.run([sys.executable, "-c", _THREAD_PROBE], capture_output=True, text=True, check=True)
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["after"] == counts["created"], counts
    assert counts["created"] - counts["before"] <= (os.cpu_count() or 1) + 4, counts
    assert counts["cpu_per_wall"] <= 1.25, counts


# --- the column the flow writes ----------------------------------------------------


def test_write_visibility_csv_writes_every_row_and_never_the_input(fake_archive, tmp_path):
    csv_path = annotations_path(fake_archive, "train")
    before = csv_path.read_bytes()
    scores = [100.0, np.nan, 0.0, 50.0, 0.0, 100.0]
    out_csv = tmp_path / "vis" / csv_path.name

    result = write_visibility_csv(csv_path, scores, out_csv)

    written = pd.read_csv(out_csv)
    np.testing.assert_array_equal(written[FACE_VISIBILITY_COLUMN].to_numpy(), np.asarray(scores))
    pd.testing.assert_frame_equal(written.drop(columns=FACE_VISIBILITY_COLUMN), pd.read_csv(csv_path))
    assert result.counts() == {"rows": 6, "scored": 5, "failed": 1, "with_face": 3, "full": 2, "mean": 50.0}
    assert result.out_csv == out_csv
    with pytest.raises(ValueError, match="5 face-visibility scores for 6 rows"):
        write_visibility_csv(csv_path, scores[:5], tmp_path / "short.csv")
    assert not (tmp_path / "short.csv").exists()
    with pytest.raises(ValueError, match="must differ from the input"):
        write_visibility_csv(csv_path, scores, csv_path)
    assert csv_path.read_bytes() == before


# --- on a Dask cluster --------------------------------------------------------------


def _shard_states(prepare_data_run_id) -> list[str]:
    """State names of the face-visibility shard task runs under one prepare_data run."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    with get_client(sync_client=True) as client:
        parent_or_child = FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[prepare_data_run_id]),
            id=FlowRunFilterId(any_=[prepare_data_run_id]),
            operator="or_",
        )
        runs = client.read_task_runs(
            flow_run_filter=parent_or_child, task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="visibility-"))
        )
    return sorted(run.state.name for run in runs if run.name.startswith("visibility-"))


@pytest.mark.slow
def test_dask_cluster_scores_like_the_local_path_and_reuses_cached_shards(prefect_env, fake_archive, tmp_path):
    from distributed import LocalCluster

    from flows.training_pipeline import prepare_data
    from flows.visibility import restored_environment

    img_dir = arrays_dir(fake_archive)
    for index, kind in enumerate(["whole", "partial", "none", "whole"]):
        np.save(img_dir / crop_name("val", index), example_crop(kind, 96))
    params = {"data_root": fake_archive, "out_dir": tmp_path / "out", "visibility_shard_size": 4}
    n_shards = 3 * 2  # 6 rows per split in shards of 4

    before = dict(os.environ)
    # This cluster's nannies run in this process too: they set OMP_NUM_THREADS=1 here.
    with (
        restored_environment(),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
    ):
        first = prepare_data(**params, dask_address=cluster.scheduler_address, return_state=True)
        second = prepare_data(**params, dask_address=cluster.scheduler_address, return_state=True)
        assert os.environ.get("OMP_NUM_THREADS") == "1"  # Dask's pre-spawn-environ, in this process
    assert dict(os.environ) == before  # restored for what runs next

    for split in ("train", "val", "test"):
        csv_path = annotations_path(fake_archive, split)
        written = pd.read_csv(tmp_path / "out" / "visibility" / csv_path.name)[FACE_VISIBILITY_COLUMN].to_numpy()
        names = pd.read_csv(csv_path)["Crop_name"].tolist()
        np.testing.assert_array_equal(written, score_crops(img_dir, names, workers=1, progress=False))
    assert first.result().visibility["val"]["full"] == 2
    assert _shard_states(first.state_details.flow_run_id) == ["Completed"] * n_shards
    assert _shard_states(second.state_details.flow_run_id) == ["Cached"] * n_shards


def test_dask_address_names_the_task_runner():
    from flows.visibility import dask_task_runner

    local = dask_task_runner("local")
    assert local.address is None
    assert local.cluster_kwargs["n_workers"] == default_workers()
    assert local.cluster_kwargs["threads_per_worker"] == 1 and local.cluster_kwargs["processes"] is True
    assert local.cluster_kwargs["host"] == "127.0.0.1"
    assert dask_task_runner("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert dask_task_runner("10.0.0.5:8786").address == "10.0.0.5:8786"
    for bad in ("locla", "tcp://scheduler", "http://10.0.0.5:8786"):
        with pytest.raises(ValueError, match="dask_address"):
            dask_task_runner(bad)
