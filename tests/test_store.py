"""The store check runs wherever a store is opened: an empty or foreign SQLite file named
by MLFLOW_TRACKING_URI is refused with one line naming it, and never written to."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from emonet.cli import main
from emonet.schema import annotations_path, arrays_dir
from emonet.utils.store import check_store
from emonet.utils.store import main as store_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["empty", "text"])
def bad_store(request, tmp_path) -> tuple[Path, str]:
    """A file that is not an MLflow store, and the words its error must contain."""
    path = tmp_path / "mlflow.db"
    if request.param == "empty":
        path.touch()
        return path, "is empty (0 bytes)"
    path.write_text("these are my notes, not a database\n")
    return path, "is not a SQLite database"


def _unchanged(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before, "the store file was written to"


@pytest.mark.parametrize("command", ["predict", "review", "benchmark"])
def test_commands_loading_a_registered_model_refuse_a_bad_store(
    command, bad_store, fake_archive, tmp_path, monkeypatch, capsys
):
    path, words = bad_store
    before = path.read_bytes()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    csv, img_dir = str(annotations_path(fake_archive, "test")), str(arrays_dir(fake_archive))
    args = {
        "predict": ["--input", csv, "--img-dir", img_dir, "--out", str(tmp_path / "p.csv")],
        "review": ["--annotations", csv, "--img-dir", img_dir, "--out-dir", str(tmp_path / "review")],
        "benchmark": ["--annotations", csv, "--img-dir", img_dir, "--out-dir", str(tmp_path / "bench")],
    }[command]
    assert main([command, "--model", "models:/emonet/1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and words in err[0], err
    _unchanged(path, before)


def test_make_serve_refuses_a_bad_store(bad_store):
    path, words = bad_store
    before = path.read_bytes()
    result = subprocess.run(
        ["make", "-o", ".venv/.installed-stamp", "serve", "PORT=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{path}"},
        timeout=120,
    )
    assert result.returncode != 0
    assert f"emonet: error: MLflow store {path}" in result.stderr and words in result.stderr
    assert "Traceback" not in result.stderr
    _unchanged(path, before)


def test_check_store_from_the_shell(bad_store, tmp_path, capsys):
    path, words = bad_store
    assert store_main([f"sqlite:///{path}"]) == 2
    assert words in capsys.readouterr().err
    # A store that does not exist yet is fine (MLflow creates it), and so is a server.
    check_store(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    check_store("http://127.0.0.1:5000")
    assert not (tmp_path / "new").exists()
