"""Prefect task for the review step: the visual review of the test split from the
evaluation's predictions, logged to the run beside the evaluation."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import task

from emonet.reports.evaluation import EvaluationReport
from emonet.reports.review import review_predictions
from tasks.tracking import NOT_CACHED, TRACKING_RETRIES


@task(name="review-predictions", **TRACKING_RETRIES, **NOT_CACHED)
def review_model(
    *,
    run_id: str,
    checkpoint: Path,
    evaluation: EvaluationReport,
    test_csv: Path,
    img_dir: Path,
    out_dir: Path,
    num_samples: int = 24,
    detailed_samples: int = 6,
) -> Path:
    """The visual review of the test split (worst predictions first), from the evaluation's
    predictions and linking its report, without loading ``checkpoint`` again (it names the
    model on the page); it goes to the run's ``review/`` artifacts, beside
    ``evaluation/``, so the page's links resolve in MLflow too."""
    review_predictions(
        evaluation.predictions,
        test_csv,
        img_dir,
        out_dir,
        thresholds=evaluation.thresholds,
        normalizer=evaluation.normalizer,
        model_name=str(checkpoint),
        num_samples=num_samples,
        detailed_samples=detailed_samples,
        sort_by="worst",
        progress=False,
        split_report=evaluation.files,
        intervals=evaluation.intervals,
    )
    MlflowClient().log_artifacts(run_id, str(out_dir), "review")
    return Path(out_dir) / "index.html"
