"""Prefect tasks of the sweep flow: the Optuna study (through the library's
:func:`emonet.tuning.study.tune`) and its summary artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from emonet.config import EmoNetConfig
from emonet.tuning.space import SearchSpace
from emonet.tuning.study import Pruner, SweepData, TuneResult, prepare_sweep_data, tune
from tasks.tracking import NOT_CACHED

SWEEP_SUMMARY_KEY = "emonet-sweep-summary"


@task(name="prepare-sweep-data", **NOT_CACHED)
def prepare_data(data_root: Path, out_dir: Path) -> SweepData:
    """The train and validation splits, normalized once for every trial (the test split is never read)."""
    return prepare_sweep_data(data_root, out_dir)


@task(name="run-sweep", **NOT_CACHED)
def run_sweep(
    *,
    space: SearchSpace,
    data: SweepData,
    config: EmoNetConfig,
    n_trials: int,
    study_name: str,
    storage: str | None,
    epochs: int | None,
    pruner: Pruner,
    seed: int,
    workers: int,
    out_dir: Path,
    tracking_uri: str | None,
    experiment_name: str,
) -> TuneResult:
    """Run or continue the study; no retries: a rerun of the flow continues the study anyway."""
    return tune(
        space,
        data,
        n_trials=n_trials,
        study_name=study_name,
        out_dir=out_dir,
        storage=storage,
        config=config,
        epochs=epochs,
        pruner=pruner,
        seed=seed,
        workers=workers,
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
    )


@task(name="publish-sweep-summary", **NOT_CACHED)
def publish_summary(result: TuneResult) -> None:
    """The study's trials by state and its best trial, as a markdown artifact of the flow run."""
    rows = "\n".join(f"| {state.lower()} | {count} |" for state, count in sorted(result.states.items()))
    best = (
        f"**Best:** trial {result.best_trial}, validation mAP {result.best_value:.4f} (scikit-learn AP)\n\n"
        + "\n".join(f"- `{key}` = {value}" for key, value in result.best_params.items())
        + f"\n\nBest config: `{result.best_config}`"
        if result.best_config is not None
        else "No trial has completed yet: run the flow again to continue the study."
    )
    create_markdown_artifact(
        key=SWEEP_SUMMARY_KEY,
        markdown=(
            f"# Sweep `{result.study_name}`\n\n"
            f"Storage `{result.storage}`, MLflow parent run `{result.parent_run_id}`\n\n"
            f"| trials | count |\n| --- | --- |\n{rows}\n\n"
            f"Epochs trained: {result.epochs_run} of {result.epochs_budget} without pruning\n\n{best}\n"
        ),
        description=f"Optuna study {result.study_name}",
    )
