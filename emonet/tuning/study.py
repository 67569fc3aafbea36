"""Sweeps over the recipe: an Optuna study whose trials train through the library's
:func:`~emonet.training.trainer.fit`, each tracked as a child MLflow run of the study's
parent run, pruned on validation mAP, stored in an RDB so that it resumes and runs on
several processes or machines at once.

Selection happens on validation only: a sweep reads the train and validation splits
and never the test split. Its one data step, normalizing valence and arousal, runs
once per study (:func:`prepare_sweep_data`); face visibility is not needed, as a sweep
filters no row by it.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from mlflow import MlflowClient
from mlflow.entities import Param as MlflowParam
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from optuna.trial import TrialState

from emonet.config import EmoNetConfig, config_to_dict, load_config
from emonet.data.annotations import load_annotations
from emonet.data.normalize import normalize_frames
from emonet.models.network import check_pretrained_weights
from emonet.schema import annotations_path, arrays_dir
from emonet.tracking.run_logging import configure_mlflow, log_metrics
from emonet.training.trainer import MONITOR, train_from_csvs
from emonet.tuning.space import SearchSpace, apply_params, load_search_space
from emonet.utils.io import atomic_open
from emonet.utils.stopping import TrainingStopped, stop_on_signals
from emonet.utils.store import default_tracking_uri, sqlite_path, without_password

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "PRUNERS",
    "STORAGE_ENV",
    "SweepData",
    "TuneResult",
    "default_storage_url",
    "make_pruner",
    "open_storage",
    "open_study",
    "prepare_sweep_data",
    "tune",
]

DEFAULT_EXPERIMENT = "emonet-tune"
PRUNERS = ("median", "hyperband", "none")
# The storage URL every sweep uses when none is given, e.g. the shared PostgreSQL database.
STORAGE_ENV = "EMONET_OPTUNA_STORAGE"
Pruner = Literal["median", "hyperband", "none"]
# A trial's process records a heartbeat this often (s); a RUNNING trial whose last one is
# older than the grace period belongs to a killed process: the next process of the study
# marks it failed and queues its parameters again (once).
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 60
MAX_STALE_RETRIES = 1
# Attempts to open a storage whose tables another process is creating at the same moment.
SCHEMA_RACE_RETRIES = 4
# What a study records in its user attributes.
SPACE_ATTR = "emonet.search_space"
PARENT_RUN_ATTR = "emonet.mlflow_parent_run_id"
EXPERIMENT_ATTR = "emonet.mlflow_experiment_id"
# The MLflow tags of a trial's child run.
TRIAL_STATE_TAG = "emonet.trial_state"
STUDY_TAG = "emonet.study_name"
TRIAL_NUMBER_TAG = "emonet.trial_number"
BEST_CONFIG_FILE = "best_config.yaml"


@dataclass(frozen=True)
class SweepData:
    """The normalized train and validation CSVs every trial of a study reads, and the crops."""

    train_csv: Path
    val_csv: Path
    img_dir: Path


@dataclass(frozen=True)
class TuneResult:
    """What a sweep found: the study's best trial so far and how its trials ended."""

    study_name: str
    storage: str  # the URL, without a password
    parent_run_id: str
    best_value: float | None  # the best trial's validation mAP (scikit-learn AP)
    best_params: dict[str, Any]
    best_trial: int | None
    best_config: Path | None  # best_config.yaml, the training flow's `config`
    states: dict[str, int] = field(default_factory=dict)  # trials by state, e.g. {"COMPLETE": 8, "PRUNED": 4}
    epochs_run: int = 0  # epochs the study's finished trials trained
    epochs_budget: int = 0  # epochs they would have trained without pruning


def default_storage_url(tracking_uri: str | None = None) -> str:
    """``$EMONET_OPTUNA_STORAGE`` when set (the team's PostgreSQL: ``make servers`` prints
    it); else Optuna's SQLite file beside the MLflow store (``optuna.db`` next to
    ``mlflow.db``), and for a tracking server ``mlruns/optuna.db`` of this checkout."""
    shared = os.environ.get(STORAGE_ENV, "").strip()
    if shared:
        return shared
    db = sqlite_path(tracking_uri or default_tracking_uri())
    if db is None:
        db = sqlite_path(default_tracking_uri())
    assert db is not None
    return f"sqlite:///{db.resolve().parent / 'optuna.db'}"


def open_storage(
    url: str, heartbeat_interval: int = HEARTBEAT_INTERVAL_S, grace_period: int = HEARTBEAT_GRACE_S
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at ``url`` (SQLite, PostgreSQL, MySQL), with heartbeats.

    Raises ValueError in one line, naming the URL (its password hidden), when the
    storage cannot be opened."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"storage must be a database URL such as sqlite:///optuna.db, got {url!r}")
    db = sqlite_path(url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            with warnings.catch_warnings():  # the heartbeat is experimental in Optuna 5.0 (and has been since 2.9)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_STALE_RETRIES
                    ),
                )
        except Exception as error:  # SQLAlchemy's and the driver's errors, by many names
            # Processes that start together on a new database (several hosts, Dask workers)
            # race to create its tables and record their version: the loser sees "table ...
            # already exists" or a unique constraint fail, and finds them a moment later.
            raced = any(sign in str(error) for sign in ("already exists", "UNIQUE constraint", "duplicate key"))
            if raced and attempt < SCHEMA_RACE_RETRIES:
                time.sleep(0.5 * (attempt + 1))
                continue
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"cannot open the Optuna storage {without_password(url)}: {reason}") from None
    raise AssertionError("unreachable")


def make_pruner(name: Pruner, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner of a sweep whose trials train ``epochs`` epochs.

    ``median`` (default): after 3 finished trials, a trial whose best validation mAP so
    far is below the median of the earlier trials at the same epoch stops (never in its
    first epoch). ``hyperband``: Optuna's Hyperband over 1..``epochs`` epochs. ``none``
    trains every trial to the end."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner must be one of {', '.join(PRUNERS)}, got {name!r}")


def prepare_sweep_data(data_root: str | Path, out_dir: str | Path) -> SweepData:
    """Normalize the archive's train and validation splits into ``out_dir``, once.

    The test split is never opened. Valence and arousal are mapped from 1..10 to [-1, 1]
    as the training flow does by default; it takes milliseconds, so it runs once per call."""
    root, out = Path(data_root), Path(out_dir)
    frames = {split: load_annotations(annotations_path(root, split)) for split in ("train", "val")}
    normalized, _, _ = normalize_frames(frames)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, frame in normalized.items():
        path = out / f"normalized_dataset_{split}.csv"
        with atomic_open(path, "w", newline="") as handle:
            frame.to_csv(handle, index=False)
        paths[split] = path
    return SweepData(paths["train"], paths["val"], arrays_dir(root))


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    space: SearchSpace,
    *,
    seed: int = 0,
    pruner: optuna.pruners.BasePruner | None = None,
) -> tuple[optuna.Study, bool]:
    """Create the study ``name`` in ``storage``, or load it; returns it and whether it is new.

    A seeded TPE sampler draws the parameters. An existing study must have been created
    with the same search space: another one is refused, naming the entries that differ.
    """
    sampler = optuna.samplers.TPESampler(seed=seed)
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", sampler=sampler, pruner=pruner
        )
        study.set_user_attr(SPACE_ATTR, space.as_dict())
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)
    recorded = study.user_attrs.get(SPACE_ATTR)
    if recorded is None:
        raise ValueError(f"study {name!r} exists but was not created by emonet tune (it records no search space)")
    differences = space.differences(load_search_space(recorded))
    if differences:
        raise ValueError(
            f"study {name!r} exists with another search space: "
            + "; ".join(differences)
            + " (choose another --study-name, or the study's own space)"
        )
    return study, False


class _TrialStopped(Exception):
    """A stop request (SIGTERM, SIGINT) ended a trial: an ``Exception``, so that Optuna
    marks the trial failed, before it is raised again as :class:`TrainingStopped`."""


@dataclass(frozen=True)
class _Sweep:
    """Everything a process running trials needs, in plain values (sent to worker processes)."""

    study_name: str
    storage_url: str
    space: SearchSpace
    trial_config: dict[str, Any]  # the base config with the sweep's epochs
    data: SweepData
    n_trials: int
    pruner: Pruner
    seed: int
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    grace_period: int
    torch_threads: int | None = None


def _end_child(client: MlflowClient, run_id: str, state: str, reason: str | None = None) -> None:
    """Close a trial's child run: FINISHED when complete or pruned, FAILED otherwise."""
    tags = {TRIAL_STATE_TAG: state}
    if reason:
        tags["emonet.trial_end_reason"] = reason[:5000]
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status="FINISHED" if state in ("COMPLETE", "PRUNED") else "FAILED")


def _objective(trial: optuna.Trial, sweep: _Sweep, client: MlflowClient) -> float:
    """Train the trial's config, report validation mAP after every epoch, prune on it."""
    values = sweep.space.suggest(trial)
    config = apply_params(load_config(sweep.trial_config), values)
    run = client.create_run(
        sweep.experiment_id,
        run_name=f"{sweep.study_name}-trial-{trial.number}",
        tags={
            MLFLOW_PARENT_RUN_ID: sweep.parent_run_id,
            STUDY_TAG: sweep.study_name,
            TRIAL_NUMBER_TAG: str(trial.number),
            TRIAL_STATE_TAG: "RUNNING",
        },
    )
    run_id = run.info.run_id
    trial.set_user_attr("mlflow_run_id", run_id)
    trial.set_user_attr("process", f"{socket.gethostname()}:{os.getpid()}")  # who ran it, for several workers
    flat = {
        f"{section}.{key}": value for section, fields in config_to_dict(config).items() for key, value in fields.items()
    }
    # One write for the whole config: a call per field costs a database transaction each.
    client.log_batch(
        run_id, params=[MlflowParam(key, str(value)) for key, value in {**flat, "trial_number": trial.number}.items()]
    )

    def on_epoch(metrics: dict[str, float]) -> None:
        epoch = int(metrics["epoch"])
        log_metrics(client, run_id, metrics, step=epoch)
        trial.set_user_attr("epochs_run", epoch)
        trial.report(metrics[MONITOR], step=epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: val mAP {metrics[MONITOR]:.4f}")

    try:
        result = train_from_csvs(
            sweep.data.train_csv, sweep.data.val_csv, sweep.data.img_dir, config, callbacks=[on_epoch], progress=False
        )
    except optuna.TrialPruned as pruned:
        _end_child(client, run_id, "PRUNED", str(pruned))
        logger.info("trial %d %s", trial.number, pruned)
        raise
    except TrainingStopped as stopped:
        _end_child(client, run_id, "FAIL", str(stopped))
        raise _TrialStopped(stopped.reason) from stopped
    except BaseException as error:
        _end_child(client, run_id, "FAIL", f"{type(error).__name__}: {error}")
        raise
    best = result.history[result.best_epoch - 1]
    trial.set_user_attr("val_mAP_voc11", float(best.get("val_mAP_voc11", math.nan)))
    log_metrics(client, run_id, {"best_val_mAP": result.best_metric, "best_epoch": result.best_epoch})
    _end_child(client, run_id, "COMPLETE")
    logger.info(
        "trial %d complete: val mAP %.4f at epoch %d with %s",
        trial.number,
        result.best_metric,
        result.best_epoch,
        ", ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in values.items()
        ),
    )
    return float(result.best_metric)


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _run_trials(sweep: _Sweep, worker: int = 0) -> None:
    """Run trials of the study until it has ``n_trials`` complete or pruned ones.

    Each process has its own sampler seed (``seed + worker``), so that processes starting
    together do not draw the same first parameters."""
    if sweep.torch_threads is not None:
        import torch

        torch.set_num_threads(sweep.torch_threads)
    # Each trial's end is logged here (emonet.tuning.study); Optuna's own lines would repeat
    # it, with a traceback for a trial that a stop request ended.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(sweep.storage_url, grace_period=sweep.grace_period)
    study = optuna.load_study(
        study_name=sweep.study_name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=sweep.seed + worker),
        pruner=make_pruner(sweep.pruner, int(sweep.trial_config["train"]["epochs"])),
    )
    if _finished(study) >= sweep.n_trials:
        return
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    enough = optuna.study.MaxTrialsCallback(sweep.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    with stop_on_signals():
        try:
            study.optimize(lambda trial: _objective(trial, sweep, client), callbacks=[enough], gc_after_trial=True)
        except _TrialStopped as stopped:
            reason = str(stopped)
            raise TrainingStopped(reason, f"sweep stopped ({reason}); the trial it ended is marked failed") from None


def _worker_main(sweep: _Sweep, worker: int) -> None:
    """A worker process's body (multiprocessing target)."""
    logging.basicConfig(level=logging.WARNING)
    _run_trials(sweep, worker)


def _check_counts(n_trials: int, workers: int, epochs: int | None) -> None:
    for name, value in (("n_trials", n_trials), ("workers", workers), ("epochs", epochs)):
        if value is None and name == "epochs":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def _check_can_start_processes(workers: int, loader_workers: int) -> None:
    """A daemonic process (a Dask worker's, by default) may not start processes: say so
    before any trial, rather than fail in the first DataLoader."""
    if multiprocessing.current_process().daemon and (workers > 1 or loader_workers > 0):
        raise ValueError(
            f"this sweep runs in a daemonic process (a Dask worker, say), which cannot start the "
            f"{'sweep workers' if workers > 1 else f'{loader_workers} DataLoader workers (train.num_workers)'} "
            "it needs: start the Dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False "
            "(dask.config 'distributed.worker.daemon': False), or use workers=1 and train.num_workers 0"
        )


def _parent_run(
    client: MlflowClient,
    study: optuna.Study,
    new: bool,
    experiment_id: str,
    space: SearchSpace,
    rdb: optuna.storages.BaseStorage,
    storage_url: str,
) -> str:
    """The study's parent MLflow run: created with a new study, reopened with an existing one."""
    if new:
        run = client.create_run(
            experiment_id,
            run_name=study.study_name,
            tags={
                STUDY_TAG: study.study_name,
                "emonet.optuna_storage": without_password(storage_url),
                MLFLOW_RUN_NAME: study.study_name,
            },
        )
        client.log_dict(run.info.run_id, space.as_dict(), "search_space.yaml")
        study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
        study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
        return run.info.run_id
    # A process that created the study a moment ago may not have recorded its run yet.
    for _ in range(60):
        run_id = optuna.load_study(study_name=study.study_name, storage=rdb).user_attrs.get(PARENT_RUN_ATTR)
        if run_id:
            client.update_run(run_id, status="RUNNING")
            return run_id
        time.sleep(0.5)
    raise ValueError(f"study {study.study_name!r} records no MLflow parent run: was it created by emonet tune?")


def tune(
    space: SearchSpace,
    data: SweepData,
    *,
    n_trials: int,
    study_name: str,
    out_dir: str | Path,
    storage: str | None = None,
    config: EmoNetConfig | None = None,
    epochs: int | None = None,
    pruner: Pruner = "median",
    seed: int = 0,
    workers: int = 1,
    tracking_uri: str | None = None,
    experiment_name: str = DEFAULT_EXPERIMENT,
    grace_period: int = HEARTBEAT_GRACE_S,
) -> TuneResult:
    """Run (or continue) the Optuna study ``study_name`` until it has ``n_trials``
    complete or pruned trials, and write the best trial's config.

    Each trial trains ``config`` (default: the library's) with the trial's values of
    ``space`` and ``epochs`` epochs (default: the config's), and is scored by its best
    validation mAP (scikit-learn AP; the 11-point AP is logged beside it). The study
    lives in ``storage`` (default: :func:`default_storage_url`); running it again
    continues it, without repeating finished trials, and a trial whose process was
    killed is marked failed by the heartbeat and its parameters tried again. ``workers``
    processes run trials at once, each with its share of the cores; more processes or
    machines may join the same study with the same arguments.

    In MLflow (``experiment_name`` in ``tracking_uri``) the study is one parent run (its
    search space, best value and parameters, Optuna's history and importance plots,
    ``best_config.yaml``) with one child run per trial (its parameters, per-epoch metrics
    and the trial's state as ``emonet.trial_state``).

    Raises
    ------
    ValueError : a count below 1, a storage that cannot be opened, a study of that name
        with another search space.
    emonet.utils.stopping.TrainingStopped : SIGTERM or SIGINT during a trial; that trial
        is marked failed and the study stays consistent: running it again continues it.
    """
    _check_counts(n_trials, workers, epochs)
    base = config or EmoNetConfig()
    trial_config = load_config(base, train={"epochs": epochs}) if epochs is not None else base
    _check_can_start_processes(workers, trial_config.train.num_workers)
    check_pretrained_weights(trial_config.model)  # before the study and its data work
    storage_url = storage or default_storage_url(tracking_uri)
    rdb = open_storage(storage_url, grace_period=grace_period)
    tracking_uri = tracking_uri or default_tracking_uri()
    experiment_id = configure_mlflow(tracking_uri, experiment_name)
    client = MlflowClient(tracking_uri=tracking_uri)
    pruner_object = make_pruner(pruner, trial_config.train.epochs)
    study, new = open_study(rdb, study_name, space, seed=seed, pruner=pruner_object)
    parent_run_id = _parent_run(client, study, new, experiment_id, space, rdb, storage_url)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    sweep = _Sweep(
        study_name=study_name,
        storage_url=storage_url,
        space=space,
        trial_config=config_to_dict(trial_config),
        data=data,
        n_trials=n_trials,
        pruner=pruner,
        seed=seed,
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        grace_period=grace_period,
        torch_threads=max(1, cores // workers) if workers > 1 else None,
    )
    status = "FAILED"
    try:
        _run_in_processes(sweep, workers)
        status = "FINISHED"
    except TrainingStopped:
        status = "KILLED"
        raise
    finally:
        result = _summarize(study_name, rdb, client, parent_run_id, base, trial_config, Path(out_dir), storage_url)
        client.set_terminated(parent_run_id, status=status)
    return result


def _run_in_processes(sweep: _Sweep, workers: int) -> None:
    """Run trials here (one worker) or in ``workers`` processes; a worker's failure is raised."""
    if workers == 1:
        _run_trials(sweep)
        return
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker_main, args=(sweep, index), name=f"emonet-tune-{index}")
        for index in range(workers)
    ]
    for process in processes:
        process.start()
    with stop_on_signals():
        # A stop request reaches the workers too (the process group's signal); they end
        # their trials as failed and exit, and this process waits for them.
        for process in processes:
            process.join()
    failed = [p for p in processes if p.exitcode != 0]
    if failed:
        codes = ", ".join(f"{p.name}: exit code {p.exitcode}" for p in failed)
        raise RuntimeError(f"sweep workers failed ({codes}); the study is consistent: run it again to continue")


def _summarize(
    study_name: str,
    rdb: optuna.storages.BaseStorage,
    client: MlflowClient,
    parent_run_id: str,
    base: EmoNetConfig,
    trial_config: EmoNetConfig,
    out_dir: Path,
    storage_url: str,
) -> TuneResult:
    """The study's state on its parent run: best value and parameters, plots, best_config.yaml."""
    study = optuna.load_study(study_name=study_name, storage=rdb)
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for trial in trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    _close_runs_of_failed_trials(client, trials)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    epochs_run = sum(int(t.user_attrs.get("epochs_run", 0)) for t in finished)
    budget = len(finished) * trial_config.train.epochs
    log_metrics(
        client,
        parent_run_id,
        {"trials_finished": len(finished), "epochs_run": epochs_run, "epochs_budget": budget},
        step=len(finished),
    )
    for state, count in states.items():
        client.set_tag(parent_run_id, f"emonet.trials_{state.lower()}", str(count))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return TuneResult(
            study_name, without_password(storage_url), parent_run_id, None, {}, None, None, states, epochs_run, budget
        )
    best = study.best_trial
    best_config = apply_params(base, best.params)  # the full recipe's epochs, not the sweep's
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BEST_CONFIG_FILE
    with atomic_open(path, "w") as handle:
        handle.write(f"# The best trial ({best.number}) of study {study_name!r}: validation mAP {best.value:.4f}\n")
        yaml.safe_dump(config_to_dict(best_config), handle, sort_keys=False)
    client.log_artifact(parent_run_id, str(path))
    log_metrics(client, parent_run_id, {"best_val_mAP": best.value, "best_trial": best.number}, step=len(finished))
    for key, value in best.params.items():
        client.set_tag(parent_run_id, f"best.{key}", str(value))
    _log_plots(client, parent_run_id, study, len(complete))
    return TuneResult(
        study_name,
        without_password(storage_url),
        parent_run_id,
        float(best.value),
        dict(best.params),
        best.number,
        path,
        states,
        epochs_run,
        budget,
    )


def _close_runs_of_failed_trials(client: MlflowClient, trials: list[optuna.trial.FrozenTrial]) -> None:
    """Child runs left RUNNING by a killed process, closed as their failed trials."""
    for trial in trials:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if trial.state == TrialState.FAIL and run_id:
            run = client.get_run(run_id)
            if run.info.status == "RUNNING":
                _end_child(client, run_id, "FAIL", "its process died (no heartbeat)")


def _log_plots(client: MlflowClient, run_id: str, study: optuna.Study, n_complete: int) -> None:
    """Optuna's optimization history and, with two complete trials or more, parameter importances."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.ticker import MaxNLocator
    from optuna.visualization import matplotlib as optuna_plots

    from emonet.utils.io import save_figure_atomic

    target = "validation mAP (scikit-learn AP)"  # the objective by name, not Optuna's "Objective Value"
    plots: dict[str, Callable[[optuna.Study], Any]] = {
        "optimization_history.png": functools.partial(optuna_plots.plot_optimization_history, target_name=target)
    }
    if n_complete >= 2 and len(study.best_trial.params) >= 1:
        plots["param_importances.png"] = functools.partial(optuna_plots.plot_param_importances, target_name=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        with tempfile.TemporaryDirectory() as folder:
            for name, plot in plots.items():
                try:
                    ax = plot(study)
                except (ValueError, RuntimeError, ZeroDivisionError) as error:
                    logger.warning("no %s: %s", name, error)
                    continue
                figure = ax.figure if hasattr(ax, "figure") else ax[0].figure
                figure.set_size_inches(9, 5)  # room for the legend Optuna puts beside the axes
                if name == "optimization_history.png":
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
                save_figure_atomic(figure, Path(folder) / name)
                client.log_artifact(run_id, str(Path(folder) / name), "plots")


def describe_result(result: TuneResult) -> str:
    """What ``emonet tune`` prints: how the trials ended, the best one, where to look."""
    states = ", ".join(f"{count} {state.lower()}" for state, count in sorted(result.states.items())) or "none"
    saved = 1.0 - result.epochs_run / result.epochs_budget if result.epochs_budget else 0.0
    lines = [
        f"study {result.study_name!r} in {result.storage}: trials {states}",
        f"epochs trained {result.epochs_run} of {result.epochs_budget} ({saved:.0%} saved by pruning)",
    ]
    if result.best_config is None:
        lines.append("no trial completed yet: run the same command again to continue the study")
    else:
        params = ", ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in result.best_params.items()
        )
        lines += [
            f"best: trial {result.best_trial}, validation mAP {result.best_value:.4f} (scikit-learn AP) with {params}",
            f"best config: {result.best_config}",
            f"train and register it: python -m flows.training_pipeline --config {result.best_config} [--data-root DIR]",
        ]
    lines.append(f"MLflow: parent run {result.parent_run_id} (a child run per trial)")
    return "\n".join(lines)
