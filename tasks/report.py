"""What a Prefect UI user sees of a training run: a progress artifact updated every epoch,
and a markdown artifact with the test metrics and their intervals, the benchmark's
headline row, the per-emotion table, the promotion decision and where the model and its
MLflow run are (or, when training was skipped, why)."""

from __future__ import annotations

from urllib.parse import urlparse

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from emonet.metrics import EVALUATION_KEYS, format_metric
from emonet.metrics.bootstrap import AFFECT_BOOTSTRAP_METRICS, BootstrapInterval
from emonet.reports.benchmark import PROTOCOL_SKLEARN, PROTOCOL_VOC11
from emonet.reports.evaluation import EvaluationReport
from emonet.tracking.registry import PromotionDecision, describe_difference
from tasks.summary import RunSummary, promotion_explanation

SUMMARY_ARTIFACT_KEY = "emonet-training-summary"


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
            description=f"epoch {epoch}/{self.epochs}: train loss {format_metric(metrics.get('train_loss'))}, "
            f"val mAP {format_metric(metrics.get('val_mAP'))}",
        )


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI when the tracking store is an HTTP server, else None."""
    if urlparse(tracking_uri).scheme not in {"http", "https"}:
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _interval(interval: BootstrapInterval | None, spec: str = ".4f") -> str:
    return interval.bounds(spec) if interval is not None else ""


def _run_reference(summary: RunSummary) -> str:
    """The MLflow run id, as a link to its page where the store has one."""
    link = summary.mlflow_run_link
    return f"[{summary.mlflow_run_id}]({link})" if link else f"`{summary.mlflow_run_id}`"


def summary_markdown(summary: RunSummary, evaluation: EvaluationReport) -> str:
    """The run summary as markdown (tables render in the Prefect UI's Artifacts tab)."""
    metrics, intervals = summary.test_metrics, evaluation.intervals
    confidence = intervals["mAP"].confidence
    lines = [
        "# EmoNet training run",
        "",
        "## Test metrics",
        "",
        f"`mAP` is scikit-learn's AP ({PROTOCOL_SKLEARN}); `mAP_voc11` the EMOTIC authors' "
        f"({PROTOCOL_VOC11}). Intervals: {100 * confidence:g}% bootstrap over the test rows "
        f"({intervals['mAP'].n_resamples} resamples).",
        "",
        f"| metric | value | {100 * confidence:g}% interval |",
        "| --- | --- | --- |",
    ]
    keys = [key for key in EVALUATION_KEYS if key in metrics] + [key for key in metrics if key not in EVALUATION_KEYS]
    # Row counts (n_emotion, n_affect) are whole numbers.
    lines += [
        f"| {key} | {format_metric(metrics[key], '.0f' if key.startswith('n_') else '.4f')} | "
        f"{_interval(intervals.get(key))} |"
        for key in keys
    ]
    lines += ["", "## Benchmark (test split)", "", *_benchmark_headline(evaluation), ""]
    lines += _registry_lines(summary, evaluation)
    lines += ["## MLflow", ""]
    lines += [
        f"- Run: {_run_reference(summary)}",
        f"- Tracking URI: `{summary.tracking_uri}`",
        f"- Review: `{summary.review}`",
        "",
    ]
    lines += [
        "## Per emotion (test)",
        "",
        "| emotion | AP (scikit-learn) | AP (11-point) | precision | recall | F1 | support | threshold |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for emotion, row in evaluation.per_emotion.iterrows():
        lines.append(
            f"| {emotion} | {format_metric(row['average_precision'], '.3f')} | "
            f"{format_metric(row['average_precision_voc11'], '.3f')} | "
            f"{format_metric(row['precision'], '.3f')} | {format_metric(row['recall'], '.3f')} | "
            f"{format_metric(row['f1'], '.3f')} | "
            f"{int(row['support'])} | {format_metric(row['threshold'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def _benchmark_headline(evaluation: EvaluationReport) -> list[str]:
    """The benchmark table's headline row (this model), and where the whole table is."""
    intervals = evaluation.intervals
    affect = [intervals[key].describe(".3f") if key in intervals else "n/a" for key in AFFECT_BOOTSTRAP_METRICS]
    return [
        "| model | mAP, scikit-learn AP (%) | mAP, 11-point AP (%) | valence MAE (1-10) | arousal MAE (1-10) |",
        "| --- | --- | --- | --- | --- |",
        f"| {evaluation.benchmark.model} | {intervals['mAP'].describe('.2f', scale=100)} | "
        f"{intervals['mAP_voc11'].describe('.2f', scale=100)} | "
        f"{affect[0]} | {affect[1]} |",
        "",
        "The whole table (per emotion under both protocols, and the published results, each with its AP "
        "protocol) is the run's `evaluation/benchmark.md` artifact. Set a published mAP only beside the "
        "mAP of the same protocol.",
    ]


def _decision_lines(registration: PromotionDecision) -> list[str]:
    """The promotion decision and its split, explained by ``PromotionDecision.explain()``
    (as a quote, a paragraph per line) where the registry has it, else with its reason."""
    headline = f"- Promotion decision: **{registration.decision}**, on the **{registration.split}** split"
    explanation = promotion_explanation(registration)
    if explanation is None:
        return [f"{headline}: {registration.reason}"]
    quoted = "\n>\n".join(f"> {line}".rstrip() for line in explanation.strip().splitlines())
    return [f"{headline}:", "", quoted, ""]


def _registry_lines(summary: RunSummary, evaluation: EvaluationReport) -> list[str]:
    """The promotion: the decision, its split and interval, and both versions' validation and test mAP."""
    registration = summary.registration
    previous = registration.previous_version
    lines = [
        "## Model registry",
        "",
        f"- Registered model: `{summary.registered_model}`, version **{registration.version}**, "
        f"alias **{registration.alias}**",
        *_decision_lines(registration),
    ]
    if registration.difference is not None:
        lines.append(f"- mAP difference (candidate - champion): {describe_difference(registration.difference)}")
    validation = evaluation.validation
    lines += [
        "",
        "| version | validation mAP | test mAP |",
        "| --- | --- | --- |",
        f"| this run (v{registration.version}) | {format_metric(validation.metrics['mAP']) if validation else 'n/a'} | "
        f"{format_metric(evaluation.metrics['mAP'])} {_interval(evaluation.intervals['mAP'])} |",
    ]
    if previous:
        lines.append(
            f"| champion before (v{previous}) | {format_metric(registration.previous_maps.get('val'))} | "
            f"{format_metric(registration.previous_maps.get('test'))} |"
        )
    lines += [
        "",
        "Both rows are on this run's splits; n/a: the champion was never scored there (the promotion "
        "re-scores it on the deciding split only).",
        f'- Load it: `mlflow.pyfunc.load_model("models:/{summary.registered_model}@{registration.alias}")`',
        "",
    ]
    return lines


def skip_markdown(summary: RunSummary) -> str:
    """The summary of a run that skipped training: why, and where the champion is."""
    return "\n".join(
        [
            "# EmoNet training run: training skipped",
            "",
            f"**Training skipped**: {summary.skip_reason}.",
            "",
            "No new version was registered; the champion stays. "
            "Run the flow with `force_retrain: true` to train anyway.",
            "",
            f'- Champion: `mlflow.pyfunc.load_model("models:/{summary.registered_model}@champion")`',
            f"- Run: {_run_reference(summary)} (tag `emonet.training_skipped`: `true`)",
            f"- Tracking URI: `{summary.tracking_uri}`",
            "",
        ]
    )


@task(name="publish-run-summary", cache_policy=NO_CACHE)
def publish_run_summary(*, summary: RunSummary, evaluation: EvaluationReport) -> str:
    """Create the run's markdown artifact; returns its id."""
    interval, registration = evaluation.intervals["mAP"], summary.registration
    artifact_id = create_markdown_artifact(
        markdown=summary_markdown(summary, evaluation),
        key=SUMMARY_ARTIFACT_KEY,
        description=f"test mAP {format_metric(summary.test_mAP)} {_interval(interval)}; "
        f"{summary.registered_model} "
        f"v{registration.version} ({registration.decision} on {registration.split})",
    )
    return str(artifact_id)


@task(name="publish-skip-summary", cache_policy=NO_CACHE)
def publish_skip_summary(*, summary: RunSummary) -> str:
    """Create the markdown artifact of a run that skipped training; returns its id."""
    artifact_id = create_markdown_artifact(
        markdown=skip_markdown(summary),
        key=SUMMARY_ARTIFACT_KEY,
        description=f"training skipped; {summary.registered_model}@champion stays",
    )
    return str(artifact_id)
