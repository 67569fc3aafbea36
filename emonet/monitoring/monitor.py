"""Monitor a batch of new crops with a registered model: drift, performance, and an MLflow run.

:func:`monitor_batch` scores the batch through the one prediction path, tests every
signal against the version's reference (:mod:`emonet.monitoring.drift`), checks the
performance when the batch is labelled, and records the result as a run of the MLflow
experiment ``emonet-monitoring``: the decision as tags, every signal's statistic and
p-value as metrics, the HTML report, the per-signal CSV and the summary as artifacts. The
same batch content monitored with the same version (at the same false-alarm rate) is
monitored once: a second call returns the recorded result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion

from emonet.data.images import DEFAULT_MAX_PIXELS
from emonet.inference.loading import check_registered_model_uri, load_predictor
from emonet.inference.onnx_runtime import OnnxModel
from emonet.inference.predictor import Predictor
from emonet.monitoring.batches import MonitoringBatch, batch_label, open_batch
from emonet.monitoring.drift import (
    DEFAULT_FALSE_ALARM_RATE,
    DriftReport,
    PerformanceCheck,
    check_performance,
    detect_drift,
)
from emonet.monitoring.reference import ensure_reference
from emonet.monitoring.report import markdown_summary, write_html_report
from emonet.monitoring.scoring import score_batch
from emonet.tracking.run_logging import configure_mlflow
from emonet.utils.io import ensure_writable_dir, write_csv_atomic, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL_URI",
    "MONITORING_EXPERIMENT",
    "MonitoringResult",
    "TAG_DRIFT",
    "TAG_PERFORMANCE",
    "describe_monitoring",
    "load_monitoring_predictor",
    "monitor_batch",
    "resolve_model_version",
]

MONITORING_EXPERIMENT = "emonet-monitoring"
DEFAULT_MODEL_URI = "models:/emonet@champion"
TAG_DRIFT = "emonet.drift_detected"
TAG_PERFORMANCE = "emonet.performance_degraded"
TAG_KEY = "emonet.monitoring_key"
_SUMMARY, _SIGNALS, _REPORT, _MARKDOWN = "summary.json", "signals.csv", "report.html", "summary.md"


@dataclass(frozen=True)
class MonitoringResult:
    """What one monitoring run found, as recorded in its MLflow run (``summary.json``).

    ``most_moved`` lists the three signals with the smallest p-values (name, test,
    p-value, reference and batch summaries); ``performance`` holds both mAPs of the batch
    and of the reference and their difference, each ``[estimate, low, high]``, when the
    batch is labelled.
    """

    model_name: str
    model_version: str
    batch: str
    fingerprint: str
    crops: int
    skipped: int
    drift_detected: bool
    drifted_share: float
    drifted: list[str]
    most_moved: list[dict[str, Any]]
    false_alarm_rate: float
    run_id: str
    performance: dict[str, list[float]] | None = None
    performance_degraded: bool | None = None
    skip_reasons: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    markdown: str = ""  # the decision and the per-signal table (summary.md)
    reused: bool = False

    @property
    def decision(self) -> str:
        words = ["drift detected" if self.drift_detected else "no drift"]
        if self.performance_degraded is not None:
            words.append("performance degraded" if self.performance_degraded else "performance not degraded")
        return ", ".join(words)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_model_version(client: MlflowClient, model_uri: str) -> ModelVersion:
    """The registered version a ``models:/name@alias`` or ``models:/name/version`` URI names.

    Raises
    ------
    ValueError
        Not a ``models:/`` URI (monitoring keeps its reference with a registered version),
        or a name, version or alias that does not exist (one line naming what does).
    """
    parsed = urlparse(model_uri)
    if parsed.scheme != "models":
        raise ValueError(
            f"monitoring needs a registered model (models:/<name>@<alias> or models:/<name>/<version>), "
            f"got {model_uri!r}: the reference is stored with the version"
        )
    check_registered_model_uri(model_uri)
    name, _, rest = (parsed.netloc + parsed.path).strip("/").partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    return client.get_model_version(name, rest)


def load_monitoring_predictor(version: ModelVersion, runtime: str = "auto") -> Predictor:
    """The version's Predictor, with a runtime that returns the penultimate features.

    An ONNX export made before the features were an output is replaced by torch (logged).
    """
    uri = f"models:/{version.name}/{version.version}"
    predictor = load_predictor(uri, runtime=runtime)
    if isinstance(predictor.model, OnnxModel) and "features" not in predictor.model.outputs:
        logger.info("%s's ONNX export returns no features: monitoring runs it with torch", uri)
        predictor = load_predictor(uri, runtime="torch")
    return predictor


def _key(version: ModelVersion, fingerprint: str, false_alarm_rate: float) -> str:
    text = f"{version.name}/{version.version}/{fingerprint}/{false_alarm_rate!r}"
    return hashlib.sha256(text.encode()).hexdigest()


def _recorded(client: MlflowClient, experiment_id: str, key: str) -> MonitoringResult | None:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_KEY}` = '{key}' and attributes.status = 'FINISHED'", max_results=1
    )
    if not runs:
        return None
    with tempfile.TemporaryDirectory(prefix="emonet-monitor-") as tmp:
        summary = json.loads(Path(client.download_artifacts(runs[0].info.run_id, _SUMMARY, tmp)).read_text())
    return MonitoringResult(**{**summary, "reused": True})


def _metrics(drift: DriftReport, performance: PerformanceCheck | None, counts: dict[str, int]) -> dict[str, float]:
    metrics: dict[str, float] = {
        "drifted_share": drift.drifted_share,
        "drifted_signals": float(len(drift.drifted)),
        "crops": float(counts["crops"]),
        "skipped": float(counts["skipped"]),
    }
    for signal in drift.signals:
        metrics[f"drift_p.{signal.name}"] = signal.p_value
        metrics[f"drift_stat.{signal.name}"] = signal.statistic
    if performance is not None:
        for prefix, values in (("", performance.batch), ("reference_", performance.reference)):
            for key, value in values.items():
                metrics.update({f"{prefix}{key}": value.estimate, f"{prefix}{key}_low": value.low})
                metrics[f"{prefix}{key}_high"] = value.high
        for key, value in performance.difference.items():
            metrics.update({f"{key}_difference": value.estimate, f"{key}_difference_low": value.low})
            metrics[f"{key}_difference_high"] = value.high
    return metrics


def _performance_summary(performance: PerformanceCheck) -> dict[str, list[float]]:
    sides = {"": performance.batch, "reference_": performance.reference}
    summary = {f"{prefix}{k}": [v.estimate, v.low, v.high] for prefix, side in sides.items() for k, v in side.items()}
    summary.update({f"{k}_difference": [v.estimate, v.low, v.high] for k, v in performance.difference.items()})
    return summary


@dataclass(frozen=True)
class _Found:
    drift: DriftReport
    performance: PerformanceCheck | None
    counts: dict[str, int]
    skip_reasons: dict[str, str]
    tables: tuple[pd.DataFrame, pd.DataFrame]
    seconds: dict[str, float]


def _examine(
    predictor: Predictor,
    client: MlflowClient,
    version: ModelVersion,
    batch: MonitoringBatch,
    options: dict[str, Any],
) -> tuple[_Found, str]:
    """Score the batch, test its signals and check its performance; also returns its fingerprint."""
    reference = ensure_reference(
        client, version, predictor, split_csv=options["reference_csv"], img_dir=options["reference_img_dir"]
    )
    scored = score_batch(predictor, batch, progress=options["progress"])
    if not (scored.table["face_visibility"] > 0).any():
        logger.warning("no face was found in any of the %d crops of %s", len(scored), batch.source)
    started = time.perf_counter()
    drift = detect_drift(
        reference.table, scored.table, reference.features, scored.features, false_alarm_rate=options["false_alarm_rate"]
    )
    performance = None
    if scored.labels is not None:
        if reference.labels is None:
            raise ValueError(f"{version.name} version {version.version}'s reference holds no labels to compare with")
        performance = check_performance(reference.labels, reference.emotion_prob, scored.labels, scored.emotion_prob)
    seconds = {**scored.seconds, "statistics": time.perf_counter() - started}
    counts = {"crops": len(scored), "skipped": scored.skipped, "reference_crops": len(reference)}
    found = _Found(drift, performance, counts, scored.skip_reasons, (reference.table, scored.table), seconds)
    return found, batch.fingerprint


def _write_outputs(folder: Path, result: MonitoringResult, found: _Found, report: bool) -> None:
    write_csv_atomic(found.drift.frame(), folder / _SIGNALS)
    if report:
        started = time.perf_counter()
        write_html_report(*found.tables, found.drift.threshold, folder / _REPORT)
        result.seconds["report"] = time.perf_counter() - started
    write_json_atomic(result.as_dict(), folder / _SUMMARY)
    (folder / _MARKDOWN).write_text(result.markdown, encoding="utf-8")


def monitor_batch(
    batch: str | Path,
    model_uri: str = DEFAULT_MODEL_URI,
    *,
    img_dir: str | Path | None = None,
    reference_csv: str | Path | None = None,
    reference_img_dir: str | Path | None = None,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    runtime: str = "auto",
    out_dir: str | Path | None = None,
    report: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = False,
) -> MonitoringResult:
    """Monitor ``batch`` (a folder of crops or a CSV, see :mod:`emonet.monitoring.batches`) with a registered model.

    Parameters
    ----------
    batch, img_dir : the batch and, for a CSV, the folder its crop names or relative paths are in.
    model_uri : ``models:/<name>@<alias>`` or ``models:/<name>/<version>``; MLflow's
        current tracking and registry URI are used.
    reference_csv, reference_img_dir : the validation split to compute the version's
        reference on, when it has none and its run's archive is not there any more.
    false_alarm_rate : the family-wise rate at which a batch drawn like the reference is flagged.
    runtime : what runs the network (``auto``, ``onnxruntime``, ``torch``; see
        :func:`emonet.inference.loading.load_predictor`).
    out_dir : also write the summary, per-signal CSV and report under
        ``out_dir/<name>-v<version>-<fingerprint>/``; the MLflow run always has them.
    report : build Evidently's HTML report (about 10 s on top of the decision).

    Raises
    ------
    FileNotFoundError, ValueError
        A missing or empty batch, no readable crop, a labelled CSV with the wrong columns,
        a URI that names no registered version, a version without a reference that
        cannot be computed: one line each.
    """
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be strictly between 0 and 1, got {false_alarm_rate!r}")
    batch_path = Path(batch)
    if not batch_path.exists():
        raise FileNotFoundError(f"batch not found: {batch_path} (a folder of crops or a CSV listing them)")
    experiment_id = configure_mlflow(mlflow.get_tracking_uri(), MONITORING_EXPERIMENT)
    client = MlflowClient()
    version = resolve_model_version(client, model_uri)
    # The content's fingerprint first (hashing only): a batch monitored already loads no model.
    batch_rows = open_batch(batch_path, img_dir=img_dir, max_pixels=max_pixels)
    key = _key(version, batch_rows.fingerprint, false_alarm_rate)
    if recorded := _recorded(client, experiment_id, key):
        logger.info("%s was monitored with %s version %s already (run %s)", batch_path, version.name, version.version,
                    recorded.run_id)  # fmt: skip
        return recorded
    predictor = load_monitoring_predictor(version, runtime)
    options = {
        "reference_csv": reference_csv,
        "reference_img_dir": reference_img_dir,
        "false_alarm_rate": false_alarm_rate,
        "progress": progress,
    }
    if predictor.needs_context:  # a body_context model reads (and hashes) the full images too
        batch_rows = open_batch(batch_path, img_dir=img_dir, needs_context=True, max_pixels=max_pixels)
    found, fingerprint = _examine(predictor, client, version, batch_rows, options)
    return _record(client, experiment_id, version, batch_path, fingerprint, key, found, out_dir, report)


def _record(
    client: MlflowClient,
    experiment_id: str,
    version: ModelVersion,
    batch_path: Path,
    fingerprint: str,
    key: str,
    found: _Found,
    out_dir: str | Path | None,
    report: bool,
) -> MonitoringResult:
    """The MLflow run of one monitoring: tags, metrics and the artifacts."""
    label = batch_label(batch_path)
    title = f"{version.name} version {version.version} on {label}"
    run = client.create_run(experiment_id, run_name=f"{version.name}-v{version.version}-{label.replace('/', '-')}")
    run_id = run.info.run_id
    drift, performance = found.drift, found.performance
    result = MonitoringResult(
        model_name=version.name,
        model_version=str(version.version),
        batch=str(batch_path),
        fingerprint=fingerprint,
        crops=found.counts["crops"],
        skipped=found.counts["skipped"],
        drift_detected=drift.drift_detected,
        drifted_share=drift.drifted_share,
        drifted=[signal.name for signal in drift.drifted],
        most_moved=[
            {"name": s.name, "test": s.test, "p_value": s.p_value, "reference": s.reference, "batch": s.batch}
            for s in drift.most_moved()
        ],
        false_alarm_rate=drift.false_alarm_rate,
        run_id=run_id,
        performance=_performance_summary(performance) if performance is not None else None,
        performance_degraded=performance.degraded if performance is not None else None,
        skip_reasons=found.skip_reasons,
        seconds=dict(found.seconds),
        markdown=markdown_summary(title, drift, found.performance, found.counts, [f"MLflow run: `{run_id}`"]),
    )
    try:
        with tempfile.TemporaryDirectory(prefix="emonet-monitor-") as tmp:
            folder = Path(tmp)
            if out_dir is not None:
                folder = ensure_writable_dir(Path(out_dir) / f"{version.name}-v{version.version}-{fingerprint[:12]}")
            _write_outputs(folder, result, found, report)
            client.log_artifacts(run_id, str(folder))
        tags = {
            "emonet.model_name": version.name,
            "emonet.model_version": str(version.version),
            "emonet.batch_fingerprint": fingerprint,
            TAG_DRIFT: str(result.drift_detected).lower(),
            TAG_KEY: key,
            "mlflow.note.content": result.markdown,
        }
        if result.performance_degraded is not None:
            tags[TAG_PERFORMANCE] = str(result.performance_degraded).lower()
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in _metrics(drift, performance, found.counts).items()],
            params=[Param("batch", str(batch_path)[:500]), Param("false_alarm_rate", repr(drift.false_alarm_rate))],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    logger.info("%s: %s (MLflow run %s)", title, result.decision, run_id)
    return result


def describe_monitoring(result: MonitoringResult) -> str:
    """A few lines for a terminal: the decision, the three signals that moved most, where to look."""
    lines = [
        f"{result.model_name} version {result.model_version} on {result.batch}: {result.decision}",
        f"  {result.crops} crops scored, {result.skipped} skipped; {len(result.drifted)} signals drifted "
        f"(share {result.drifted_share:.2f}, family-wise false-alarm rate {result.false_alarm_rate:g})",
        "  moved most:",
    ]
    for signal in result.most_moved:
        lines.append(
            f"    {signal['name']:<24} {signal['test']:<4} p={signal['p_value']:.2e}  "
            f"reference {signal['reference']:.4g} -> batch {signal['batch']:.4g}"
        )
    if result.performance is not None:
        estimate, low, high = result.performance["mAP_difference"]
        lines.append(f"  mAP difference (batch - reference): {estimate:+.4f} [{low:+.4f}, {high:+.4f}]")
    reused = " (monitored before: the recorded result)" if result.reused else ""
    lines.append(f"  MLflow: experiment {MONITORING_EXPERIMENT}, run {result.run_id}{reused}")
    return "\n".join(lines)
