"""MLflow runs left RUNNING by killed or crashed flows: closing them by their owner's tags,
the flow's crash and cancellation hooks, and the demo flow that registers apart."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from conftest import restored_mlflow_uris
from mlflow import MlflowClient

from emonet.tracking.run_logging import configure_mlflow
from emonet.tracking.stale_runs import (
    END_REASON_TAG,
    FLOW_RUN_TAG,
    HOST_TAG,
    PID_TAG,
    PROCESS_START_TAG,
    close_stale_runs,
    process_tags,
)


def _dead_process_tags() -> dict[str, str]:
    """process_tags() of a process that has ended, as a SIGKILLed flow leaves them."""
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    started = psutil.Process(child.pid).create_time()
    child.kill()
    child.wait(timeout=30)
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(child.pid), PROCESS_START_TAG: repr(started)}


def test_close_stale_runs_ends_runs_of_killed_flows_only(mlflow_store):
    client = MlflowClient()
    experiment_id = configure_mlflow(mlflow_store["uri"], "stale-runs")

    def running(tags: dict[str, str]) -> str:
        return client.create_run(experiment_id, tags=tags).info.run_id

    killed = running({FLOW_RUN_TAG: "flow-killed", **_dead_process_tags()})
    crashed = running({FLOW_RUN_TAG: "flow-crashed", HOST_TAG: "elsewhere", PID_TAG: "1"})
    failed = running({FLOW_RUN_TAG: "flow-failed"})
    alive = running({FLOW_RUN_TAG: "flow-alive", **process_tags()})
    other_host = running({FLOW_RUN_TAG: "flow-remote", **_dead_process_tags(), HOST_TAG: "elsewhere"})
    untagged = running({})
    own = running({FLOW_RUN_TAG: "flow-crashed"})  # the caller's run is never touched
    finished = running({FLOW_RUN_TAG: "flow-failed"})
    client.set_terminated(finished, "FINISHED")

    final_states = {"flow-crashed": "CRASHED", "flow-failed": "FAILED", "flow-killed": None}
    closed = close_stale_runs(client, experiment_id, final_states.get, keep=[own])

    assert {c["run_id"]: c["status"] for c in closed} == {killed: "KILLED", crashed: "KILLED", failed: "FAILED"}
    # Only the killed process's flow run is still RUNNING in Prefect, for the caller to mark crashed.
    assert {c["run_id"]: c["abandoned_flow_run_id"] for c in closed} == {killed: "flow-killed", crashed: "", failed: ""}
    for run_id, status in ((killed, "KILLED"), (crashed, "KILLED"), (failed, "FAILED")):
        assert client.get_run(run_id).info.status == status
    reasons = {run_id: client.get_run(run_id).data.tags[END_REASON_TAG] for run_id in (killed, crashed, failed)}
    assert "ended (killed or crashed)" in reasons[killed] and socket.gethostname() in reasons[killed]
    assert "flow-crashed ended (CRASHED)" in reasons[crashed]
    assert "flow-failed ended (FAILED)" in reasons[failed]
    for run_id in (alive, other_host, untagged, own):
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING" and END_REASON_TAG not in run.data.tags
    assert client.get_run(finished).info.status == "FINISHED"
    assert close_stale_runs(client, experiment_id, final_states.get, keep=[own]) == []


def test_crash_and_cancellation_hooks_end_the_flow_runs_mlflow_run(mlflow_store):
    from types import SimpleNamespace

    from flows.training_pipeline import emonet_training_pipeline, end_mlflow_run_of_flow_run

    assert end_mlflow_run_of_flow_run in emonet_training_pipeline.on_crashed_hooks
    assert end_mlflow_run_of_flow_run in emonet_training_pipeline.on_cancellation_hooks
    client = MlflowClient()
    experiment_id = configure_mlflow(mlflow_store["uri"], "hooks")
    flow_run_id = "0b7e4c1e-5a43-4c55-9b5e-2b3c4d5e6f70"
    ours = client.create_run(experiment_id, tags={FLOW_RUN_TAG: flow_run_id}).info.run_id
    other = client.create_run(experiment_id, tags={FLOW_RUN_TAG: "another-flow-run"}).info.run_id

    flow_run = SimpleNamespace(id=flow_run_id, parameters={"tracking_uri": mlflow_store["uri"]})
    state = SimpleNamespace(name="Crashed", message="Execution was aborted by a termination signal.")
    end_mlflow_run_of_flow_run(emonet_training_pipeline, flow_run, state)

    run = client.get_run(ours)
    assert run.info.status == "KILLED"
    assert run.data.tags[END_REASON_TAG] == (
        f"Prefect flow run {flow_run_id} ended Crashed: Execution was aborted by a termination signal."
    )
    assert client.get_run(other).info.status == "RUNNING"


@pytest.mark.slow
def test_demo_flow_registers_apart_and_closes_a_killed_flows_run(prefect_env, tmp_path):
    """A run on the demo data registers `emonet-demo`, never `emonet`, and the next flow
    run closes the MLflow run that a SIGKILLed flow left RUNNING."""
    import uuid

    from emonet.data.demo import make_demo_data
    from flows.training_pipeline import emonet_training_pipeline
    from tasks.tracking import final_flow_run_state

    demo_dir = make_demo_data(tmp_path / "demo", seed=3, n_train=32, n_val=16, n_test=16, size=48)
    uri = prefect_env["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with restored_mlflow_uris():
        experiment_id = configure_mlflow(uri, "registry-flow")
        killed = client.create_run(experiment_id, tags={FLOW_RUN_TAG: str(uuid.uuid4()), **_dead_process_tags()})
        summary = emonet_training_pipeline(
            demo_dir=demo_dir,
            out_dir=tmp_path / "outputs",
            experiment_name="registry-flow",
            config={"model": {"backbone": "resnet18"}, "train": {"image_size": 32, "epochs": 1, "num_workers": 0}},
            batch_size=8,
            visibility_workers=1,
            visibility_shard_size=16,
            review_samples=4,
            review_detailed_samples=1,
        )
    run_id = summary.mlflow_run_id
    assert summary.registered_model == "emonet-demo"
    assert {v.name for v in client.search_model_versions(f"run_id = '{run_id}'")} == {"emonet-demo"}

    stale = client.get_run(killed.info.run_id)
    assert stale.info.status == "KILLED" and "killed or crashed" in stale.data.tags[END_REASON_TAG]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[PID_TAG] == str(os.getpid())
    assert final_flow_run_state(run.data.tags[FLOW_RUN_TAG]) == "COMPLETED"
    assert final_flow_run_state(str(uuid.uuid4())) is None
