"""A malformed crop (a ``.npy`` header a fuzzer found) is a named, per-row error in every
command that reads crops: visibility scores it NaN, ``predict --on-error skip`` lists it,
training and evaluation stop with one line naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from emonet.cli import main
from emonet.schema import FACE_VISIBILITY_COLUMN, annotations_path, arrays_dir

# A crop whose header says its height is True: NumPy's own loader raised TypeError here.
BOOLEAN_SHAPE_HEADER = "{'descr': '|u1', 'fortran_order': False, 'shape': (True, 64, 3), }"


def _break_crop(img_dir: Path, name: str) -> None:
    text = (BOOLEAN_SHAPE_HEADER + " " * 16 + "\n").encode("latin1")
    (img_dir / name).write_bytes(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + bytes(64 * 3))


def _one_line_naming(stderr: str, name: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("emonet ")]
    assert len(lines) == 1 and name in lines[0], stderr
    assert "Traceback" not in stderr


def test_visibility_scores_a_malformed_crop_nan_and_goes_on(fake_archive, tmp_path, caplog):
    csv_path = annotations_path(fake_archive, "val")
    broken = pd.read_csv(csv_path)["Crop_name"][2]
    _break_crop(arrays_dir(fake_archive), broken)
    out = tmp_path / "val_visibility.csv"
    code = main(
        [
            "visibility",
            "--annotations",
            str(csv_path),
            "--img-dir",
            str(arrays_dir(fake_archive)),
            "--out",
            str(out),
            "--workers",
            "1",
        ]
    )
    assert code == 0
    scores = pd.read_csv(out)[FACE_VISIBILITY_COLUMN]
    assert scores.isna().tolist() == [False, False, True, False, False, False]
    assert broken in caplog.text and "expected an H x W x 3 image" in caplog.text


@pytest.fixture
def broken_archive(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the tiny archive whose third train, val and test crops are malformed."""
    root = Path(shutil.copytree(tiny_checkpoint["root"], tmp_path / "emotic"))
    for split in ("train", "val", "test"):
        _break_crop(arrays_dir(root), pd.read_csv(annotations_path(root, split))["Crop_name"][2])
    return root


def test_training_stops_with_one_line_naming_the_crop(broken_archive, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"backbone": "resnet18"},
                "train": {"image_size": 32, "epochs": 1, "batch_size": 2, "num_workers": 2, "device": "cpu"},
            }
        )
    )
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--train-csv",
            str(annotations_path(broken_archive, "train")),
            "--val-csv",
            str(annotations_path(broken_archive, "val")),
            "--img-dir",
            str(arrays_dir(broken_archive)),
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
        ]
    )
    assert code == 2
    _one_line_naming(capsys.readouterr().err, "crop_arr_train_2.npy")


def test_evaluation_stops_with_one_line_naming_the_crop(tiny_checkpoint, broken_archive, tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(tiny_checkpoint["checkpoint"]),
            "--annotations",
            str(annotations_path(broken_archive, "test")),
            "--img-dir",
            str(arrays_dir(broken_archive)),
            "--out-dir",
            str(tmp_path / "eval"),
        ]
    )
    assert code == 2
    _one_line_naming(capsys.readouterr().err, "crop_arr_test_2.npy")


def test_predict_skip_lists_the_malformed_crop(tiny_checkpoint, broken_archive, tmp_path):
    out = tmp_path / "predictions.csv"
    code = main(
        [
            "predict",
            "--model",
            str(tiny_checkpoint["checkpoint"]),
            "--input",
            str(annotations_path(broken_archive, "test")),
            "--img-dir",
            str(arrays_dir(broken_archive)),
            "--out",
            str(out),
            "--on-error",
            "skip",
        ]
    )
    assert code == 0
    assert len(pd.read_csv(out)) == 5
    skipped = pd.read_csv(tmp_path / "predictions.skipped.csv")
    assert skipped["row"].tolist() == [2]
    assert "crop_arr_test_2.npy" in skipped.to_string()
