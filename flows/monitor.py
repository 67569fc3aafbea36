"""Monitoring as a Prefect flow: batches of new crops against the registered model's
reference, with a Prefect event for every batch that drifted or lost performance (the
retraining deployment's trigger in ``prefect.yaml`` listens for them).

Run it once with ``python -m flows.monitor --batch PATH [--model URI]``; the ``monitor``
deployment scans an inbox folder every day.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow
from pydantic import Field

from emonet.monitoring.batches import BATCH_CSV
from emonet.utils.reaper import ensure_reaper
from tasks.monitoring import emit_monitoring_events, monitor_batch_task, publish_monitoring


def inbox_batches(inbox: Path) -> list[Path]:
    """The batches in ``inbox``, in name order: each CSV, each subfolder with a ``batch.csv``
    (that CSV), and each other subfolder (a folder of crops)."""
    if not inbox.is_dir():
        raise FileNotFoundError(f"inbox folder not found: {inbox}")
    batches = []
    for entry in sorted(inbox.iterdir()):
        if entry.is_dir():
            batches.append(entry / BATCH_CSV if (entry / BATCH_CSV).is_file() else entry)
        elif entry.suffix.lower() == ".csv":
            batches.append(entry)
    return batches


@flow(name="emonet-monitor", log_prints=True)
def emonet_monitor(
    batch: Path | None = None,
    inbox: Path | None = None,
    model_uri: str = "models:/emonet@champion",
    img_dir: Path | None = None,
    reference_csv: Path | None = None,
    reference_img_dir: Path | None = None,
    false_alarm_rate: Annotated[float, Field(gt=0, lt=1)] = 0.05,
    runtime: Literal["auto", "onnxruntime", "torch"] = "auto",
    out_dir: Path | None = Path("outputs/monitoring"),
    report: bool = True,
    tracking_uri: str | None = None,
) -> list[dict[str, Any]]:
    """Monitor one batch, or every batch of an inbox not monitored yet, with a registered model.

    Args:
        batch: A folder of crops (`.npy`, `.png`, `.jpg`), or a CSV with `image_path` (or
            the archive's `Crop_name` with `img_dir`); with the 26 emotion columns the
            batch is labelled and its performance is checked too.
        inbox: A folder of batches (CSVs, folders of crops, folders with a `batch.csv`);
            each one monitored before with this model version is not monitored again.
            Give `batch` or `inbox`.
        model_uri: `models:/<name>@<alias>` or `models:/<name>/<version>`.
        img_dir: For a CSV: the folder its crop names or relative paths are in.
        reference_csv: The validation split to compute the version's reference on, for a
            version registered without one whose training archive has moved.
        reference_img_dir: The `img_arrs` folder of `reference_csv`.
        false_alarm_rate: The family-wise rate at which a batch drawn like the reference is flagged.
        runtime: What runs the network (`auto`: ONNX Runtime on the CPU when it can).
        out_dir: Also write each batch's summary, per-signal CSV and HTML report here.
        report: Build Evidently's HTML report (about 10 s a batch).
        tracking_uri: MLflow tracking and registry URI; default `MLFLOW_TRACKING_URI`
            or the SQLite store under `mlruns/`.
    """
    ensure_reaper()
    batches = check_monitor_inputs(batch, inbox, model_uri, tracking_uri)
    options = {
        "img_dir": img_dir,
        "reference_csv": reference_csv,
        "reference_img_dir": reference_img_dir,
        "false_alarm_rate": false_alarm_rate,
        "runtime": runtime,
        "out_dir": out_dir,
        "report": report,
    }
    results = []
    for path in batches:
        result = monitor_batch_task(path, model_uri, **options)
        emit_monitoring_events(result)
        results.append(result)
    if results:
        publish_monitoring(results)
    else:
        print(f"no batch in {inbox}")
    return [result.as_dict() | {"decision": result.decision} for result in results]


def check_monitor_inputs(
    batch: Path | None, inbox: Path | None, model_uri: str, tracking_uri: str | None
) -> list[Path]:
    """Check, before any work, the batch (or inbox), the store and the URI
    (:func:`check_model_uri`); returns the batches to monitor.

    Raises
    ------
    ValueError
        Neither or both of ``batch`` and ``inbox``, or what :func:`check_model_uri` refuses.
    FileNotFoundError
        No batch or inbox at the path given.
    """
    if (batch is None) == (inbox is None):
        raise ValueError("give batch (one folder or CSV) or inbox (a folder of batches), not both or neither")
    if batch is not None and not Path(batch).exists():
        raise FileNotFoundError(f"batch not found: {batch} (a folder of crops or a CSV listing them)")
    batches = [Path(batch)] if batch is not None else inbox_batches(Path(inbox))
    check_model_uri(model_uri, tracking_uri)
    return batches


def check_model_uri(model_uri: str, tracking_uri: str | None) -> None:
    """Point MLflow at the store and check that ``model_uri`` names a registered version or alias.

    Raises
    ------
    ValueError
        The store is not an MLflow store; the URI is not a ``models:/`` URI, or names no
        registered model, version or alias (the ones that exist are listed).
    """
    # Imported here: importing the flow must stay cheap and side-effect free
    # (default_tracking_uri creates mlruns/).
    import mlflow

    from emonet.inference.loading import check_registered_model_uri
    from emonet.utils.store import check_store, default_tracking_uri

    if not model_uri.startswith("models:/"):
        raise ValueError(f"monitoring needs a registered model (models:/<name>@<alias>), got {model_uri!r}")
    uri = tracking_uri or default_tracking_uri()
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    check_registered_model_uri(model_uri)


def main(argv: list[str] | None = None) -> int:
    """Run the flow once in this process (ephemeral Prefect) and print each decision."""
    from emonet.cli import add_monitor_arguments
    from emonet.monitoring.monitor import MonitoringResult, describe_monitoring

    parser = argparse.ArgumentParser(description="Monitor a batch of crops against the registered model.")
    add_monitor_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    try:  # before Prefect starts: a bad batch, store or model URI is one line, not a traceback
        check_monitor_inputs(args.batch, None, args.model, args.tracking_uri)
    except (ValueError, OSError) as error:
        print(f"emonet-monitor: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, (ValueError, FileNotFoundError)) else 1
    try:
        results = emonet_monitor(
            batch=args.batch,
            model_uri=args.model,
            img_dir=args.img_dir,
            reference_csv=args.reference_csv,
            reference_img_dir=args.reference_img_dir,
            false_alarm_rate=args.false_alarm_rate,
            runtime=args.runtime,
            out_dir=args.out_dir,
            report=not args.no_report,
            tracking_uri=args.tracking_uri,
        )
    except (ValueError, FileNotFoundError) as error:  # the batch's content: one line after Prefect's log
        print(f"emonet-monitor: error: {error}", file=sys.stderr)
        return 2
    for result in results:
        summary = {key: value for key, value in result.items() if key != "decision"}
        print(json.dumps(result, indent=2) if args.json else describe_monitoring(MonitoringResult(**summary)))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
