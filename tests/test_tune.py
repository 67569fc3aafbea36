"""Sweeps: the search space is checked before any training; an Optuna study on a tiny
archive trains each trial through ``fit``, tracks it as a child MLflow run, prunes it on
validation mAP, resumes from its RDB storage, runs on two processes, never reads the test
split, and survives SIGTERM and SIGKILL."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import sqlalchemy
import yaml
from conftest import restored_mlflow_uris, write_fake_archive
from mlflow import MlflowClient
from optuna.trial import TrialState

from emonet.config import load_config
from emonet.schema import annotations_path, arrays_dir
from emonet.tuning.space import apply_params, load_search_space
from emonet.tuning.study import (
    PARENT_RUN_ATTR,
    TRIAL_STATE_TAG,
    describe_result,
    open_storage,
    prepare_sweep_data,
    tune,
)

EMONET = Path(sys.executable).with_name("emonet")
# The smallest trial: ResNet-18 at 32 px on 6 rows, two epochs.
TINY = {
    "model": {"backbone": "resnet18"},
    "train": {"image_size": 32, "context_size": 32, "epochs": 2, "batch_size": 3, "num_workers": 0, "device": "cpu"},
}
SPACE = {
    "params": {
        "train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
        "loss.gamma_neg": {"type": "float", "low": 0.0, "high": 4.0},
        "model.dropout": {"type": "categorical", "choices": [0.0, 0.3]},
    }
}


# --------------------------------------------------------------------------- the search space


def test_a_search_space_file_reads_into_distributions(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    space = load_search_space(path)
    assert [p.path for p in space.params] == ["train.lr", "loss.gamma_neg", "model.dropout"]
    assert isinstance(space.distributions()["train.lr"], optuna.distributions.FloatDistribution)
    assert space.distributions()["train.lr"].log
    config = apply_params(load_config(TINY), {"train.lr": 0.003, "model.dropout": 0.3})
    assert config.train.lr == 0.003 and config.model.dropout == 0.3 and config.train.image_size == 32
    # The repository's spaces are valid over their recipes.
    repo = Path(__file__).resolve().parents[1]
    assert load_search_space(repo / "configs/search/demo.yaml", load_config(repo / "configs/demo.yaml")).params
    assert load_search_space(
        repo / "configs/search/emotic.yaml", load_config(repo / "configs/emotic_resnet50.yaml")
    ).params


@pytest.mark.parametrize(
    ("path", "entry", "message"),
    [
        ("train.learning_rate", {"type": "float", "low": 0.1, "high": 1.0}, "has no field 'learning_rate'"),
        ("optimizer.lr", {"type": "float", "low": 0.1, "high": 1.0}, "the config has no field 'optimizer'"),
        ("train", {"type": "float", "low": 0.1, "high": 1.0}, "a section; name one of its fields"),
        ("train.lr.value", {"type": "float", "low": 0.1, "high": 1.0}, "train.lr is a value, not a section"),
        ("train.lr", {"type": "float", "low": 0.01, "high": 0.01}, "empty range: low 0.01 must be below high 0.01"),
        ("train.lr", {"type": "float", "low": 0.0, "high": 0.1, "log": True}, "a log distribution needs low > 0"),
        ("train.lr", {"type": "normal", "low": 0.0, "high": 0.1}, "type must be one of float, int, categorical"),
        ("train.lr", {"type": "float", "low": "small", "high": 0.1}, "low must be a number"),
        ("train.lr", {"type": "float", "low": 0.1, "high": 1.0, "scale": 2}, "unknown keys for a float distribution"),
        ("train.batch_size", {"type": "int", "low": 4, "high": 8.5}, "needs whole low, high and step"),
        ("train.scheduler", {"type": "categorical", "choices": []}, "choices must be a non-empty list"),
        ("model.dropout", {"type": "float", "low": 0.0, "high": 1.5}, "'model.dropout': 1.5 is not a valid value"),
        ("train.scheduler", {"type": "categorical", "choices": ["cosine", "step"]}, "'step' is not a valid value"),
    ],
)
def test_a_bad_entry_is_refused_naming_it(path: str, entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match="search space entry") as error:
        load_search_space({"params": {path: entry}})
    assert message in str(error.value) and repr(path) in str(error.value)


def test_a_file_without_params_or_entries_is_refused(tmp_path: Path) -> None:
    for text, message in (
        ("lr: 1\n", "one top-level key 'params'"),
        ("params: {}\n", "has no entry"),
        ("[", "not valid YAML"),
    ):
        path = tmp_path / "space.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_search_space(path)
    with pytest.raises(FileNotFoundError, match="search space file not found"):
        load_search_space(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- studies


@pytest.fixture
def sweep(tmp_path: Path) -> dict:
    """A tiny archive without its test split (a sweep must never need it) and its stores."""
    root = write_fake_archive(tmp_path / "emotic")
    annotations_path(root, "test").unlink()
    for crop in arrays_dir(root).glob("*test*"):
        crop.unlink()
    return {
        "root": root,
        "data": prepare_sweep_data(root, tmp_path / "out" / "data"),
        "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "out_dir": tmp_path / "out",
        "config": load_config(TINY),
    }


def _tune(sweep: dict, **overrides):
    arguments = {
        "n_trials": 3,
        "study_name": "tiny",
        "out_dir": sweep["out_dir"],
        "storage": sweep["storage"],
        "config": sweep["config"],
        "tracking_uri": sweep["tracking_uri"],
        **overrides,
    }
    with restored_mlflow_uris():
        return tune(load_search_space(SPACE, sweep["config"]), sweep["data"], **arguments)


@pytest.mark.slow
def test_a_study_tracks_trials_as_child_runs_writes_the_best_config_and_resumes(sweep: dict, tmp_path: Path) -> None:
    result = _tune(sweep)
    assert result.states == {"COMPLETE": 3} and result.epochs_run == result.epochs_budget == 6
    client = MlflowClient(tracking_uri=sweep["tracking_uri"])
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    assert parent.data.metrics["best_val_mAP"] == pytest.approx(result.best_value)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "search_space.yaml",
        "best_config.yaml",
        "plots",
    }
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/optimization_history.png", "plots/param_importances.png"}
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["params.trial_number"],
    )
    assert len(children) == 3
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags[TRIAL_STATE_TAG] == "COMPLETE"
        assert {"train.lr", "loss.gamma_neg", "model.dropout", "train.epochs"} <= set(child.data.params)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_mAP")] == [1, 2]
        assert "val_mAP_voc11" in child.data.metrics

    # best_config.yaml: the base recipe (its own epochs) with the best trial's values.
    best = load_config(result.best_config)
    assert best == apply_params(sweep["config"], result.best_params)
    assert "validation mAP" in describe_result(result)

    # Another process reads the same trials from the storage.
    script = (
        "import optuna, sys; s = optuna.load_study(study_name='tiny', storage=sys.argv[1]); "
        "print(len(s.trials), s.best_value)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, sweep["storage"]], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.split() == ["3", repr(result.best_value)]

    # Running it again continues it: only the missing trial runs, under the same parent run.
    again = _tune(sweep, n_trials=4)
    assert again.states == {"COMPLETE": 4} and again.parent_run_id == result.parent_run_id

    # The same name with another space is refused, naming the difference.
    other = {"params": {**SPACE["params"], "loss.clip": {"type": "float", "low": 0.0, "high": 0.1}}}
    with pytest.raises(ValueError, match=r"exists with another search space: loss.clip: .* absent from the study"):
        with restored_mlflow_uris():
            tune(
                load_search_space(other),
                sweep["data"],
                n_trials=5,
                study_name="tiny",
                out_dir=tmp_path,
                storage=sweep["storage"],
                tracking_uri=sweep["tracking_uri"],
            )


@pytest.mark.slow
def test_a_pruner_stops_trials_after_their_first_epoch(sweep: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import emonet.tuning.study as study_module

    # A real Optuna pruner that prunes any validation mAP below 2, i.e. every trial.
    monkeypatch.setattr(study_module, "make_pruner", lambda name, epochs: optuna.pruners.ThresholdPruner(lower=2.0))
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    # With loader workers: a pruned trial's persistent workers must end with it.
    result = _tune(sweep, n_trials=2, config=load_config(TINY, train={"epochs": 4, "num_workers": 2}))
    assert result.states == {"PRUNED": 2} and result.best_config is None
    left = [c for c in psutil.Process().children(recursive=True) if c.pid not in before and c.is_running()]
    assert not [c for c in left if c.status() != psutil.STATUS_ZOMBIE], f"processes outlived their trials: {left}"
    assert (result.epochs_run, result.epochs_budget) == (2, 8)
    client = MlflowClient(tracking_uri=sweep["tracking_uri"])
    for child in client.search_runs(
        [client.get_experiment_by_name("emonet-tune").experiment_id], "tags.emonet.trial_number != ''"
    ):
        assert (
            child.data.tags[TRIAL_STATE_TAG] == "PRUNED"
            and "pruned at epoch 1" in child.data.tags["emonet.trial_end_reason"]
        )


@pytest.mark.slow
def test_two_worker_processes_share_one_study(sweep: dict) -> None:
    result = _tune(sweep, n_trials=4, workers=2)
    study = optuna.load_study(study_name="tiny", storage=sweep["storage"])
    # The median pruner may stop the fourth trial: pruned trials count towards n_trials.
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 4 <= len(finished) <= 5, "each worker stops once the study has its trials"
    assert len({t.user_attrs["process"] for t in finished}) == 2
    assert len({tuple(sorted(t.params.items())) for t in finished}) == len(finished), "workers draw different values"
    assert result.best_value == pytest.approx(study.best_value)


def test_bad_counts_and_storages_fail_in_one_line(sweep: dict) -> None:
    with pytest.raises(ValueError, match="n_trials must be a whole number >= 1, got 0"):
        _tune(sweep, n_trials=0)
    with pytest.raises(ValueError, match="workers must be a whole number >= 1"):
        _tune(sweep, workers=0)
    with pytest.raises(ValueError, match=r"cannot open the Optuna storage postgresql://emonet:\*\*\*@127.0.0.1:9/x"):
        open_storage("postgresql://emonet:secret@127.0.0.1:9/x")
    with pytest.raises(ValueError, match="storage must be a database URL"):
        open_storage("optuna.db")


def test_a_daemonic_process_is_told_how_to_start_its_workers(sweep: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)  # as in a Dask worker
    with pytest.raises(ValueError, match="DASK_DISTRIBUTED__WORKER__DAEMON=False"):
        _tune(sweep, config=load_config(TINY, train={"num_workers": 2}))
    with pytest.raises(ValueError, match="cannot start the sweep workers"):
        _tune(sweep, workers=2)


def test_processes_creating_a_new_storage_at_once_retry_the_losing_side(monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kwargs):  # another process created the tables between check and create
        calls.append(url)
        if len(calls) < 3:
            raise sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    assert isinstance(open_storage("sqlite:///:memory:"), real) and len(calls) == 3


def _cli(arguments: list[str], sweep: dict) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": sweep["tracking_uri"]}
    return subprocess.Popen(
        [str(EMONET), "tune", *arguments], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for_running_trial(storage: str, process: subprocess.Popen, epochs: int = 1) -> optuna.trial.FrozenTrial:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            study = optuna.load_study(study_name="tiny", storage=storage)
            running = [
                t for t in study.trials if t.state == TrialState.RUNNING and len(t.intermediate_values) >= epochs
            ]
            if running:
                return running[0]
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError("no trial reached its first epoch in 5 minutes")


@pytest.mark.slow
def test_sigterm_ends_the_trial_failed_and_sigkill_is_healed_by_the_heartbeat(sweep: dict, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(load_config(TINY, train={"epochs": 200}).model_dump(mode="json")))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    arguments = [
        "--search", str(space), "--n-trials", "2", "--study-name", "tiny", "--storage", sweep["storage"],
        "--config", str(config), "--data-root", str(sweep["root"]), "--out-dir", str(sweep["out_dir"]),
    ]  # fmt: skip

    stopped = _cli(arguments, sweep)
    trial = _wait_for_running_trial(sweep["storage"], stopped)
    stopped.send_signal(signal.SIGTERM)
    output = stopped.communicate(timeout=60)[0]
    assert stopped.returncode == 1, output
    assert "emonet tune: stopped: sweep stopped (SIGTERM received)" in output and "Traceback" not in output
    study = optuna.load_study(study_name="tiny", storage=sweep["storage"])
    assert study.trials[trial.number].state == TrialState.FAIL
    client = MlflowClient(tracking_uri=sweep["tracking_uri"])
    child = client.get_run(study.trials[trial.number].user_attrs["mlflow_run_id"])
    assert child.info.status == "FAILED" and "SIGTERM received" in child.data.tags["emonet.trial_end_reason"]
    assert client.get_run(study.user_attrs[PARENT_RUN_ATTR]).info.status == "KILLED"

    killed = _cli(arguments, sweep)
    trial = _wait_for_running_trial(sweep["storage"], killed)
    killed.kill()
    killed.wait(timeout=60)
    time.sleep(2.0)  # past the resuming process's grace period: the trial's heartbeat has stopped
    result = _tune(sweep, n_trials=1, config=load_config(TINY), grace_period=1)
    study = optuna.load_study(study_name="tiny", storage=sweep["storage"])
    assert study.trials[trial.number].state == TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == trial.number]
    assert retried and retried[0].params == trial.params and retried[0].state == TrialState.COMPLETE
    assert result.states["COMPLETE"] >= 1
    child = client.get_run(study.trials[trial.number].user_attrs["mlflow_run_id"])
    assert child.info.status == "FAILED" and "no heartbeat" in child.data.tags["emonet.trial_end_reason"]


@pytest.mark.slow
def test_the_flow_sweeps_publishes_its_summary_and_registers_the_best_config(prefect_env, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.tune import emonet_tune

    root = write_fake_archive(tmp_path / "emotic")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    search = tmp_path / "space.yaml"
    search.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    parameters = {
        "search": search, "n_trials": 2, "study_name": "flow", "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "config": config, "epochs": 1, "data_root": root, "out_dir": tmp_path / "tune",
        "register_best": True, "registered_model_name": "emonet-tuned",
    }  # fmt: skip
    with restored_mlflow_uris():
        result = emonet_tune(**emonet_tune.validate_parameters(parameters))
    assert result.states == {"COMPLETE": 2} and result.best_config == tmp_path / "tune" / "best_config.yaml"
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["emonet-sweep-summary"]))
        )
    assert "# Sweep `flow`" in artifact.data and f"validation mAP {result.best_value:.4f}" in artifact.data
    # register_best: the training flow took best_config.yaml unchanged, with its full epochs.
    registry = MlflowClient(tracking_uri=prefect_env["tracking_uri"])
    version = registry.get_model_version_by_alias("emonet-tuned", "champion")
    trained = registry.get_run(version.run_id)
    assert trained.data.params["epochs"] == "2" and float(trained.data.params["lr"]) == pytest.approx(
        result.best_params["train.lr"]
    )
