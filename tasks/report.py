"""What a Prefect UI user sees of a training run: a progress artifact updated every epoch,
and a markdown artifact with the test metrics, the per-emotion table, the promotion
decision and where the model and its MLflow run are."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlparse

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from emonet.metrics import EVALUATION_KEYS
from emonet.registry import PromotionDecision

SUMMARY_ARTIFACT_KEY = "emonet-training-summary"


def _fmt(value: Any, spec: str = ".4f") -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return format(value, spec)
    return "n/a"


class EpochProgress:
    """A training callback that shows the run's progress as a Prefect progress artifact.

    The artifact (in the flow run's Artifacts tab) moves from 0 to 100 % as epochs end,
    and its description names the last epoch and its validation mAP.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.artifact_id = create_progress_artifact(
            progress=0.0, key="emonet-training-progress", description=f"training: 0 of {epochs} epochs"
        )

    def __call__(self, metrics: dict[str, float]) -> None:
        epoch = int(metrics["epoch"])
        update_progress_artifact(
            self.artifact_id,
            progress=100.0 * epoch / self.epochs,
            description=f"epoch {epoch}/{self.epochs}: train loss {_fmt(metrics.get('train_loss'))}, "
            f"val mAP {_fmt(metrics.get('val_mAP'))}",
        )


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI when the tracking store is an HTTP server, else None."""
    if urlparse(tracking_uri).scheme not in {"http", "https"}:
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def summary_markdown(summary: dict[str, Any], per_emotion: pd.DataFrame, registration: PromotionDecision) -> str:
    """The run summary as markdown (tables render in the Prefect UI's Artifacts tab)."""
    metrics = summary["test_metrics"]
    lines = ["# EmoNet training run", "", "## Test metrics", "", "| metric | value |", "| --- | --- |"]
    keys = [key for key in EVALUATION_KEYS if key in metrics] + [key for key in metrics if key not in EVALUATION_KEYS]
    # Row counts (n_emotion, n_affect) are whole numbers.
    lines += [f"| {key} | {_fmt(metrics[key], '.0f' if key.startswith('n_') else '.4f')} |" for key in keys]
    previous = registration.previous_version
    lines += [
        "",
        "## Model registry",
        "",
        f"- Registered model: `{summary['registered_model']}`, version **{registration.version}**, "
        f"alias **{registration.alias}**",
        f"- Promotion decision: **{registration.decision}**: {registration.reason}",
        f"- Test mAP: candidate {_fmt(registration.new_map)}, champion before "
        + (f"(version {previous}) {_fmt(registration.previous_map)}" if previous else "none"),
        f"- Load it: `mlflow.pyfunc.load_model(\"models:/{summary['registered_model']}@{registration.alias}\")`",
        "",
        "## MLflow",
        "",
    ]
    link = summary.get("mlflow_run_link")
    run = f"[{summary['mlflow_run_id']}]({link})" if link else f"`{summary['mlflow_run_id']}`"
    lines += [f"- Run: {run}", f"- Tracking URI: `{summary['tracking_uri']}`", f"- Review: `{summary['review']}`", ""]
    lines += ["## Per emotion (test)", "", "| emotion | AP | precision | recall | F1 | support | threshold |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for emotion, row in per_emotion.iterrows():
        lines.append(
            f"| {emotion} | {_fmt(row['average_precision'], '.3f')} | {_fmt(row['precision'], '.3f')} | "
            f"{_fmt(row['recall'], '.3f')} | {_fmt(row['f1'], '.3f')} | {int(row['support'])} | "
            f"{_fmt(row['threshold'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


@task(name="publish-run-summary", cache_policy=NO_CACHE)
def publish_run_summary(*, summary: dict[str, Any], per_emotion: pd.DataFrame, registration: PromotionDecision) -> str:
    """Create the run's markdown artifact; returns its id."""
    artifact_id = create_markdown_artifact(
        markdown=summary_markdown(summary, per_emotion, registration),
        key=SUMMARY_ARTIFACT_KEY,
        description=f"test mAP {_fmt(summary['test_mAP'])}; {summary['registered_model']} "
        f"v{registration.version} ({registration.decision})",
    )
    return str(artifact_id)
