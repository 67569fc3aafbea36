"""The team set-up, for real: ``scripts.servers`` runs PostgreSQL, the MLflow tracking
server and the Prefect server; a deployment of ``prefect.yaml`` trains on a worker started
in another folder; a sweep keeps its study in the printed Optuna database; the champion
loads through the server; a drifted batch monitored through the ``monitor-demo`` deployment
starts one run of the retraining deployment by its trigger; ``stop`` stops all of it. And
``make ui`` stops exactly its two servers on Ctrl-C."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import psycopg
import pytest
from conftest import copy_prefect_db
from optuna.trial import TrialState
from PIL import Image

from emonet.data.demo import make_demo_data
from emonet.monitoring.demo import write_demo_batches
from emonet.schema import EMOTIONS
from emonet.tuning.study import PARENT_RUN_ATTR
from scripts.processes import port_is_free, start_ticks, wait_until_answers
from scripts.servers import ServerError, database_url

REPO = Path(__file__).resolve().parents[1]
STAMP = ".venv/.installed-stamp"
# The smallest training run that still exercises every step (as in test_flows.py).
TINY_RUN = {
    "config": {
        "model": {"backbone": "resnet18"},
        "train": {"image_size": 32, "context_size": 32, "epochs": 1, "batch_size": 8, "num_workers": 0},
    },
    "visibility_workers": 1,
    "visibility_shard_size": 16,
    "review_samples": 4,
    "review_detailed_samples": 1,
}


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def clean_env(tmp_path: Path) -> dict[str, str]:
    """This checkout on PYTHONPATH, Prefect's home in ``tmp_path``, and no setting that
    points at another server or checkout."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "EMONET_HOME", "EMONET_DATABASE_URL"}
    }
    env.update(
        PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    return env


def run_ok(command: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def password_hidden(state_dir: Path, log: str) -> bool:
    """The local cluster's password stays in its file: the log names the file instead."""
    return (state_dir / "postgres-password").read_text().strip() not in log


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_database_url_swaps_database_and_driver_and_keeps_the_escaped_password():
    url = database_url(
        "postgres://team%40x:p%2Fw%3A1@db.internal:6543/postgres?sslmode=require", "mlflow", "postgresql+psycopg"
    )
    assert url == "postgresql+psycopg://team%40x:p%2Fw%3A1@db.internal:6543/mlflow?sslmode=require"
    assert (
        database_url("postgresql://u:pw@h/db", "prefect", "postgresql+asyncpg") == "postgresql+asyncpg://u:pw@h/prefect"
    )
    with pytest.raises(ServerError, match=r"must be a postgresql:// URL, got 'mysql://u:\*\*\*@h/db'"):
        database_url("mysql://u:pw@h/db", "mlflow", "postgresql+psycopg")
    with pytest.raises(ServerError, match="is not a URL") as error:
        database_url("team:secret@db.internal", "mlflow", "postgresql+psycopg")
    assert "secret" not in str(error.value)


def demo_runs(prefect_db: str) -> list[tuple[str, str]]:
    """``(state_type, created)`` of every flow run of the demo (retraining) deployment."""
    with psycopg.connect(prefect_db) as conn:
        return conn.execute(
            "SELECT fr.state_type, fr.created::text FROM flow_run fr JOIN deployment d ON fr.deployment_id = d.id "
            "WHERE d.name = 'demo' ORDER BY fr.created"
        ).fetchall()


def monitor_and_trigger(tmp_path: Path, prefect: list[str], client_env: dict, worker_env: dict, cwd: Path, db: str):
    """Two drifted batches monitored by the monitor-demo deployment on a worker: their events
    start the demo deployment by its trigger, once (its cooldown is an hour)."""
    batches = write_demo_batches(tmp_path / "batches", rows=40)
    inbox = tmp_path / "inbox"
    for name in ("first", "second"):
        shutil.copytree(batches["shifted"].parent, inbox / name)
    pixels = np.asarray(Image.open(inbox / "second" / "crops" / "crop_00000.png")).copy()
    pixels[0, 0] ^= 1  # another content: a batch of its own
    Image.fromarray(pixels).save(inbox / "second" / "crops" / "crop_00000.png")
    before = demo_runs(db)
    params = {"inbox": str(inbox), "report": False, "out_dir": str(tmp_path / "monitoring")}
    command = [*prefect, "deployment", "run", "emonet-monitor/monitor-demo", "--params", json.dumps(params)]
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", run_ok(command, client_env, REPO, 120).stdout).group(1)
    run_ok([*prefect, "worker", "start", "--pool", "emonet-process", "--run-once"], worker_env, cwd, 600)
    # The server persists events in batches (every few seconds): wait for both.
    deadline = time.monotonic() + 60
    while True:
        with psycopg.connect(db) as conn:
            (state,) = conn.execute("SELECT state_type FROM flow_run WHERE id = %s", (run_id,)).fetchone()
            events = conn.execute(
                "SELECT count(*) FROM events WHERE event = 'emonet.monitoring.drift-detected' "
                "AND resource_id = 'emonet.model.emonet-demo'"
            ).fetchone()[0]
            names = {row[0] for row in conn.execute("SELECT name FROM task_run WHERE flow_run_id = %s", (run_id,))}
        if events >= 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert state == "COMPLETED" and events == 2, (state, events)
    assert {"monitor-first/batch.csv", "monitor-second/batch.csv"} <= names, names  # each batch by its folder
    deadline = time.monotonic() + 90
    while len(demo_runs(db)) == len(before) and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(5)  # time for a second firing, which the cooldown must prevent
    triggered = demo_runs(db)[len(before) :]
    assert len(triggered) == 1 and triggered[0][0] == "SCHEDULED", triggered


@pytest.mark.slow
def test_servers_on_postgresql_run_a_deployment_a_sweep_and_serve_the_champion(tmp_path):
    state_dir = tmp_path / "servers"
    pg_port, mlflow_port, prefect_port = free_ports(3)
    mlflow_url, prefect_api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
    env = clean_env(tmp_path)
    servers = [sys.executable, "-m", "scripts.servers"]
    started = False
    try:
        started_log = run_ok(
            [
                *servers,
                "start",
                "--state-dir",
                str(state_dir),
                "--pg-port",
                str(pg_port),
                "--mlflow-port",
                str(mlflow_port),
                "--prefect-port",
                str(prefect_port),
                "--mlflow-workers",
                "1",
            ],
            env,
            REPO,
            timeout=420,
        ).stderr
        started = True
        assert f"export MLFLOW_TRACKING_URI={mlflow_url}" in started_log
        assert f"export PREFECT_API_URL={prefect_api}" in started_log
        with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/ui-settings", timeout=30) as response:
            assert json.load(response)["api_url"] == prefect_api  # the UI asks this server, not port 4200
        assert "postgres-password" in started_log and password_hidden(state_dir, started_log)
        recorded = json.loads((state_dir / "state.json").read_text())
        assert [s["name"] for s in recorded["servers"]] == ["mlflow", "prefect"]

        # Deploy prefect.yaml's demo deployment from the checkout, as `make deploy` does.
        prefect = [sys.executable, "-m", "prefect"]
        client_env = {**env, "PREFECT_API_URL": prefect_api}
        run_ok([*prefect, "work-pool", "create", "emonet-process", "--type", "process"], client_env, REPO, 120)
        run_ok([*prefect, "--no-prompt", "deploy", "--name", "demo", "--name", "monitor-demo"], client_env, REPO, 300)
        archive = make_demo_data(tmp_path / "archive", seed=3, n_train=16, n_val=8, n_test=8, size=48)
        params = {
            "data_root": str(archive),
            "out_dir": str(tmp_path / "outputs"),
            "experiment_name": "servers-test",
            # The name monitor-demo watches and the demo deployment's trigger matches.
            "registered_model_name": "emonet-demo",
            **TINY_RUN,
        }
        out = run_ok(
            [*prefect, "deployment", "run", "emonet-training-pipeline/demo", "--params", json.dumps(params)],
            client_env,
            REPO,
            120,
        ).stdout
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

        # A worker started the way `prefect deploy` suggests: another folder, no EMONET_HOME.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        worker_env = {**client_env, "MLFLOW_TRACKING_URI": mlflow_url}
        run_ok([*prefect, "worker", "start", "--pool", "emonet-process", "--run-once"], worker_env, elsewhere, 900)

        password = (state_dir / "postgres-password").read_text().strip()
        server = f"postgresql://emonet:{password}@127.0.0.1:{pg_port}"
        with psycopg.connect(f"{server}/prefect") as conn:
            state = conn.execute("SELECT state_type FROM flow_run WHERE id = %s", (flow_run_id,)).fetchone()
        assert state is not None and state[0] == "COMPLETED", state
        with psycopg.connect(f"{server}/mlflow") as conn:
            aliases = conn.execute("SELECT alias FROM registered_model_aliases WHERE name = 'emonet-demo'").fetchall()
        assert aliases == [("champion",)]
        # Artifacts are proxied: the server wrote the model under its artifacts destination.
        assert list((state_dir / "mlflow-artifacts").rglob("MLmodel"))

        # A sweep on the printed Optuna storage (PostgreSQL) and the MLflow server; its
        # trials read back from the storage by this process.
        export = re.search(r"^\s*(export EMONET_OPTUNA_STORAGE=.*)$", started_log, re.MULTILINE).group(1)
        optuna_storage = run_ok(["bash", "-c", f'{export} && echo "$EMONET_OPTUNA_STORAGE"'], env, REPO, 30)
        sweep_env = {**worker_env, "EMONET_OPTUNA_STORAGE": optuna_storage.stdout.strip()}
        (tmp_path / "space.yaml").write_text(
            "params:\n  train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
        )
        (tmp_path / "tiny.yaml").write_text(json.dumps(TINY_RUN["config"]))
        sweep = [
            "--search", str(tmp_path / "space.yaml"), "--n-trials", "2", "--study-name", "on-postgres",
            "--config", str(tmp_path / "tiny.yaml"), "--data-root", str(archive), "--out-dir", str(tmp_path / "tune"),
        ]  # fmt: skip
        out = run_ok([str(Path(sys.executable).with_name("emonet")), "tune", *sweep], sweep_env, elsewhere, 300).stdout
        assert "study 'on-postgres' in postgresql+psycopg://emonet:***@" in out, out
        study = optuna.load_study(study_name="on-postgres", storage=sweep_env["EMONET_OPTUNA_STORAGE"])
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
        with psycopg.connect(f"{server}/mlflow") as conn:
            (children,) = conn.execute(
                "SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId' AND value = %s",
                (study.user_attrs[PARENT_RUN_ATTR],),
            ).fetchone()
        assert children == 2

        # The champion loads through the server in a fresh process, as in the README.
        image = np.random.default_rng(0).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
        script = textwrap.dedent(
            f"""
            import json, mlflow, pandas as pd
            model = mlflow.pyfunc.load_model("models:/emonet-demo@champion")
            out = model.predict(pd.DataFrame({{"image_b64": [{png_b64(image)!r}]}}))
            print(json.dumps(out.to_dict(orient="records")))
            """
        )
        rows = json.loads(
            run_ok([sys.executable, "-I", "-c", script], worker_env, elsewhere, 300).stdout.splitlines()[-1]
        )
        assert len(rows) == 1
        assert all(0.0 <= rows[0][f"prob_{emotion}"] <= 1.0 for emotion in EMOTIONS)
        assert -1.0 <= rows[0]["valence"] <= 1.0

        monitor_and_trigger(tmp_path, prefect, client_env, worker_env, elsewhere, f"{server}/prefect")
    finally:
        pg_data = (state_dir / "postgres").resolve()
        stop = subprocess.run(
            [*servers, "stop", "--state-dir", str(state_dir)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if pg_data.exists() and not pg_data.is_relative_to(tmp_path):
            shutil.rmtree(pg_data)
    if started:
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not (state_dir / "state.json").exists()
        assert all(start_ticks(s["pid"]) != s["start_ticks"] for s in recorded["servers"])
        assert all(port_is_free("127.0.0.1", port) for port in (pg_port, mlflow_port, prefect_port))


@pytest.mark.slow
def test_make_ui_stops_exactly_its_two_servers_on_ctrl_c(tmp_path, migrated_prefect_db):
    copy_prefect_db(migrated_prefect_db, tmp_path / "prefect-home")  # clean_env's PREFECT_HOME
    mlflow_port, prefect_port = free_ports(2)
    log = tmp_path / "ui.log"
    # `make ui` in a process group of its own, as a terminal runs it; the venv running this
    # test is never reinstalled from here (-o).
    with open(log, "wb") as out:
        make = subprocess.Popen(
            [
                "make",
                "-o",
                STAMP,
                "ui",
                f"MLFLOW_PORT={mlflow_port}",
                f"PREFECT_PORT={prefect_port}",
                f"MLFLOW_DB=sqlite:///{tmp_path / 'mlflow.db'}",
            ],
            cwd=REPO,
            env=clean_env(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_answers(f"http://127.0.0.1:{mlflow_port}/health", make, log, timeout=240)
        wait_until_answers(f"http://127.0.0.1:{prefect_port}/api/health", make, log, timeout=240)
        # The UI, served on this port, asks its API on this port too (not the default 4200).
        with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/ui-settings", timeout=30) as response:
            assert json.load(response)["api_url"] == f"http://127.0.0.1:{prefect_port}/api"
        pids = [int(pid) for pid in re.findall(r"started the .+ \(pid (\d+)\)", log.read_text())]
        assert len(pids) == 2
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground group
        make.wait(timeout=120)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(timeout=30)
    text = log.read_text()
    assert "Segmentation fault" not in text and "core dumped" not in text, text[-3000:]
    assert len(re.findall(r"stopped the (?:MLflow UI|Prefect server) \(pid \d+\)", text)) == 2, text[-3000:]
    for pid in pids:  # each server led its own group: the group, forked workers included, is gone
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert port_is_free("127.0.0.1", mlflow_port) and port_is_free("127.0.0.1", prefect_port)
