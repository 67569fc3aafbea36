"""Findings of the fault-finding issue: duplicate annotation rows, registered model URIs
that do not resolve, and loading a registered model from a read-only store."""

from __future__ import annotations

import builtins
import errno
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import restored_mlflow_uris

from emonet.data.annotations import load_annotations
from emonet.schema import SPLITS, annotations_path, arrays_dir

REPO = Path(__file__).resolve().parents[1]
EMONET = Path(sys.executable).with_name("emonet")


def _rewrite(csv_path: Path, mutate) -> None:
    df = pd.read_csv(csv_path)
    mutate(df).to_csv(csv_path, index=False)


def _repeat_row(df: pd.DataFrame, row: int, **changes) -> pd.DataFrame:
    """``df`` with a copy of ``row`` appended (as the last data row), ``changes`` applied to it."""
    copy = df.iloc[[row]].copy()
    for column, value in changes.items():
        copy[column] = value
    return pd.concat([df, copy], ignore_index=True)


# --------------------------------------------------------------------------- A: duplicate rows


def test_same_crop_with_opposite_labels_is_refused_naming_the_rows(fake_archive):
    csv_path = annotations_path(fake_archive, "train")
    original = pd.read_csv(csv_path)
    flipped = 1.0 - original.loc[2, "Fear"]
    _rewrite(csv_path, lambda df: _repeat_row(df, 2, Fear=flipped))
    with pytest.raises(ValueError) as info:
        load_annotations(csv_path)
    message = str(info.value)
    assert message.startswith("annot_arrs_train.csv: ")
    assert "Crop_name='crop_arr_train_2.npy'" in message and "rows 2, 6" in message and "0-based" in message
    assert "differ in Fear" in message and "duplicates='warn'" in message
    assert "\n" not in message


def test_same_person_box_with_other_affect_is_refused(fake_archive):
    # A second crop of the same person (same image, same body box), annotated apart.
    csv_path = annotations_path(fake_archive, "val")
    _rewrite(csv_path, lambda df: _repeat_row(df, 3, Crop_name="crop_arr_val_6.npy", Valence=9.5))
    with pytest.raises(ValueError, match=r"rows 3, 6 \(Arr_name='img_arr_\d+\.npy', X_min=50\.0.*differ in Valence"):
        load_annotations(csv_path)


def test_identical_duplicates_are_loaded_counted_and_logged(fake_archive, caplog):
    csv_path = annotations_path(fake_archive, "train")
    _rewrite(csv_path, lambda df: _repeat_row(_repeat_row(df, 1), 4, Crop_name="crop_arr_train_7.npy"))
    with caplog.at_level(logging.WARNING, logger="emonet.data.annotations"):
        df = load_annotations(csv_path)
    assert len(df) == 8, "duplicate rows are reported, never dropped"
    assert df.attrs["duplicate_rows"] == 2 and df.attrs["contradictory_duplicate_rows"] == 0
    assert [g["rows"] for g in df.attrs["duplicates"]] == [[1, 6], [4, 7]]
    assert [g["key"][0] for g in df.attrs["duplicates"]] == ["Crop_name", "Arr_name"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 rows repeat the crop or person box and the labels" in warnings[0].getMessage()
    assert "rows 1, 6" in warnings[0].getMessage() and "rows 4, 7" in warnings[0].getMessage()


def test_the_duplicates_switch_warns_or_allows_as_before(fake_archive, caplog):
    csv_path = annotations_path(fake_archive, "test")
    _rewrite(csv_path, lambda df: _repeat_row(df, 0, Peace=1.0 - df.loc[0, "Peace"], Arousal=1.0))
    with caplog.at_level(logging.WARNING, logger="emonet.data.annotations"):
        warned = load_annotations(csv_path, duplicates="warn")
    assert len(warned) == 7 and warned.attrs["contradictory_duplicate_rows"] == 1
    assert "different labels, kept" in caplog.text and "differ in Arousal, Peace" not in caplog.text
    assert "differ in Peace, Arousal" in caplog.text  # the CSV's column order
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emonet.data.annotations"):
        allowed = load_annotations(csv_path, duplicates="allow")
    assert len(allowed) == 7 and not caplog.records, "allow keeps the old, silent behaviour"
    assert allowed.attrs["duplicate_rows"] == 1, "still counted in attrs"
    with pytest.raises(ValueError, match=r"duplicates must be one of \['refuse', 'warn', 'allow'\], got 'drop'"):
        load_annotations(csv_path, duplicates="drop")


def test_duplicate_row_numbers_are_the_csvs_even_when_rows_are_dropped(fake_archive):
    csv_path = annotations_path(fake_archive, "train")

    def mutate(df):
        df.loc[0, "Valence"] = 42.0  # dropped with invalid_affect="drop"
        return _repeat_row(df, 5, Fear=1.0 - df.loc[5, "Fear"])

    _rewrite(csv_path, mutate)
    with pytest.raises(ValueError, match=r"rows 5, 6 "):
        load_annotations(csv_path, invalid_affect="drop")


def test_persons_sharing_an_image_are_not_duplicates(fake_archive):
    from emonet.data.annotations import find_duplicates

    # The fixture puts two persons (two boxes) in every image; a missing box matches nothing.
    csv_path = annotations_path(fake_archive, "train")
    df = load_annotations(csv_path)
    assert df["Arr_name"].duplicated().any()
    assert df.attrs["duplicate_rows"] == 0 and df.attrs["duplicates"] == []
    twin = _repeat_row(df, 2, Crop_name="crop_arr_train_6.npy", X_min=float("nan"), Fear=0.5)
    assert find_duplicates(twin) == []


def test_demo_data_and_fixtures_have_no_duplicates(tmp_path, fake_archive):
    from emonet.data.demo import make_demo_data

    root = make_demo_data(tmp_path / "demo", n_train=40, n_val=12, n_test=12, size=40)
    for archive in (root, fake_archive):
        for split in SPLITS:
            frame = load_annotations(annotations_path(archive, split))
            assert frame.attrs["duplicate_rows"] == 0, (archive, split, frame.attrs["duplicates"])


def test_cli_refuses_contradictory_duplicates_in_one_line(fake_archive, tmp_path, capsys):
    from emonet.cli import main

    csv_path = annotations_path(fake_archive, "train")
    _rewrite(csv_path, lambda df: _repeat_row(df, 2, Fear=1.0 - df.loc[2, "Fear"]))
    code = main(["normalize", "--annotations-dir", str(csv_path.parent), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("emonet normalize: error: annot_arrs_train.csv: ")
    assert "rows 2, 6" in err and "Crop_name" in err


def test_the_environment_switch_reaches_every_command(fake_archive, tmp_path, capsys, monkeypatch):
    from emonet.cli import main

    csv_path = annotations_path(fake_archive, "train")
    _rewrite(csv_path, lambda df: _repeat_row(df, 2, Fear=1.0 - df.loc[2, "Fear"]))
    args = ["normalize", "--annotations-dir", str(csv_path.parent), "--out-dir", str(tmp_path / "out")]
    monkeypatch.setenv("EMONET_DUPLICATES", "warn")
    assert main(args) == 0
    monkeypatch.setenv("EMONET_DUPLICATES", "sometimes")
    capsys.readouterr()
    assert main(args) == 2
    assert "EMONET_DUPLICATES must be one of" in capsys.readouterr().err


# --------------------------------------------------------------------------- B: registry URIs


@pytest.fixture(scope="module")
def registry_store(tmp_path_factory):
    """A SQLite store with ``emonet-faults`` (versions 1 and 2, alias ``champion`` -> 2) and
    ``emonet-empty`` (no versions); created once, as the tests only read it."""
    import mlflow

    base = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with restored_mlflow_uris():
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        client.create_registered_model("emonet-faults")
        client.create_registered_model("emonet-empty")
        source = base / "not-a-model"
        source.mkdir()
        for _ in range(2):
            client.create_model_version("emonet-faults", str(source))
        client.set_registered_model_alias("emonet-faults", "champion", "2")
    return uri


@pytest.fixture
def registry(registry_store, monkeypatch):
    """``registry_store`` named by ``MLFLOW_TRACKING_URI``, as a user would name it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_store)
    return registry_store


def _predict(fake_archive: Path, tmp_path: Path, model: str, capsys, command: str = "predict") -> tuple[int, str]:
    from emonet.cli import main

    csv_path, img_dir = annotations_path(fake_archive, "test"), arrays_dir(fake_archive)
    if command == "predict":
        argv = ["predict", "--model", model, "--input", str(csv_path), "--img-dir", str(img_dir)]
        argv += ["--out", str(tmp_path / "predictions.csv")]
    else:
        argv = [command, "--model", model, "--annotations", str(csv_path), "--img-dir", str(img_dir)]
        argv += ["--out-dir", str(tmp_path / "review")]
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            "models:/no-such-model@champion",
            "no registered model named 'no-such-model' in sqlite:///",
        ),
        ("models:/no-such-model/1", "registered models: 'emonet-empty', 'emonet-faults'"),
        ("models:/emonet-faults/7", "registered model 'emonet-faults' has no version 7; its versions: 2, 1;"),
        ("models:/emonet-faults@best", "has no alias 'best'; its versions: 2, 1; its aliases: champion -> 2"),
        (
            "models:/emonet-faults/champion",
            "no version in stage 'champion' (an alias is written emonet-faults@champion)",
        ),
        ("models:/emonet-empty/latest", "registered model 'emonet-empty' has no versions; its versions: none"),
    ],
)
def test_predict_with_a_model_uri_that_does_not_resolve_is_one_line(
    registry, fake_archive, tmp_path, capsys, model, expected
):
    code, err = _predict(fake_archive, tmp_path, model, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"emonet predict: error: {model}: ") and expected in err, err


def test_review_with_a_missing_alias_is_one_line(registry, fake_archive, tmp_path, capsys):
    code, err = _predict(fake_archive, tmp_path, "models:/emonet-faults@best", capsys, command="review")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("emonet review: error: models:/emonet-faults@best: ") and "champion -> 2" in err


@pytest.mark.slow
def test_the_installed_command_prints_one_line_for_a_missing_model(registry, fake_archive, tmp_path):
    if not EMONET.is_file():
        pytest.skip(f"no {EMONET}")
    argv = [str(EMONET), "predict", "--model", "models:/no-such-model@champion"]
    argv += ["--input", str(annotations_path(fake_archive, "test")), "--img-dir", str(arrays_dir(fake_archive))]
    argv += ["--out", str(tmp_path / "predictions.csv")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, wherever the venv points
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "no registered model named 'no-such-model'" in done.stderr and "'emonet-faults'" in done.stderr


# --------------------------------------------------------------------------- C: read-only stores


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` but the SQLite database: size and mtime (ns)."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith("mlflow.db")
    }


@pytest.fixture
def logged_model_with_root(logged_model, tiny_checkpoint):
    """``logged_model`` and the fake archive its checkpoint was trained on."""
    return {**logged_model, "root": tiny_checkpoint["root"]}


@pytest.fixture
def no_writes_under(monkeypatch):
    """Make opening a file for writing under a folder fail as on a read-only mount (root
    ignores file modes, so chmod alone proves nothing in the tests)."""

    def guard(folder: Path) -> list[str]:
        attempts: list[str] = []
        root = str(folder.resolve())
        real_open, real_os_open = builtins.open, os.open

        def inside(path) -> bool:
            try:
                return os.path.realpath(os.fspath(path)).startswith(root + os.sep)
            except TypeError:  # a file descriptor
                return False

        def refuse(path):
            attempts.append(str(path))
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        def guarded_open(file, mode="r", *args, **kwargs):
            if inside(file) and any(flag in mode for flag in "wax+"):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def guarded_os_open(path, flags, *args, **kwargs):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
                refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(os, "open", guarded_os_open)
        return attempts

    return guard


def test_loading_a_registered_model_never_writes_into_the_store(mlflow_store, logged_model_with_root, no_writes_under):
    from emonet.inference.csv_scoring import predict_csv
    from emonet.inference.loading import load_predictor
    from emonet.inference.predictor import Predictor
    from emonet.utils.io import read_csv

    base = mlflow_store["base"]
    uri = f"models:/emonet/{logged_model_with_root['version'].version}"
    before = _snapshot(base)
    assert any(name.endswith("MLmodel") for name in before), "the store holds the model's artifacts"
    attempts = no_writes_under(base / "artifacts")
    for path in base.joinpath("artifacts").rglob("*"):  # what a non-root user would meet
        path.chmod(path.stat().st_mode & 0o555)
    try:
        predictor = load_predictor(uri, device="cpu")
        assert isinstance(predictor, Predictor)
        root = logged_model_with_root["root"]
        out = base.parent / f"{base.name}-predictions.csv"
        summary = predict_csv(uri, annotations_path(root, "test"), out, img_dir=arrays_dir(root), progress=False)
    finally:
        for path in base.joinpath("artifacts").rglob("*"):
            path.chmod(path.stat().st_mode | 0o200)
    assert attempts == [], "nothing was opened for writing in the artifact folders"
    assert _snapshot(base) == before, "no file added, removed or rewritten in the store"
    assert summary["rows_written"] == 6 and len(read_csv(out)) == 6
    assert not [entry for entry in sys.path if "emonet-model-" in entry], "the temporary copy left sys.path"


def _can_bind_read_only(tmp_path: Path) -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    script = f"mount --bind -o ro {probe} {probe} && ! touch {probe}/x 2>/dev/null"
    for argv in ([unshare, "-m", "sh", "-c", script], [unshare, "-rm", "sh", "-c", script]):
        if subprocess.run(argv, capture_output=True, timeout=30).returncode == 0:
            return True
    return False


@pytest.mark.slow
def test_predict_from_a_read_only_mounted_store(mlflow_store, logged_model_with_root, tmp_path):
    """The real case: the artifact folder bind-mounted read-only (a shared store, an image)."""
    if not EMONET.is_file() or not _can_bind_read_only(tmp_path):
        pytest.skip("needs unshare and mount --bind (a mount namespace)")
    base = mlflow_store["base"]
    artifacts = base / "artifacts"
    root = logged_model_with_root["root"]
    uri = f"models:/emonet/{logged_model_with_root['version'].version}"
    out = tmp_path / "predictions.csv"
    predict = [str(EMONET), "predict", "--model", uri, "--input", str(annotations_path(root, "test"))]
    predict += ["--img-dir", str(arrays_dir(root)), "--out", str(out)]
    script = f'mount --bind -o ro "{artifacts}" "{artifacts}" && exec "$@"'
    before = _snapshot(base)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store["uri"], "PYTHONPATH": str(REPO)}
    done = None
    for flags in ("-m", "-rm"):
        done = subprocess.run(
            ["unshare", flags, "sh", "-c", script, "sh", *predict], capture_output=True, text=True, timeout=300, env=env
        )
        if "mount:" not in done.stderr:
            break
    assert done is not None and done.returncode == 0, done.stderr[-3000:]
    assert "Read-only file system" not in done.stderr
    assert len(pd.read_csv(out)) == 6
    assert _snapshot(base) == before


def test_the_batch_flow_refuses_a_model_uri_that_does_not_resolve_in_one_line(registry, fake_archive, tmp_path, capsys):
    from flows.batch_predict import main

    out = tmp_path / "predictions.csv"
    argv = [str(annotations_path(fake_archive, "test")), str(out), "--img-dir", str(arrays_dir(fake_archive))]
    code = main([*argv, "--model-uri", "models:/emonet-faults@best"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("emonet-batch-predict: error: models:/emonet-faults@best: ") and "champion -> 2" in err
    assert not out.exists()


# --------------------------------------------------------------------------- D: a bad cached result


def _cache_entries_since(storage: Path, since: float) -> dict[str, object]:
    """The results Prefect persisted under ``storage`` since ``since`` (time.time()): file name -> value."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    store = ResultStore(result_storage=LocalFileSystem(basepath=str(storage)))
    return {
        path.name: store.read(path.name).result
        for path in sorted(storage.iterdir())
        if path.is_file() and path.stat().st_mtime >= since
    }


def _write_cache_entry(storage: Path, key: str, value: object) -> None:
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    ResultStore(result_storage=LocalFileSystem(basepath=str(storage))).write(value, key=key)


def test_a_cached_result_that_fails_its_check_is_recomputed_named_and_replaced(prefect_env, fake_archive, tmp_path):
    import time

    from flows.training_pipeline import prepare_data

    storage = prefect_env["base"] / "prefect-results"
    params = {"data_root": fake_archive, "out_dir": tmp_path / "out", "visibility_shard_size": 4}
    since = time.time() - 1
    first = prepare_data(**params, visibility_workers=1)
    entries = _cache_entries_since(storage, since)
    shards = {key: value for key, value in entries.items() if isinstance(value, list)}
    (normalized,) = [key for key, value in entries.items() if isinstance(value, tuple)]
    assert sorted(len(value) for value in shards.values()) == [2, 2, 2, 4, 4, 4]
    shard = next(key for key, value in shards.items() if len(value) == 4)
    # Readable, but wrong: one score for four rows, and frames for one split of three.
    _write_cache_entry(storage, shard, [50.0])
    _write_cache_entry(storage, normalized, ({"train": first.frames["train"]}, None, {}))

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    prefect_logger = logging.getLogger("prefect")
    prefect_logger.addHandler(handler)
    try:
        second = prepare_data(**params, visibility_workers=1)
    finally:
        prefect_logger.removeHandler(handler)

    said = "\n".join(message for message in warnings if "cached result" in message)
    assert f"{storage / shard} is not valid (1 face-visibility scores for the 4 rows [0, 4))" in said, said
    assert f"{storage / normalized} is not valid (frames for ['train'], not for the splits" in said, said
    assert said.count("recomputing it and replacing the entry") == 2
    for split in SPLITS:
        pd.testing.assert_frame_equal(second.frames[split], first.frames[split])
    replaced = _cache_entries_since(storage, 0)
    assert replaced[shard] == shards[shard] and isinstance(replaced[normalized], tuple)


def test_a_result_that_fails_its_check_and_was_not_cached_raises(prefect_env):
    from prefect import flow, task

    from tasks.caching import checked_result

    @task
    def short() -> list[float]:
        return [1.0]

    @flow
    def uses_short() -> list[float]:
        return checked_result(short.submit(), lambda value: "too short" if len(value) < 2 else None, short)

    with pytest.raises(ValueError, match="task short returned a result that is not valid: too short"):
        uses_short()


# --------------------------------------------------------------------------- E: writability first


def test_the_flow_stops_before_any_work_where_it_cannot_write(prefect_env, fake_archive, tmp_path, no_writes_under):
    from flows.training_pipeline import emonet_training_pipeline

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    no_writes_under(read_only)
    started = time.monotonic()
    with pytest.raises(OSError, match="cannot write in the output folder: Read-only file system") as error:
        emonet_training_pipeline(data_root=fake_archive, out_dir=read_only / "out", epochs=1)
    assert error.value.filename == str(read_only / "out")
    store = f"sqlite:///{read_only / 'mlruns' / 'mlflow.db'}"
    with pytest.raises(OSError, match="Read-only file system") as error:
        emonet_training_pipeline(data_root=fake_archive, out_dir=tmp_path / "out", epochs=1, tracking_uri=store)
    assert error.value.filename == str(read_only / "mlruns")
    assert not (tmp_path / "out" / "visibility").exists()  # nothing was scored
    print(f"refused in {time.monotonic() - started:.1f} s")


def test_the_flow_command_refuses_a_read_only_out_dir_in_one_line(tmp_path, no_writes_under, capsys):
    from flows.training_pipeline import main

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    no_writes_under(read_only)
    assert main(["--out-dir", str(read_only / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("emonet-training-pipeline: error: ") and str(read_only / "out") in err


# --------------------------------------------------------------------------- F: the main guard

UNGUARDED_SCORING = """\
import sys
from emonet.data.face_visibility import score_crops
from emonet.schema import SPLITS

def score():
    return score_crops(sys.argv[1], sys.argv[2:], workers=2, progress=False)

{call}
"""


@pytest.mark.parametrize(
    ("call", "refused_line"),
    [
        ("score()", 8),
        ("if True:\n    score()", 9),
        ('if __name__ == "__main__":\n    print(len(score()))', None),
        ('if "__main__" == __name__:\n    print(len(score()))', None),
    ],
    ids=["unguarded", "another-if", "guarded", "guarded-reversed"],
)
def test_a_script_without_the_main_guard_is_stopped_before_any_worker_starts(
    fake_archive, tmp_path, call, refused_line
):
    script = tmp_path / "score_script.py"
    script.write_text(UNGUARDED_SCORING.format(call=call))
    names = pd.read_csv(annotations_path(fake_archive, "val"))["Crop_name"].tolist()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(script), str(arrays_dir(fake_archive)), *names],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    if refused_line is None:
        assert done.returncode == 0 and done.stdout.strip() == str(len(names)), done.stderr[-3000:]
        return
    assert done.returncode == 1
    refusal = f"MissingMainGuardError: {script}, line {refused_line}, runs face visibility on a process pool"
    assert refusal in done.stderr, done.stderr[-3000:]
    assert 'outside an `if __name__ == "__main__":` block' in done.stderr
    assert "worker process died" not in done.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_home")  # tmp_path / "prefect", migrated
def test_a_script_that_runs_the_flow_without_the_main_guard_is_stopped_at_once(fake_archive, tmp_path):
    import psutil

    script = tmp_path / "train_script.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom flows.training_pipeline import emonet_training_pipeline\n"
        "emonet_training_pipeline(data_root=Path(sys.argv[1]), out_dir=Path(sys.argv[2]), epochs=1)\n"
    )
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "EMONET_TEST_RUN": "main-guard",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script), str(fake_archive), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"{script}, line 4, runs the training flow when the script is imported" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out" / "visibility").exists()

    def left() -> list[list[str]]:
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get("EMONET_TEST_RUN") == "main-guard":
                    found.append(process.cmdline())
            except psutil.Error:
                continue
        return found

    deadline = time.monotonic() + 20  # the watchdog exits just after the script
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left(), left()
