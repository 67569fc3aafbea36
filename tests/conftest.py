"""Shared fixtures: a handful of small arrays written in the real archive's layout."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from prefect import Flow

import emonet.training.trainer
from emonet.schema import (
    CSV_COLUMNS,
    EMOTIONS,
    annotations_path,
    arrays_dir,
    crop_name,
    image_name,
)


def write_fake_archive(root: Path, rows_per_split: int = 6, crop_size: int = 40, seed: int = 0) -> Path:
    """Write a tiny archive under ``root``: random pixels, valid labels, archive names.

    Two persons share each full image; the first row of every split has its Width and
    Height swapped, as on some rows of the real archive.
    """
    rng = np.random.default_rng(seed)
    img_dir = arrays_dir(root)
    img_dir.mkdir(parents=True, exist_ok=True)
    next_image = 0
    for split in ("train", "val", "test"):
        records = []
        for i in range(rows_per_split):
            if i % 2 == 0:
                # The full image is stored at half the original photo's size.
                width, height = 200.0, 120.0
                image = rng.integers(0, 256, size=(60, 100, 3), dtype=np.uint8)
                arr_name = image_name(next_image)
                np.save(img_dir / arr_name, image)
                next_image += 1
            crop = rng.integers(0, 256, size=(crop_size, crop_size, 3), dtype=np.uint8)
            np.save(img_dir / crop_name(split, i), crop)
            emotions = (rng.random(len(EMOTIONS)) < 0.3).astype(float)
            emotions[i % len(EMOTIONS)] = 1.0
            w, h = (height, width) if i == 0 else (width, height)
            records.append(
                {
                    "Filename": f"photo_{i}.jpg",
                    "Width": w,
                    "Height": h,
                    "Age": "Adult",
                    "Gender": "Female" if i % 2 else "Male",
                    "Valence": float(rng.uniform(1, 10)),
                    "Arousal": float(rng.uniform(1, 10)),
                    "Dominance": float(rng.uniform(1, 10)),
                    **dict(zip(EMOTIONS, emotions)),
                    "X_min": 10.0 + 40 * (i % 2),
                    "Y_min": 5.0,
                    "X_max": 90.0 + 40 * (i % 2),
                    "Y_max": 115.0,
                    "Arr_name": arr_name,
                    "Crop_name": crop_name(split, i),
                }
            )
        csv_path = annotations_path(root, split)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(records, columns=list(CSV_COLUMNS)).to_csv(csv_path, index=False)
    return root


@pytest.fixture
def fake_archive(tmp_path: Path) -> Path:
    """Root of a tiny archive (6 rows per split, 40 px random crops)."""
    return write_fake_archive(tmp_path / "emotic")


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory):
    """One Prefect test server for the whole session, with task results and the MLflow
    store (``MLFLOW_TRACKING_URI``) in temporary folders."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    base = tmp_path_factory.mktemp("prefect")
    tracking_uri = f"sqlite:///{base / 'mlruns' / 'mlflow.db'}"
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: base / "prefect-results"}):
            with prefect_test_harness(server_startup_timeout=120):
                yield {"base": base, "tracking_uri": tracking_uri}
    finally:
        if previous_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_uri


@pytest.fixture(scope="session")
def migrated_prefect_db(tmp_path_factory) -> Path:
    """A Prefect SQLite database with every migration applied, made once a session.

    A test that starts Prefect's ephemeral server in a subprocess copies it into the
    subprocess's ``PREFECT_HOME`` (:func:`prefect_home`): migrating a new database costs
    the server's start about 9 s on 2 cores, this fixture 15 s once."""
    home = tmp_path_factory.mktemp("prefect-template")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    subprocess.run(
        [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return home / "prefect.db"


def copy_prefect_db(migrated_prefect_db: Path, home: Path) -> Path:
    """``home`` (created) holding a copy of the migrated database, as a ``PREFECT_HOME``."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_prefect_db, home / "prefect.db")
    return home


@pytest.fixture
def prefect_home(tmp_path: Path, migrated_prefect_db: Path) -> Path:
    """``tmp_path / "prefect"`` with a migrated Prefect database, for a subprocess's ``PREFECT_HOME``."""
    return copy_prefect_db(migrated_prefect_db, tmp_path / "prefect")


def train_tiny_checkpoint(root: Path, out_dir: Path, batch_size: int = 4, augment: bool = True) -> Path:
    """best.pt of ResNet-18 trained one epoch at 32 px on the archive at ``root``."""
    from emonet.config import load_config
    from emonet.models.network import build_model
    from emonet.training.run_loaders import make_loaders
    from emonet.training.trainer import fit

    config = load_config(
        model={"backbone": "resnet18"},
        train={
            "image_size": 32,
            "epochs": 1,
            "batch_size": batch_size,
            "num_workers": 0,
            "device": "cpu",
            "augment": augment,
        },
    )
    train_loader, val_loader = make_loaders(
        annotations_path(root, "train"), annotations_path(root, "val"), arrays_dir(root), config
    )
    result = fit(build_model(config.model), train_loader, val_loader, config, checkpoint_dir=out_dir, progress=False)
    return result.best_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> dict[str, Path]:
    """A 6-row fake archive and a one-epoch checkpoint trained on it."""
    base = tmp_path_factory.mktemp("tiny-run")
    root = write_fake_archive(base / "emotic", rows_per_split=6)
    return {"root": root, "checkpoint": train_tiny_checkpoint(root, base / "run")}


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """``(root, best.pt)``: a tiny demo archive (16/8/11 rows, 40 px crops with real faces
    and learnable cues) and a ResNet-18 trained on it for one epoch without augmentation."""
    from emonet.data.demo import make_demo_data

    base = tmp_path_factory.mktemp("demo-run")
    root = make_demo_data(base / "demo", seed=2, n_train=16, n_val=8, n_test=11, size=40)
    return root, train_tiny_checkpoint(root, base / "ckpt", batch_size=8, augment=False)


# `pytest -m "not slow"` is the quick suite. A test is `slow` when it trains a model or
# runs a Prefect flow: marked by hand, or automatically when it uses one of these fixtures
# (directly or through another fixture). A test that trains or runs a flow without the
# mark fails, naming the mark, so the quick suite cannot silently grow a slow test.
TRAINING_FIXTURES = frozenset({"tiny_checkpoint", "demo_checkpoint", "straight_run", "prefect_env"})


# The files that take longest, run first: `make test`'s workers take whole files in this
# order (pytest-xdist's loadfile), so a long file started last would leave one worker
# running it alone at the end. Within a file the order stays as written.
LONGEST_FILES = (
    "test_train.py",
    "test_servers.py",
    "test_tune.py",
    "test_flows.py",
    "test_stop.py",
    "test_kill.py",
    "test_monitoring.py",
    "test_faults.py",
    "test_registry.py",
    "test_distributed.py",
    "test_runs.py",
    "test_encoders.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: file order kept otherwise


_running: dict[str, pytest.Item | None] = {"item": None}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    # Session fixtures are set up inside the protocol of the first test that uses them.
    _running["item"] = item
    try:
        return (yield)
    finally:
        _running["item"] = None


def _only_in_slow_tests(what: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        item = _running["item"]
        if item is not None and item.get_closest_marker("slow") is None:
            raise RuntimeError(
                f"{item.nodeid} {what} but is not marked slow: add @pytest.mark.slow, "
                "or get the model from a fixture in conftest.TRAINING_FIXTURES"
            )
        return function(*args, **kwargs)

    return guarded


# Every training path (CLI, Prefect task, torchrun worker, tests) calls emonet.training.trainer.fit
# through the module, and every flow run goes through Flow.__call__.
emonet.training.trainer.fit = _only_in_slow_tests(
    "trains a model (emonet.training.trainer.fit)", emonet.training.trainer.fit
)
Flow.__call__ = _only_in_slow_tests("runs a Prefect flow", Flow.__call__)


@contextlib.contextmanager
def restored_mlflow_uris() -> Iterator[None]:
    """Undo what MLflow keeps process-wide: the tracking and registry URIs set with
    ``mlflow.set_*_uri`` (``configure_mlflow`` does it) and the env vars beside them."""
    import mlflow

    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def _isolated_mlflow_uris() -> Iterator[None]:
    """Every test starts from the environment's store, whatever an earlier test set."""
    with restored_mlflow_uris():
        yield


# --------------------------------------------------------------------------- MLflow stores


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A temporary SQLite tracking + registry store for the module."""
    from emonet.tracking.run_logging import configure_mlflow

    base = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with restored_mlflow_uris():
        experiment_id = configure_mlflow(uri, "emonet-test", base / "artifacts")
        yield {"uri": uri, "experiment_id": experiment_id, "base": base}


@pytest.fixture(scope="module")
def logged_model(mlflow_store, tiny_checkpoint):
    """One pyfunc of ``tiny_checkpoint`` logged and registered as ``emonet`` from a worker
    thread, to a run left RUNNING."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    from emonet.tracking.run_logging import log_emonet_model

    client = MlflowClient()
    run_id = client.create_run(mlflow_store["experiment_id"]).info.run_id
    client.log_param(run_id, "batch_size", 16)  # the training batch size, as the flow logs it
    # Another thread than the one that created the run: nothing may rely on an active run.
    with ThreadPoolExecutor(max_workers=1) as pool:
        version = pool.submit(log_emonet_model, run_id, tiny_checkpoint["checkpoint"], None, None, "emonet").result()
    return {"run_id": run_id, "version": version, "client": client}


# Defines `me` (this child's index), `n` and `barrier(name)`: every child waits there
# until all have arrived, so their next steps really overlap.
CHILD_PROLOGUE = """
import sys, time
from pathlib import Path
me, n = int(sys.argv[1]), int(sys.argv[2])

def barrier(name):
    Path(f"{name}-{me}.arrived").touch()
    deadline = time.monotonic() + 240
    while len(list(Path().glob(f"{name}-*.arrived"))) < n:
        assert time.monotonic() < deadline, f"barrier {name}: the other processes never arrived"
        time.sleep(0.01)
"""


def run_together(script: str, n: int, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run ``script`` (after :data:`CHILD_PROLOGUE`) in ``n`` processes at once, in ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD_PROLOGUE + script, str(i), str(n)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=400)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results
