"""Nothing outlives a killed run: SIGKILL to a flow's main process (as the OOM killer or
``kill -9`` would send it) during face visibility and during training leaves no process of
the run 60 s later, and the next run marks the killed flow run CRASHED in Prefect as well
as KILLED in MLflow. Also the watchdog (:mod:`emonet.utils.reaper`) on its own."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from emonet.data.demo import make_demo_data
from emonet.models.checkpoint import LAST_CHECKPOINT
from emonet.tracking.stale_runs import END_REASON_TAG, FLOW_RUN_TAG

REPO = Path(__file__).resolve().parents[1]
MARKER = "EMONET_TEST_RUN"  # in the environment of every process a run starts, forked or not
LEFT_LIMIT_S = 60.0

# As tests/test_stop.py: quick to reach training, with DataLoader workers and the
# face-visibility process pool, so that every kind of child process is there.
KILL_CONFIG = {
    "model": {"backbone": "resnet18"},
    "train": {"image_size": 32, "context_size": 32, "epochs": 500, "batch_size": 8, "num_workers": 2, "device": "cpu"},
}


def _processes_of(marker: str) -> list[str]:
    """Live processes whose environment carries ``MARKER=marker``: pid and command line."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid == os.getpid() or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get(MARKER) == marker:
                found.append(f"{process.pid} {' '.join(process.cmdline())[:140]}")
        except (psutil.Error, OSError):
            continue
    return found


def _wait_until_gone(marker: str, limit_s: float = LEFT_LIMIT_S) -> tuple[list[str], float]:
    start = time.monotonic()
    while (left := _processes_of(marker)) and time.monotonic() - start < limit_s:
        time.sleep(0.2)
    return left, time.monotonic() - start


def test_the_watchdog_ends_what_a_killed_process_left_running(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import subprocess, sys, time\n"
        "from emonet.utils.reaper import ensure_reaper\n"
        "ensure_reaper()\n"
        "assert ensure_reaper() is None  # one watchdog per process\n"
        # a child, a grandchild, and a child in its own session (still a descendant)
        "subprocess.Popen(['sh', '-c', 'sleep 300 & sleep 300'])\n"
        "subprocess.Popen(['sleep', '301'], start_new_session=True)\n"
        "time.sleep(1.0)\n"  # two of the watchdog's looks at the descendants
        # and one the watchdog has not seen when the parent dies: found by its token
        "subprocess.Popen(['sleep', '302'])\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    env = {**os.environ, MARKER: marker, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, str(parent)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        before = _processes_of(marker)
        process.kill()
        process.wait()
        left, took = _wait_until_gone(marker, limit_s=20)
    finally:
        process.kill()
    assert len(before) == 7, before  # the parent, its watchdog, sh and two sleeps, the session's, the late one
    assert not left, left
    said = process.stderr.read()
    assert f"process {process.pid} ended and left 5 processes running; ended them" in said, said
    print(f"{len(before)} processes, all gone {took:.1f} s after SIGKILL")


def _flow_states(prefect_db: Path, flow_run_id: str) -> dict[str, str]:
    """Name -> state type of a flow run, its subflow runs and all their task runs (Prefect's database)."""
    with sqlite3.connect(prefect_db) as db:
        ids, states = [flow_run_id], {}
        while ids:
            run_id = ids.pop()
            for name, state in db.execute("SELECT name, state_type FROM flow_run WHERE id = ?", (run_id,)):
                states[f"flow run {name}"] = state
            for name, state in db.execute("SELECT name, state_type FROM task_run WHERE flow_run_id = ?", (run_id,)):
                states[f"task run {name}"] = state
            children = db.execute(
                "SELECT flow_run.id FROM flow_run JOIN task_run ON flow_run.parent_task_run_id = task_run.id "
                "WHERE task_run.flow_run_id = ?",
                (run_id,),
            )
            ids += [child for (child,) in children]
    return states


class _Flow:
    """``python -m flows.training_pipeline`` in its own session, every process marked."""

    def __init__(self, tmp_path: Path, root: Path, config: Path, name: str) -> None:
        self.marker = uuid.uuid4().hex
        self.log = tmp_path / f"{name}.log"
        self.outputs = tmp_path / f"{name}-outputs"
        env = {
            **{key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
            "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # as `make test` sets it: a busy CPU
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            MARKER: self.marker,
        }
        command = [
            sys.executable, "-m", "flows.training_pipeline", "--data-root", str(root), "--config", str(config),
            "--out-dir", str(self.outputs),
        ]  # fmt: skip
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + 600
        while not ready():
            assert self.process.poll() is None, f"the flow ended before {what}:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within 10 minutes"
            time.sleep(0.2)

    def kill(self) -> dict[str, object]:
        """SIGKILL the main process only; what is left of the run 60 s later."""
        members = _processes_of(self.marker)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        left, took = _wait_until_gone(self.marker)
        for line in left:  # do not leave them to the next tests
            psutil.Process(int(line.split()[0])).kill()
        return {"members": members, "left": left, "took": took, "log": self.log.read_text()[-4000:]}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_home")  # tmp_path / "prefect", migrated
def test_sigkill_during_visibility_and_training_leaves_nothing_and_is_marked_crashed(tmp_path: Path) -> None:
    root = make_demo_data(tmp_path / "archive", seed=3, n_train=48, n_val=16, n_test=16, size=32)
    config = tmp_path / "kill.yaml"
    config.write_text(yaml.safe_dump(KILL_CONFIG))

    # 1. Killed while the face-visibility pool scores the first shard.
    first = _Flow(tmp_path, root, config, "first")
    first.wait_for(lambda: any("forkserver" in line for line in _processes_of(first.marker)), "visibility pool")
    during_visibility = first.kill()
    # 2. The next run (same Prefect database and MLflow store) trains; killed in training.
    second = _Flow(tmp_path, root, config, "second")
    second.wait_for(lambda: list(second.outputs.glob(f"runs/*/checkpoints/{LAST_CHECKPOINT}")), "last.pt")
    time.sleep(1.0)  # into the next epoch's batches, DataLoader workers running
    during_training = second.kill()

    for when, kill in (("visibility", during_visibility), ("training", during_training)):
        print(f"SIGKILL during {when}: {len(kill['members'])} processes, all gone after {kill['took']:.1f} s")
        assert len(kill["members"]) >= 5, kill  # the flow, its watchdog, Prefect's server, pool, ...
        assert any("uvicorn" in line for line in kill["members"]), kill["members"]
        assert not kill["left"], f"still running {LEFT_LIMIT_S:.0f} s after SIGKILL during {when}: {kill}"

    # The second run closed the first one's MLflow run (KILLED) and marked its Prefect
    # flow run, subflow and unfinished task runs CRASHED; nothing else is left RUNNING.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("emonet").experiment_id], order_by=["start_time ASC"])
    assert len(runs) == 2
    killed, last = runs
    assert killed.info.status == "KILLED" and "ended (killed or crashed)" in killed.data.tags[END_REASON_TAG]
    states = _flow_states(tmp_path / "prefect" / "prefect.db", killed.data.tags[FLOW_RUN_TAG])
    assert states["flow run " + killed.data.tags["prefect.flow_run_name"]] == "CRASHED", states
    assert sum(state == "CRASHED" for state in states.values()) >= 3, states  # flow, subflow, a shard
    assert "RUNNING" not in states.values() and "PENDING" not in states.values(), states
    assert "marked CRASHED in Prefect" in second.log.read_text()
    assert last.info.status == "RUNNING"  # killed too: the next run will close it
