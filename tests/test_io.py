"""emonet.utils.io: atomic writers, the one guard against writing over an input (and every
command that uses it), the early writability check and CSV reading that names the file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emonet.cli import main
from emonet.schema import annotations_path, arrays_dir
from emonet.utils import io as emonet_io
from emonet.utils.io import (
    atomic_open,
    atomic_path,
    check_not_inputs,
    ensure_writable_dir,
    read_csv,
    same_file,
    save_npy_atomic,
    write_csv_atomic,
    write_json_atomic,
)


def _leftovers(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


# --------------------------------------------------------------------------- atomic writers


def test_atomic_writers_write_complete_files_with_the_umask_mode(tmp_path):
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "007"]})
    csv_path = write_csv_atomic(frame, tmp_path / "new" / "t.csv")  # the folder is created
    assert csv_path.read_text() == "a,b\n1,x\n2,007\n"  # no index column
    json_path = write_json_atomic({"b": 1, "a": [1.5]}, tmp_path / "t.json")
    assert json.loads(json_path.read_text()) == {"a": [1.5], "b": 1} and json_path.read_text().endswith("\n")
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(np.load(save_npy_atomic(array, tmp_path / "t.npy")), array)
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (csv_path, json_path, tmp_path / "t.npy"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert not _leftovers(tmp_path) and not _leftovers(tmp_path / "new")


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_open(path, "w") as handle:
            handle.write("half of the new conte")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and not _leftovers(tmp_path)
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp != path and path.read_text() == "old"
        tmp.write_text("new")
    assert path.read_text() == "new" and not _leftovers(tmp_path)


# --------------------------------------------------------------------------- the guard


@pytest.fixture
def aliases(tmp_path):
    """An input file and every other spelling of it: `..`, a symlink, a hard link."""
    data = tmp_path / "data"
    data.mkdir()
    source = data / "input.csv"
    source.write_text("a\n1\n")
    (data / "symlink.csv").symlink_to(source)
    os.link(source, data / "hardlink.csv")
    return {
        "same path": source,
        "dotdot": data / "nonexistent" / ".." / "input.csv",
        "symlink": data / "symlink.csv",
        "hard link": data / "hardlink.csv",
    }


def test_same_file_sees_every_alias(aliases, tmp_path):
    source = aliases["same path"]
    for alias in aliases.values():
        assert same_file(alias, source) and same_file(source, alias)
    assert not same_file(tmp_path / "other.csv", source)
    assert not same_file(tmp_path / "missing_a", tmp_path / "missing_b")


def test_check_not_inputs_refuses_any_alias_and_names_both(aliases, tmp_path):
    source = aliases["same path"]
    for alias in aliases.values():
        with pytest.raises(ValueError, match=f"out_csv {alias} must differ from the input annotations {source}"):
            check_not_inputs({"out_csv": alias, "plot": tmp_path / "p.png"}, {"annotations": source})
        with pytest.raises(ValueError, match="must differ from the input"):
            check_not_inputs([tmp_path / "fine.csv", alias], [tmp_path / "other.csv", source])
    with pytest.raises(ValueError, match="out_csv .* and plot .* are the same file"):
        check_not_inputs({"out_csv": tmp_path / "o.csv", "plot": tmp_path / "x" / ".." / "o.csv"}, [source])
    # Distinct files, None and in-memory objects pass.
    check_not_inputs({"out_csv": tmp_path / "o.csv", "plot": None}, {"in": source, "model": object(), "n": None})
    assert source.read_text() == "a\n1\n"


@pytest.fixture
def image_folder(tmp_path):
    """An image folder with one crop, and a folder beside it."""
    img_dir = tmp_path / "img_arrs"
    img_dir.mkdir()
    np.save(img_dir / "crop_arr_test_3.npy", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "elsewhere").mkdir()
    return img_dir


def test_outputs_inside_the_image_folder_are_refused_however_spelled(image_folder, tmp_path):
    crop = image_folder / "crop_arr_test_3.npy"
    (tmp_path / "elsewhere" / "link_to_img").symlink_to(image_folder)
    os.link(crop, tmp_path / "elsewhere" / "hard.npy")
    for out in (
        crop,  # an image
        image_folder / "new_predictions.csv",  # a new file among the images
        tmp_path / "elsewhere" / ".." / "img_arrs" / "crop_arr_test_3.npy",
        tmp_path / "elsewhere" / "link_to_img" / "crop_arr_test_3.npy",
    ):
        with pytest.raises(ValueError, match="lies inside the image folder"):
            check_not_inputs({"out_csv": out}, {}, image_dir=image_folder)
    with pytest.raises(ValueError, match="hard link to an image"):
        check_not_inputs({"plot": tmp_path / "elsewhere" / "hard.npy"}, {}, image_dir=image_folder)
    check_not_inputs({"out_csv": tmp_path / "elsewhere" / "fine.csv"}, {}, image_dir=image_folder)
    assert np.load(crop).shape == (4, 4, 3)


def test_an_output_that_is_a_listed_image_is_refused(tmp_path):
    picture = tmp_path / "photos" / "a.png"
    picture.parent.mkdir()
    picture.write_bytes(b"not really a png")
    (tmp_path / "photos" / "alias.png").symlink_to(picture)
    listed = [tmp_path / "photos" / "missing.png", tmp_path / "photos" / "alias.png"]
    with pytest.raises(ValueError, match="is one of the images this command reads"):
        check_not_inputs({"out_csv": picture}, {}, image_files=listed)
    # The listed files are read only when an output exists.
    check_not_inputs({"out_csv": tmp_path / "new.csv"}, {}, image_files=iter_that_fails())


def iter_that_fails():
    raise AssertionError("the image list was read although no output exists")
    yield  # pragma: no cover


def test_predict_refuses_outputs_among_its_images(tiny_checkpoint, tmp_path, capsys):
    root = tiny_checkpoint["root"]
    img_dir = arrays_dir(root)
    crop = img_dir / pd.read_csv(annotations_path(root, "test"))["Crop_name"][0]
    before = crop.read_bytes()
    args = ["predict", "--model", str(tiny_checkpoint["checkpoint"]), "--input", str(annotations_path(root, "test"))]
    assert main([*args, "--img-dir", str(img_dir), "--out", str(crop)]) == 2
    assert "lies inside the image folder" in capsys.readouterr().err
    # An image named in an image_path column, given as the output.
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    np.save(pictures / "one.npy", np.load(crop))
    listed = tmp_path / "listed.csv"
    pd.DataFrame({"image_path": ["pictures/one.npy"]}).to_csv(listed, index=False)
    code = main(
        [
            "predict",
            "--model",
            str(tiny_checkpoint["checkpoint"]),
            "--input",
            str(listed),
            "--out",
            str(pictures / "one.npy"),
        ]
    )
    assert code == 2 and "is one of the images this command reads" in capsys.readouterr().err
    assert crop.read_bytes() == before and np.load(pictures / "one.npy").shape == np.load(crop).shape


def test_every_command_that_reads_images_refuses_outputs_among_them(tiny_checkpoint, tmp_path, capsys):
    root = tiny_checkpoint["root"]
    img_dir = arrays_dir(root)
    csv = str(annotations_path(root, "test"))
    crop = img_dir / pd.read_csv(csv)["Crop_name"][0]
    before = {path.name: path.read_bytes() for path in img_dir.iterdir()}
    model = str(tiny_checkpoint["checkpoint"])
    commands = {
        "visibility --out": ["visibility", "--annotations", csv, "--img-dir", str(img_dir), "--out", str(crop)],
        "visibility --plot": [
            "visibility",
            "--annotations",
            csv,
            "--img-dir",
            str(img_dir),
            "--out",
            str(tmp_path / "v.csv"),
            "--plot",
            str(crop),
        ],
        "evaluate": [
            "evaluate",
            "--checkpoint",
            model,
            "--annotations",
            csv,
            "--img-dir",
            str(img_dir),
            "--out-dir",
            str(img_dir / "evaluation"),
        ],
        "review": [
            "review",
            "--model",
            model,
            "--annotations",
            csv,
            "--img-dir",
            str(img_dir),
            "--out-dir",
            str(img_dir),
        ],
        "benchmark": [
            "benchmark",
            "--model",
            model,
            "--annotations",
            csv,
            "--img-dir",
            str(img_dir),
            "--out-dir",
            str(tmp_path / "x" / ".." / "emotic_link"),
        ],
    }
    (tmp_path / "emotic_link").symlink_to(img_dir)  # the benchmark's out-dir: the image folder by another name
    for name, argv in commands.items():
        assert main(argv) == 2, name
        assert "lies inside the image folder" in capsys.readouterr().err, name
    assert {path.name: path.read_bytes() for path in img_dir.iterdir()} == before


# --------------------------------------------------------------------------- commands use the guard


def test_review_refuses_to_overwrite_its_input_csv(tiny_checkpoint, tmp_path):
    from emonet.reports.review import review_predictions_with_visualization

    root, checkpoint = tiny_checkpoint["root"], tiny_checkpoint["checkpoint"]
    dirs = {name: tmp_path / name for name in ("inside", "hard", "symlink")}
    for folder in dirs.values():
        folder.mkdir()
    inside = dirs["inside"] / "review.csv"  # the input CSV itself lives in --out-dir under an output's name
    inside.write_bytes(annotations_path(root, "test").read_bytes())
    elsewhere = tmp_path / "split.csv"
    elsewhere.write_bytes(annotations_path(root, "test").read_bytes())
    os.link(elsewhere, dirs["hard"] / "per_emotion.csv")
    (dirs["symlink"] / "review.csv").symlink_to(elsewhere)
    cases = [
        (inside, "inside", "review.csv"),
        (elsewhere, "hard", "per_emotion.csv"),
        (elsewhere, "symlink", "review.csv"),
    ]
    for csv_path, folder, output in cases:
        before = csv_path.read_bytes()
        with pytest.raises(ValueError, match=f"{output} must differ from the input test_csv_path {csv_path}"):
            review_predictions_with_visualization(
                checkpoint, csv_path, arrays_dir(root), dirs[folder], num_samples=2, detailed_samples=0, progress=False
            )
        assert csv_path.read_bytes() == before
    assert sorted(p.name for p in dirs["inside"].iterdir()) == ["review.csv"]  # nothing else written either


def test_evaluate_refuses_to_overwrite_its_inputs(tiny_checkpoint, tmp_path):
    from emonet.reports.evaluation import evaluate_checkpoint

    root, checkpoint = tiny_checkpoint["root"], tiny_checkpoint["checkpoint"]
    out_dir = tmp_path / "eval"
    out_dir.mkdir()
    inside = out_dir / "per_emotion.csv"
    inside.write_bytes(annotations_path(root, "test").read_bytes())
    elsewhere = tmp_path / "split.csv"
    elsewhere.write_bytes(annotations_path(root, "test").read_bytes())
    linked_dir = tmp_path / "eval_links"
    linked_dir.mkdir()
    (linked_dir / "per_emotion.csv").symlink_to(elsewhere)
    hard_dir = tmp_path / "eval_hard"
    hard_dir.mkdir()
    os.link(elsewhere, hard_dir / "per_emotion.csv")
    for csv_path, target_dir in ((inside, out_dir), (elsewhere, linked_dir), (elsewhere, hard_dir)):
        before = csv_path.read_bytes()
        with pytest.raises(ValueError, match="per_emotion.csv must differ from the input annotations"):
            evaluate_checkpoint(checkpoint, csv_path, arrays_dir(root), target_dir, progress=False)
        assert csv_path.read_bytes() == before
    normalization = out_dir / "metrics.json"
    normalization.write_text("{}")
    with pytest.raises(ValueError, match="metrics.json must differ from the input normalizer"):
        evaluate_checkpoint(checkpoint, elsewhere, arrays_dir(root), out_dir, normalizer=normalization)


def test_normalize_refuses_outputs_that_alias_its_inputs(fake_archive, tmp_path):
    from emonet.data.normalize import normalize_dataset

    source = annotations_path(fake_archive, "val")
    out_dir = tmp_path / "norm"
    out_dir.mkdir()
    (out_dir / "normalized_dataset_val.csv").symlink_to(source)
    before = source.read_bytes()
    with pytest.raises(ValueError, match="normalized_dataset_val.csv must differ from the input val annotations"):
        normalize_dataset(source.parent, out_dir)
    assert source.read_bytes() == before


# --------------------------------------------------------------------------- writability


def test_ensure_writable_dir_creates_and_checks(tmp_path):
    assert ensure_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())  # the probe is gone
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="the output folder is a file") as info:
        ensure_writable_dir(a_file)
    assert info.value.filename == str(a_file)
    with pytest.raises(NotADirectoryError, match="cannot create the output folder") as info:
        ensure_writable_dir(a_file / "sub")
    assert info.value.filename == str(a_file / "sub")


def test_ensure_writable_dir_reports_a_folder_it_cannot_write(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(emonet_io.tempfile, "TemporaryFile", read_only)
    with pytest.raises(PermissionError, match="cannot write in the output folder: Permission denied") as info:
        ensure_writable_dir(tmp_path)
    assert info.value.filename == str(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_ensure_writable_dir_on_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="cannot write in the output folder"):
            ensure_writable_dir(folder)
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------- CSV reading


def test_read_csv_names_a_file_that_is_not_a_csv(tmp_path):
    binary = tmp_path / "image.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=f"{binary}: not a CSV file: a NUL byte at offset 0"):
        read_csv(binary)
    late = tmp_path / "late.csv"
    late.write_bytes(b"a,b\n" + b"1,2\n" * 5000 + b"\x89\xff,3\n")  # fails in a later chunk
    with pytest.raises(ValueError, match=f"{late}: not a CSV file"):
        for _ in read_csv(late, chunksize=100):
            pass
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b\n1,2\n1,2,3,4\n")
    with pytest.raises(ValueError, match=f"{ragged}: not a CSV file: Error tokenizing"):
        read_csv(ragged)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(pd.errors.EmptyDataError):  # left to the caller's own message
        read_csv(tmp_path / "empty.csv")
    good = tmp_path / "good.csv"
    good.write_text("a,b\n1,007\n")
    assert read_csv(good, dtype={"b": str}).to_dict("records") == [{"a": 1, "b": "007"}]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'a,b\n1,"x\x00"\n', r"not a CSV file: a NUL byte at offset 8"),
        (b"a,b\n1,3E2147483648\n", r"not a valid CSV number: '3E2147483648'"),
        (b'a,b\n1,"3.e4114422366x7"\n', r"not a valid CSV number: '3.e4114422366"),
    ],
    ids=["nul-byte", "exponent-overflow", "exponent-overflow-prefix"],
)
def test_read_csv_refuses_what_crashes_pandas(tmp_path, content, message):
    # Each of these crashed the process (a segmentation fault in pandas' C parser).
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        read_csv(path)
    # Ordinary exponents, and names that merely contain digits after an e, still read.
    path.write_bytes(b"name,x\nphoto_1e1234567890.jpg,1e5\n")
    assert read_csv(path)["x"].tolist() == [100000.0]
