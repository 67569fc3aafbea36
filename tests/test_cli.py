"""The `emonet` command line: the data commands end to end, and errors as one line."""

from __future__ import annotations

import pandas as pd

from emonet.cli import main
from emonet.schema import ANNOTATIONS_DIRNAME, FACE_VISIBILITY_COLUMN, annotations_path, arrays_dir


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
    code = main(["normalize", "--annotations-dir", str(fake_archive / ANNOTATIONS_DIRNAME), "--out-dir", str(tmp_path),
                 "--min-visibility", "20"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("emonet normalize: error:") and "Face_Visibility" in err
    assert "Traceback" not in err
