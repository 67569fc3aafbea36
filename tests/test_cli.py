"""The `emonet` command line: the data commands end to end, and errors as one line."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from emonet.cli import main
from emonet.schema import ANNOTATIONS_DIRNAME, EMOTIONS, FACE_VISIBILITY_COLUMN, annotations_path, arrays_dir


def test_make_demo_data_visibility_and_normalize(tmp_path, capsys):
    root = tmp_path / "demo"
    assert main(["make-demo-data", str(root), "--n-train", "6", "--n-val", "4", "--n-test", "4", "--size", "48"]) == 0
    vis = tmp_path / "vis"
    for split in ("train", "val", "test"):
        args = ["visibility", "--annotations", str(annotations_path(root, split)), "--img-dir", str(arrays_dir(root))]
        args += ["--out", str(vis / annotations_path(root, split).name), "--workers", "1"]
        if split == "val":
            args += ["--plot", str(vis / "hist.png")]
        assert main(args) == 0
    assert (vis / "hist.png").is_file()
    assert FACE_VISIBILITY_COLUMN in pd.read_csv(vis / "annot_arrs_test.csv").columns
    out = tmp_path / "norm"
    assert main(["normalize", "--annotations-dir", str(vis), "--out-dir", str(out), "--fit-on-train"]) == 0
    assert "Valence_norm" in pd.read_csv(out / "normalized_dataset_val.csv").columns
    assert "fit_on_train" in capsys.readouterr().out


def test_user_errors_are_one_line_with_exit_code_2(fake_archive, tmp_path, capsys):
    code = main(
        [
            "normalize",
            "--annotations-dir",
            str(fake_archive / ANNOTATIONS_DIRNAME),
            "--out-dir",
            str(tmp_path),
            "--min-visibility",
            "20",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("emonet normalize: error:") and "Face_Visibility" in err
    assert "Traceback" not in err


def _one_line_error(capsys, command: str) -> str:
    """The error line, checked to be the only one (a progress bar may come before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("emonet ")]
    assert len(errors) == 1 and errors[0].startswith(f"emonet {command}: error: ") and err.endswith(errors[0] + "\n")
    return errors[0] + "\n"


def test_output_folder_under_a_file_fails_in_one_line(fake_archive, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code = main(
        ["normalize", "--annotations-dir", str(fake_archive / ANNOTATIONS_DIRNAME), "--out-dir", str(a_file / "out")]
    )
    assert code == 1
    assert f"{a_file / 'out'}: cannot create the output folder: Not a directory" in _one_line_error(capsys, "normalize")


def test_unwritable_output_is_found_before_the_work(fake_archive, tmp_path, capsys, monkeypatch):
    import emonet.data.visibility_column
    import emonet.reports.evaluation
    import emonet.utils.io

    # The work itself (scoring crops, loading the model) must not start.
    calls = []
    monkeypatch.setattr(emonet.data.visibility_column, "score_crops", lambda *args, **kwargs: calls.append(args))
    monkeypatch.setattr(emonet.reports.evaluation, "load_checkpoint", lambda *args, **kwargs: calls.append(args))
    csv_path = annotations_path(fake_archive, "test")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code = main(
        [
            "visibility",
            "--annotations",
            str(csv_path),
            "--img-dir",
            str(arrays_dir(fake_archive)),
            "--out",
            str(tmp_path / "ok.csv"),
            "--plot",
            str(a_file / "hist.png"),
        ]
    )
    assert code == 1 and f"{a_file}: the output folder is a file" in _one_line_error(capsys, "visibility")

    # As root, a read-only folder is still writable, so the refusal is simulated.
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(emonet.utils.io.tempfile, "TemporaryFile", read_only)
    out_dir = tmp_path / "read_only"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "best.pt"),
            "--annotations",
            str(csv_path),
            "--img-dir",
            str(arrays_dir(fake_archive)),
            "--out-dir",
            str(out_dir),
        ]
    )
    assert code == 1
    assert f"{out_dir}: cannot write in the output folder: Permission denied" in _one_line_error(capsys, "evaluate")
    assert calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_in_one_line(fake_archive, tmp_path, capsys):
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    try:
        code = main(
            ["normalize", "--annotations-dir", str(fake_archive / ANNOTATIONS_DIRNAME), "--out-dir", str(out_dir)]
        )
    finally:
        out_dir.chmod(0o755)
    assert code == 1 and "cannot write in the output folder" in _one_line_error(capsys, "normalize")


def test_os_errors_during_the_work_are_one_line_naming_the_path(fake_archive, tmp_path, capsys, monkeypatch):
    import emonet.data.normalize

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.csv"))

    monkeypatch.setattr(emonet.data.normalize, "normalize_dataset", refused)
    code = main(
        ["normalize", "--annotations-dir", str(fake_archive / ANNOTATIONS_DIRNAME), "--out-dir", str(tmp_path / "out")]
    )
    assert code == 1
    assert _one_line_error(capsys, "normalize") == f"emonet normalize: error: {tmp_path / 'x.csv'}: Permission denied\n"


def test_binary_csv_is_named(fake_archive, tmp_path, capsys):
    binary = annotations_path(fake_archive, "train")
    binary.write_bytes(bytes(range(256)) * 8)
    code = main(
        ["normalize", "--annotations-dir", str(fake_archive / ANNOTATIONS_DIRNAME), "--out-dir", str(tmp_path / "out")]
    )
    assert code == 2 and f"{binary}: not a CSV file: a NUL byte at offset 0" in _one_line_error(capsys, "normalize")


def test_predict_max_pixels_skips_or_names_the_row(tiny_checkpoint, tmp_path, capsys):
    crop = np.zeros((40, 40, 3), dtype=np.uint8)
    np.save(tmp_path / "crop.npy", crop)
    csv_path = tmp_path / "crops.csv"
    pd.DataFrame({"image_path": ["crop.npy", "crop.npy"]}).to_csv(csv_path, index=False)
    base = ["predict", "--model", str(tiny_checkpoint["checkpoint"]), "--input", str(csv_path)]
    assert main([*base, "--out", str(tmp_path / "ok.csv"), "--max-pixels", "1600"]) == 0
    assert len(pd.read_csv(tmp_path / "ok.csv")) == 2
    code = main([*base, "--out", str(tmp_path / "raise.csv"), "--max-pixels", "1599"])
    assert code == 2 and "crops.csv: row 0: " in _one_line_error(capsys, "predict")
    assert main([*base, "--out", str(tmp_path / "skip.csv"), "--max-pixels", "1599", "--on-error", "skip"]) == 0
    skipped = pd.read_csv(tmp_path / "skip.skipped.csv")
    assert skipped["row"].tolist() == [0, 1] and skipped["reason"].str.contains("over the limit of 1,599").all()


def test_benchmark_writes_the_table(demo_checkpoint, tmp_path, capsys):
    root, checkpoint = demo_checkpoint
    out = tmp_path / "bench"
    args = [
        "benchmark",
        "--model",
        str(checkpoint),
        "--annotations",
        str(annotations_path(root, "test")),
        "--img-dir",
        str(arrays_dir(root)),
        "--out-dir",
        str(out),
        "--n-resamples",
        "50",
        "--seed",
        "1",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mAP_voc11" in printed and "benchmark.md" in printed
    table = pd.read_csv(out / "benchmark.csv")
    assert table[(table.section == "emotion") & (table.metric == "support")].name.tolist() == list(EMOTIONS)
    assert "50 resamples, seed 1" in (out / "benchmark.md").read_text(encoding="utf-8")


def test_benchmark_errors_are_one_line(fake_archive, tmp_path, capsys):
    base = [
        "benchmark",
        "--model",
        str(tmp_path / "missing.pt"),
        "--img-dir",
        str(arrays_dir(fake_archive)),
        "--out-dir",
        str(tmp_path / "out"),
    ]
    assert main([*base, "--annotations", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emonet benchmark: error: annotation CSV not found") and "Traceback" not in err
    test_csv = str(annotations_path(fake_archive, "test"))
    assert main([*base, "--annotations", test_csv, "--confidence", "1.5"]) == 2
    assert "confidence must lie strictly between 0 and 1, got 1.5" in capsys.readouterr().err  # before the model
    assert main([*base, "--annotations", test_csv]) == 2
    assert "missing.pt" in capsys.readouterr().err
