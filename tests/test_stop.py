"""A clean stop: SIGTERM or SIGINT to a training flow's process group ends all of it
within 30 s, training stops between batches with a whole ``last.pt``, and the MLflow
run is closed ``KILLED`` with the reason. Also the signal handlers of
:mod:`emonet.utils.stopping` on their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import copy_prefect_db
from mlflow.tracking import MlflowClient

from emonet.data.demo import make_demo_data
from emonet.models.checkpoint import LAST_CHECKPOINT, read_checkpoint
from emonet.tracking.stale_runs import END_REASON_TAG
from emonet.utils.stopping import (
    TrainingStopped,
    check_stop,
    clear_stop,
    on_stop_requested,
    request_stop,
    stop_on_signals,
    stop_requested,
)

REPO = Path(__file__).resolve().parents[1]
STOP_LIMIT_S = 30.0

# Small enough to reach training quickly, with DataLoader workers (and the face-visibility
# process pool the flow keeps) so that every kind of child process is in the group.
STOP_CONFIG = {
    "model": {"backbone": "resnet18"},
    "train": {"image_size": 32, "context_size": 32, "epochs": 500, "batch_size": 8, "num_workers": 2, "device": "cpu"},
}


def test_a_signal_requests_a_stop_and_a_second_one_stops_at_once() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    reached: list[str] = []
    with pytest.raises(TrainingStopped, match=r"at once \(SIGTERM after SIGINT received\)"):
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, in this (main) thread
            reached.append(str(stop_requested()))  # the first signal only asked
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the second signal")
    assert reached == ["SIGINT received"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    clear_stop()


def test_a_request_the_block_did_not_act_on_stops_its_caller() -> None:
    with pytest.raises(TrainingStopped, match=r"\(SIGTERM received\) after its last safe point"):
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
    clear_stop()
    with stop_on_signals():  # a new block starts without the old request
        check_stop("never")
    assert stop_requested() is None


def test_an_error_while_a_stop_is_pending_is_part_of_the_stop() -> None:
    with pytest.raises(TrainingStopped, match=r"\(SIGTERM received\): DataLoader worker") as stopped:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
    assert isinstance(stopped.value.__cause__, RuntimeError)
    clear_stop()
    with pytest.raises(RuntimeError), stop_on_signals():  # without a stop, errors pass through
        raise RuntimeError("a real failure")


def test_stop_listeners_hear_the_first_request_while_registered() -> None:
    heard: list[str] = []
    with on_stop_requested(heard.append):
        request_stop("SIGTERM received")
        request_stop("SIGINT received")
    clear_stop()
    request_stop("after")
    clear_stop()
    assert heard == ["SIGTERM received"]


def _group(pgid: int) -> list[str]:
    """The live processes of process group ``pgid``: pid and command line of each."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(f"{process.pid} {' '.join(process.cmdline())[:160]}")
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _stop_a_training_flow(
    tmp_path: Path, signum: signal.Signals, delay: float, migrated_prefect_db: Path
) -> dict[str, object]:
    """Start the flow in its own process group, signal the group ``delay`` seconds after
    training has written ``last.pt``, and wait for every process of the group to end."""
    tmp_path.mkdir(parents=True)
    copy_prefect_db(migrated_prefect_db, tmp_path / "prefect")
    root = make_demo_data(tmp_path / "archive", seed=3, n_train=48, n_val=16, n_test=16, size=32)
    config = tmp_path / "stop.yaml"
    config.write_text(yaml.safe_dump(STOP_CONFIG))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **{key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # as `make test` sets it: a busy CPU
        "MLFLOW_TRACKING_URI": tracking_uri,
    }
    command = [
        sys.executable, "-m", "flows.training_pipeline", "--data-root", str(root), "--config", str(config),
        "--out-dir", str(tmp_path / "outputs"),
    ]  # fmt: skip
    log = tmp_path / "flow.log"
    with open(log, "w") as out:
        flow = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while not list((tmp_path / "outputs").glob(f"runs/*/checkpoints/{LAST_CHECKPOINT}")):
            assert flow.poll() is None, f"the flow ended before training:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no last.pt within 10 minutes"
            time.sleep(0.2)
        time.sleep(delay)
        members = _group(flow.pid)
        sent = time.monotonic()
        os.killpg(flow.pid, signum)
        while _group(flow.pid) and time.monotonic() - sent < 60:
            time.sleep(0.1)
        took = time.monotonic() - sent
        left = _group(flow.pid)
    finally:
        try:
            os.killpg(flow.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        flow.wait()
    return {
        "took": took, "left": left, "members": members, "returncode": flow.returncode, "log": log.read_text(),
        "client": MlflowClient(tracking_uri=tracking_uri), "outputs": tmp_path / "outputs",
    }  # fmt: skip


@pytest.mark.slow
def test_a_signal_to_the_process_group_stops_a_training_flow_cleanly(tmp_path: Path, migrated_prefect_db: Path) -> None:
    # Two flows at once, one per signal (most of each run is one busy core). SIGTERM at
    # once: it lands while the epoch's callbacks run (MLflow, Prefect's progress artifact);
    # SIGINT 2 s later: during the next epoch's batches.
    delays = {signal.SIGTERM: 0.0, signal.SIGINT: 2.0}
    with ThreadPoolExecutor(len(delays)) as pool:
        stops = {
            signum: pool.submit(_stop_a_training_flow, tmp_path / signum.name, signum, delay, migrated_prefect_db)
            for signum, delay in delays.items()
        }
    for signum, stop in stops.items():
        _check_a_clean_stop(stop.result(), signum)


def _check_a_clean_stop(stop: dict[str, object], signum: signal.Signals) -> None:
    print(f"{signum.name}: {len(stop['members'])} processes, all gone after {stop['took']:.1f} s")
    log_tail = str(stop["log"])[-4000:]
    assert len(stop["members"]) >= 4, log_tail  # the flow, Prefect's server, loader and pool workers
    assert not stop["left"], f"still running {stop['took']:.0f} s after {signum.name}: {stop['left']}\n{log_tail}"
    assert stop["took"] < STOP_LIMIT_S, log_tail
    assert stop["returncode"] != 0

    # Training stopped between batches: last.pt is whole and names a completed epoch.
    (last,) = Path(stop["outputs"]).glob(f"runs/*/checkpoints/{LAST_CHECKPOINT}")
    checkpoint = read_checkpoint(last)
    assert checkpoint["epoch"] >= 1 and len(checkpoint["history"]) == checkpoint["epoch"]
    assert not list(last.parent.glob(".*.tmp"))
    assert f"training stopped ({signum.name} received)" in log_tail

    client: MlflowClient = stop["client"]
    (run,) = client.search_runs([client.get_experiment_by_name("emonet").experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags[END_REASON_TAG] == f"stopped by {signum.name} received during training"
