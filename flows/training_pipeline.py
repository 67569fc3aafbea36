"""The main job: data preparation, training, evaluation and model registration as one
Prefect flow, tracked in one MLflow run.

Run it on the demo data with ``make demo`` (or ``python -m flows.training_pipeline``);
deployments in ``prefect.yaml`` schedule it and expose its parameters in the UI.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import psutil
from prefect import flow, get_run_logger
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from pydantic import Field

from emonet.config import EmoNetConfig, config_to_dict, load_config
from emonet.metrics import format_metric
from emonet.models.encoders import stream_preprocessing
from emonet.models.network import check_pretrained_weights
from emonet.reports.evaluation import EvaluationReport
from emonet.schema import SPLITS, annotations_path, arrays_dir
from emonet.tracking.registry import DEMO_MODEL_NAME, MODEL_NAME, PromotionDecision
from emonet.utils.io import ensure_writable_dir
from emonet.utils.main_guard import check_main_guard
from emonet.utils.reaper import ensure_reaper
from emonet.utils.stopping import TrainingStopped, on_stop_requested, wait_stop_handled
from emonet.utils.store import check_store_writable, default_tracking_uri
from flows.visibility import score_visibility
from tasks.caching import checked_result
from tasks.data import (
    ensure_demo_data,
    normalize_splits,
    normalized_splits_problem,
    write_normalized_splits,
    write_visibility,
)
from tasks.evaluation import evaluate_model
from tasks.monitoring import store_monitoring_reference
from tasks.registration import register_model
from tasks.report import publish_run_summary, publish_skip_summary
from tasks.retraining import check_retraining
from tasks.review import review_model
from tasks.summary import RunSummary, promotion_explanation
from tasks.tracking import (
    FlowMlflowRun,
    end_mlflow_run_of_flow_run,
    log_dataset_summary,
    log_split_inputs,
    mlflow_run_of_flow,
    stop_reason,
)
from tasks.training import train_model

__all__ = [
    "RunSummary",
    "check_outputs_writable",
    "emonet_training_pipeline",
    "end_mlflow_run_of_flow_run",
    "main",
    "prepare_data",
    "resolve_out_dir",
    "run_report",
    "start_run_safely",
    "stop_reason",
]

PositiveInt = Annotated[int, Field(ge=1)]
# After SIGTERM/SIGINT, how long `main` lets the flow stop at a safe point and close its
# MLflow run before the process exits (see `_exit_after_stop`).
STOP_GRACE_S = 15.0
# The demo's recipe, which `make demo` and `python -m flows.training_pipeline` use on the demo data.
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass(frozen=True)
class PreparedData:
    """What :func:`prepare_data` hands the training pipeline."""

    frames: dict[str, pd.DataFrame]  # split -> its normalized rows, as written to `normalized`
    counts: dict[str, dict[str, int]]  # split -> rows read, rejected, filtered, written...
    visibility: dict[str, dict[str, Any]]  # split -> face-visibility counts
    visibility_dir: Path  # CSV copies with Face_Visibility and the histogram
    normalized: dict[str, Path]  # split -> normalized_dataset_<split>.csv
    normalization_json: Path  # the affect normalizer's parameters


@flow(name="emonet-prepare-data")
def prepare_data(
    data_root: Path,
    out_dir: Path,
    min_face_visibility: float | None = None,
    fit_normalization_on_train: bool = False,
    visibility_shard_size: PositiveInt = 2000,
    visibility_workers: PositiveInt | None = None,
    visibility_parallel_shards: PositiveInt = 1,
    filter_test_by_visibility: bool = False,
    dask_address: str = "",
) -> PreparedData:
    """Face visibility (cached per shard) and affect normalization (cached) of every split.

    With ``dask_address`` set (``local``, or a scheduler such as ``tcp://host:8786``)
    the shards are scored on that Dask cluster (``flows.visibility``) and
    ``visibility_workers``/``visibility_parallel_shards`` do not apply.

    Writes ``<out_dir>/visibility/`` (CSV copies with ``Face_Visibility`` and
    histograms) and ``<out_dir>/normalized/`` (``normalized_dataset_<split>.csv``,
    ``normalization.json``); returns their paths, the normalized frames and row counts.
    """
    ensure_reaper()  # run on its own, this flow too starts processes (the visibility pool)
    scores = score_visibility(
        data_root,
        shard_size=visibility_shard_size,
        workers=visibility_workers,
        parallel_shards=visibility_parallel_shards,
        dask_address=dask_address,
    )
    annotation_csvs = {split: annotations_path(data_root, split) for split in SPLITS}
    visibility_dir = out_dir / "visibility"
    visibility = write_visibility(annotation_csvs=annotation_csvs, scores=scores, out_dir=visibility_dir)
    normalize_args = {
        "csv_paths": {split: visibility_dir / csv_path.name for split, csv_path in annotation_csvs.items()},
        "min_visibility": min_face_visibility,
        "fit_on_train": fit_normalization_on_train,
        "filter_test_by_visibility": filter_test_by_visibility,
    }
    frames, normalizer, counts = checked_result(
        normalize_splits(**normalize_args, return_state=True),
        functools.partial(normalized_splits_problem, splits=annotation_csvs),
        normalize_splits,
        **normalize_args,
    )
    normalized, normalization_json = write_normalized_splits(
        frames=frames, normalizer=normalizer, out_dir=out_dir / "normalized"
    )
    return PreparedData(
        frames=frames,
        counts=counts,
        visibility=visibility,
        visibility_dir=visibility_dir,
        normalized=normalized,
        normalization_json=normalization_json,
    )


# Where the outputs go when neither `out_dir` nor its deprecated alias `output_dir` is set.
DEFAULT_OUT_DIR = Path("outputs")


def resolve_out_dir(out_dir: Path | None, output_dir: Path | None) -> Path:
    """The flow's output folder, from ``out_dir`` or its deprecated alias ``output_dir``
    (the name scripts and deployments passed before; a ``FutureWarning`` names ``out_dir``).

    Raises
    ------
    TypeError
        Both are set, even to the same folder.
    """
    if output_dir is None:
        return Path(out_dir if out_dir is not None else DEFAULT_OUT_DIR)
    if out_dir is not None:
        raise TypeError(
            f"emonet-training-pipeline got both out_dir={str(out_dir)!r} and its deprecated alias "
            f"output_dir={str(output_dir)!r}: pass out_dir only"
        )
    message = "the flow parameter output_dir is deprecated: pass out_dir instead (it names the same folder)"
    warnings.warn(message, FutureWarning, stacklevel=2)
    try:  # a deployment's run shows it in its log, not only on the worker's stderr
        get_run_logger().warning(message)
    except MissingContextError:  # called outside a flow run
        pass
    return Path(output_dir)


@flow(
    name="emonet-training-pipeline",
    log_prints=True,
    on_crashed=[end_mlflow_run_of_flow_run],
    on_cancellation=[end_mlflow_run_of_flow_run],
)
def emonet_training_pipeline(
    config: EmoNetConfig | Path = EmoNetConfig(),
    data_root: Path | None = None,
    demo_dir: Path = Path("data/demo"),
    out_dir: Path | None = None,
    epochs: PositiveInt | None = None,
    seed: int | None = None,
    batch_size: PositiveInt | None = None,
    min_face_visibility: Annotated[float, Field(ge=0, le=100)] | None = None,
    filter_test_by_visibility: bool = False,
    fit_normalization_on_train: bool = False,
    visibility_shard_size: PositiveInt = 2000,
    visibility_workers: PositiveInt | None = None,
    visibility_parallel_shards: PositiveInt = 1,
    dask_address: str = "",
    experiment_name: str = "emonet",
    registered_model_name: str | None = None,
    min_improvement: Annotated[float, Field(ge=0)] = 0.0,
    promotion_confidence: Annotated[float, Field(ge=0, lt=1)] = 0.95,
    promotion_split: Literal["val", "test"] = "val",
    quantize: Literal["none", "int8"] = "none",
    force_retrain: bool = False,
    review_samples: PositiveInt = 24,
    review_detailed_samples: Annotated[int, Field(ge=0)] = 6,
    tracking_uri: str | None = None,
    output_dir: Path | None = None,
) -> RunSummary:
    """Train EmoNet on an EMOTIC archive (or the bundled demo data) and register it.

    Args:
        config: The model, loss and training settings: the path of a YAML file (e.g.
            `configs/emotic_resnet50.yaml`, `configs/demo.yaml`) or every field of
            `emonet.config.EmoNetConfig`, whose defaults are the library's.
        data_root: Folder holding `annots_arrs/` and `img_arrs/`; leave empty to use the
            demo data in `demo_dir` (generated when missing).
        demo_dir: Where the demo archive lives or is generated.
        out_dir: Visibility and normalized CSVs, checkpoints and reports go here; empty: `outputs`.
        epochs: Overrides `config.train.epochs` when set.
        seed: Overrides `config.train.seed` when set: seeds weight initialization, data
            order, augmentation and DataLoader workers.
        batch_size: Overrides `config.train.batch_size` when set.
        min_face_visibility: Keep only train/val rows whose face visibility is at least this (0-100).
        filter_test_by_visibility: Filter the test split by `min_face_visibility` too (its mAP
            is then not comparable to the EMOTIC benchmark).
        fit_normalization_on_train: Fit valence/arousal bounds on train instead of 1..10.
        visibility_shard_size: Rows per cached face-visibility shard.
        visibility_workers: Face-landmarker processes per shard (default: all cores).
        visibility_parallel_shards: Shards scored at the same time.
        dask_address: Score face-visibility shards on Dask: empty for this machine's
            process pool, `local` for a LocalCluster on this machine, or a scheduler
            address such as `tcp://10.0.0.5:8786`.
        experiment_name: MLflow experiment.
        registered_model_name: MLflow registered model that receives the new version;
            default `emonet` with `data_root`, `emonet-demo` on the demo data.
        min_improvement: How much higher than the champion's (re-scored on the same
            split) the new version's mAP must be to take the `champion` alias: the lower
            end of the difference's interval must exceed it; 0 = higher beyond doubt.
        promotion_confidence: Confidence of the paired-bootstrap interval of that mAP
            difference (default 0.95); 0 compares the point mAPs (any higher mAP wins).
        promotion_split: The split the promotion compares on: `val` (default; the test
            split then never chooses a model) or `test` (the test split decides, and its mAP
            is then no unbiased estimate).
        quantize: `int8` also registers an INT8 copy of the model's ONNX export, with its
            validation mAP difference from the float model (paired bootstrap) in the run
            and the version's `onnx_int8` tag; it serves only when asked for
            (`inference_runtime` `onnxruntime-int8`). `none` (default): no copy.
        force_retrain: Train even when the data, the resolved config and the code are
            those of the current champion's run (which otherwise skips training).
        review_samples: Test crops in the visual review's grid, worst predictions first.
        review_detailed_samples: How many of those also get a page of their own (0: none).
        tracking_uri: MLflow tracking URI; default `MLFLOW_TRACKING_URI` or SQLite under `mlruns/`.
        output_dir: Deprecated alias of `out_dir` (with a warning); set one of the two, not both.

    Returns:
        A `RunSummary`: the MLflow run, and the trained version's metrics and promotion
        or why training was skipped.
    """
    out_dir = resolve_out_dir(out_dir, output_dir)
    start_run_safely(out_dir, tracking_uri)
    overrides = {"epochs": epochs, "seed": seed, "batch_size": batch_size}
    resolved = load_config(config, train={key: value for key, value in overrides.items() if value is not None})
    check_pretrained_weights(resolved.model)  # missing weights fail here, before any data work
    # Demo models never replace a real one: they go to their own registered model.
    registered_model_name = registered_model_name or (MODEL_NAME if data_root is not None else DEMO_MODEL_NAME)
    root = _archive_root(data_root, demo_dir)
    params = _run_params(root, out_dir, resolved)
    out_dir = out_dir.resolve()
    with mlflow_run_of_flow(tracking_uri=tracking_uri, experiment_name=experiment_name, params=params) as run:
        data = prepare_data(
            data_root=root,
            out_dir=out_dir,
            min_face_visibility=min_face_visibility,
            fit_normalization_on_train=fit_normalization_on_train,
            visibility_shard_size=visibility_shard_size,
            visibility_workers=visibility_workers,
            visibility_parallel_shards=visibility_parallel_shards,
            filter_test_by_visibility=filter_test_by_visibility,
            dask_address=dask_address,
        )
        _log_data(run.run_id, data)
        skip_reason = check_retraining(
            run_id=run.run_id,
            registered_model_name=registered_model_name,
            frames=data.frames,
            normalization_json=data.normalization_json,
            config=resolved,
            force_retrain=force_retrain,
        )
        choices = {
            "min_improvement": min_improvement,
            "promotion_split": promotion_split,
            "promotion_confidence": promotion_confidence,
            "quantize": None if quantize == "none" else quantize,
            "review_samples": review_samples,
            "review_detailed_samples": review_detailed_samples,
        }
        trained = None if skip_reason else _train(run, data, resolved, root, out_dir, registered_model_name, choices)
    return _publish(run, registered_model_name, out_dir, skip_reason, trained)


def check_outputs_writable(out_dir: Path, tracking_uri: str | None) -> None:
    """Fail in one line, before any work, where the run could not write: ``out_dir``, the
    checkpoint folders under ``out_dir/runs``, and the MLflow store (a SQLite file and its
    folder; :func:`emonet.utils.store.check_store_writable`).

    Raises
    ------
    PermissionError, NotADirectoryError, OSError
        Naming the folder or file.
    """
    ensure_writable_dir(out_dir)
    ensure_writable_dir(out_dir / "runs")
    check_store_writable(tracking_uri or default_tracking_uri())


def start_run_safely(out_dir: Path, tracking_uri: str | None) -> None:
    """What a run checks and starts before any work: the main guard of a script that runs
    the flow (:func:`emonet.utils.main_guard.check_main_guard`), the watchdog that ends the
    run's processes with it (:func:`emonet.utils.reaper.ensure_reaper`) and that its
    outputs can be written (:func:`check_outputs_writable`)."""
    check_main_guard("the training flow")
    ensure_reaper()
    check_outputs_writable(out_dir, tracking_uri)


def _archive_root(data_root: Path | None, demo_dir: Path) -> Path:
    """The archive the flow trains on: ``data_root``, or the demo archive (generated when
    missing); checked to hold every split's annotations before any run is opened."""
    root = (data_root or ensure_demo_data(demo_dir=demo_dir)).resolve()
    for split in SPLITS:
        if not annotations_path(root, split).is_file():
            raise FileNotFoundError(f"{annotations_path(root, split)} is missing: is {root} an EMOTIC archive root?")
    return root


def _run_params(root: Path, out_dir: Path, config: EmoNetConfig) -> dict[str, Any]:
    """The MLflow run's params: the flow's parameters (``out_dir`` the folder used, under
    that name whichever name was passed) and the resolved config, flat."""
    params = {**flow_run.parameters, "data_root": root, "out_dir": out_dir, **_flat_config(config)}
    for replaced in ("config", "output_dir"):  # the config is logged flat; output_dir is out_dir
        params.pop(replaced, None)
    return params


def _log_data(run_id: str, data: PreparedData) -> None:
    """The data set summary and the three splits as the run's dataset inputs."""
    log_dataset_summary(
        run_id=run_id,
        frames=data.frames,
        counts=data.counts,
        visibility=data.visibility,
        visibility_dir=data.visibility_dir,
    )
    log_split_inputs(run_id=run_id, frames=data.frames, csv_paths=data.normalized)


@dataclass(frozen=True)
class Trained:
    """What the steps after the retraining check hand back: :func:`_train`."""

    evaluation: EvaluationReport
    registration: PromotionDecision
    review: Path


def _train(
    run: FlowMlflowRun,
    data: PreparedData,
    config: EmoNetConfig,
    root: Path,
    out_dir: Path,
    registered_model_name: str,
    choices: dict[str, Any],
) -> Trained:
    """Train, evaluate on test (and predict validation with the same loaded model), review
    and register: the flow's steps when training is not skipped. ``choices``: the flow's
    ``min_improvement``, ``promotion_split``, ``promotion_confidence`` and ``quantize`` (for
    :func:`tasks.registration.register_model`), ``review_samples`` and
    ``review_detailed_samples`` (for :func:`tasks.review.review_model`)."""
    promotion = {
        key: choices[key] for key in ("min_improvement", "promotion_split", "promotion_confidence", "quantize")
    }
    review = {"num_samples": choices["review_samples"], "detailed_samples": choices["review_detailed_samples"]}
    run_id, img_dir = run.run_id, arrays_dir(root)
    test_csv, val_csv, normalization_json = data.normalized["test"], data.normalized["val"], data.normalization_json
    run_dir = out_dir / "runs" / run_id
    training = train_model(
        run_id=run_id,
        config=config,
        train_csv=data.normalized["train"],
        val_csv=val_csv,
        img_dir=img_dir,
        checkpoint_dir=run_dir / "checkpoints",
        normalization_json=normalization_json,
    )
    checkpoint = training.best_checkpoint
    evaluation = evaluate_model(
        run_id=run_id,
        checkpoint=checkpoint,
        test_csv=test_csv,
        val_csv=val_csv,
        img_dir=img_dir,
        normalization_json=normalization_json,
        out_dir=run_dir / "evaluation",
        model_name=f"{registered_model_name}, MLflow run {run_id[:8]}",
    )
    review_page = review_model(
        run_id=run_id,
        checkpoint=checkpoint,
        evaluation=evaluation,
        test_csv=test_csv,
        img_dir=img_dir,
        out_dir=run_dir / "review",
        **review,
    )
    registration = register_model(
        run_id=run_id,
        checkpoint=checkpoint,
        normalization_json=normalization_json,
        evaluation=evaluation,
        registered_model_name=registered_model_name,
        test_csv=test_csv,
        val_csv=val_csv,
        img_dir=img_dir,
        **promotion,
    )
    # What monitoring compares new batches with: the version's signals on validation.
    store_monitoring_reference(
        registered_model_name=registered_model_name, version=str(registration.version), val_csv=val_csv, img_dir=img_dir
    )
    return Trained(evaluation=evaluation, registration=registration, review=review_page)


def _publish(
    run: FlowMlflowRun, registered_model_name: str, out_dir: Path, skip_reason: str | None, trained: Trained | None
) -> RunSummary:
    """The run's summary: returned, published as the Prefect artifact and logged."""
    logger = get_run_logger()
    common = {
        "mlflow_run_id": run.run_id,
        "registered_model": registered_model_name,
        "out_dir": out_dir,
        "tracking_uri": run.tracking_uri,
        "mlflow_run_link": run.link,
    }
    if trained is None:
        summary = RunSummary(**common, skip_reason=skip_reason)
        publish_skip_summary(summary=summary)
        logger.info("Training skipped: %s", skip_reason)
        return summary
    evaluation, registration = trained.evaluation, trained.registration
    summary = RunSummary.of_training(evaluation=evaluation, registration=registration, review=trained.review, **common)
    publish_run_summary(summary=summary, evaluation=evaluation)
    interval = evaluation.intervals["mAP"]
    logger.info(
        "Test mAP %.4f [%.4f, %.4f] (%g%% bootstrap), mAP_voc11 %.4f; %s version %s is %s (%s on %s)",
        summary.test_mAP,
        interval.low,
        interval.high,
        100 * interval.confidence,
        summary.test_mAP_voc11,
        registered_model_name,
        summary.version,
        summary.alias,
        registration.decision,
        registration.split,
    )
    return summary


def _flat_config(config: EmoNetConfig) -> dict[str, Any]:
    """The resolved config as flat MLflow params (``train.lr`` -> ``lr``): the sections'
    field names do not collide, and short names read better in MLflow's run table. The
    encoders' defaults are resolved, so the params name both encoders and both input sides."""
    params = {key: value for section in config_to_dict(config).values() for key, value in section.items()}
    body, context = stream_preprocessing(config)
    params["image_size"] = body.size
    if context is not None:
        params["context_backbone"], params["context_size"] = config.model.context_encoder, context.size
    return params


def run_report(summary: RunSummary) -> str:
    """What :func:`main` prints after a run: the test metrics with their interval, the
    registration and its promotion decision (or why training was skipped), and where to look."""
    name = summary.registered_model
    if summary.skipped:
        outcome = f"\nTraining skipped: {summary.skip_reason}\n(force_retrain trains anyway)\n"
    else:
        outcome = _trained_report(summary)
    return (
        f"{outcome}"
        f"Outputs: {summary.out_dir}\n"
        f"MLflow UI: make ui  (or: mlflow ui --backend-store-uri sqlite:///$PWD/mlruns/mlflow.db), then open http://127.0.0.1:5000\n"
        f"Load the model:\n"
        f"    import mlflow, pandas as pd\n"
        f"    mlflow.set_tracking_uri('{summary.tracking_uri}')\n"
        f"    model = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        f"    model.predict(pd.DataFrame({{'image_path': ['crop.npy']}}))"
    )


def _trained_report(summary: RunSummary) -> str:
    """The test metrics, the registration and the promotion decision (``PromotionDecision.explain()``,
    indented under it, where the registry has it)."""
    metrics = summary.test_metrics
    low, high = summary.test_mAP_ci or (float("nan"), float("nan"))
    confidence = f"{100 * (summary.ci_confidence or 0.95):g}%"
    explanation = promotion_explanation(summary.registration) if summary.registration is not None else None
    explained = "".join(f"    {line}\n" for line in explanation.strip().splitlines()) if explanation else ""
    return (
        f"\nTest mAP: {summary.test_mAP:.4f} [{low:.4f}, {high:.4f}] (scikit-learn AP, {confidence} bootstrap "
        f"interval); mAP_voc11 {summary.test_mAP_voc11:.4f} (the EMOTIC authors' 11-point AP)\n"
        f"(macro F1 {metrics['f1_macro']:.4f}, MAE valence {metrics['mae_valence_1_10']:.3f} / arousal "
        f"{metrics['mae_arousal_1_10']:.3f} on the 1..10 scale; validation mAP {format_metric(summary.val_mAP)})\n"
        f"Registered: models:/{summary.registered_model} version {summary.version} -> alias '{summary.alias}' "
        f"({summary.decision})\n"
        f"{explained}"
        f"Prediction review (open in a browser): {summary.review}\n"
    )


def _ephemeral_server_gone() -> bool:
    """Whether this process talks to its own ephemeral Prefect API server and that server
    has ended (the signal to the process group stopped it too); False with
    ``PREFECT_API_URL`` set, where Prefect can still record how the run ended."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return False
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return False
    for child in children:
        try:
            if "prefect.server.api.server" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            continue
    return True


def _exit_after_stop(reason: str) -> None:
    """Exit the process once a requested stop has been handled, at most
    :data:`STOP_GRACE_S` seconds after it was requested.

    The same SIGTERM that stops the flow stops the ephemeral Prefect API server it
    talks to (a child in the same process group), and Prefect's client then retries
    every state update and event for minutes. So once training has stopped at a safe
    point and the MLflow run is closed (:func:`emonet.utils.stopping.mark_stop_handled`)
    and that server is gone, nothing is lost by exiting at once; otherwise the process
    exits after the grace period. The DataLoader workers follow within 5 s (torch's
    watchdog on their parent), and the run's watchdog ends whatever is left.
    """
    deadline = time.monotonic() + STOP_GRACE_S

    def exit_now() -> None:
        print(f"\nstopped ({reason}); exiting without waiting on Prefect's API server", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    def exit_when_handled() -> None:
        while (left := deadline - time.monotonic()) > 0:
            if wait_stop_handled(min(left, 0.5)) and _ephemeral_server_gone():
                break
        exit_now()

    threading.Thread(target=exit_when_handled, name="emonet-exit-after-stop", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Run the flow once in this process (ephemeral Prefect) and print where to look.

    SIGTERM or SIGINT stop it cleanly: training stops between batches (``last.pt`` stays
    whole), the MLflow run is closed ``KILLED`` with the reason, and the process exits
    within :data:`STOP_GRACE_S` seconds, exit code 1.
    """
    parser = argparse.ArgumentParser(description="Run the EmoNet training pipeline once.")
    parser.add_argument("--data-root", type=Path, default=None, help="EMOTIC archive root (default: demo data)")
    parser.add_argument("--demo-dir", type=Path, default=Path("data/demo"))
    # --output-dir: the flag's name before it matched --out-dir of the emonet commands.
    parser.add_argument("--out-dir", "--output-dir", dest="out_dir", type=Path, default=Path("outputs"))
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"YAML config (default: {DEMO_CONFIG} on the demo data, the library defaults on --data-root)",
    )
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--force-retrain", action="store_true", help="train even when the champion has this recipe")
    args = parser.parse_args(argv)
    config = args.config or (DEMO_CONFIG if args.data_root is None else EmoNetConfig())
    try:
        check_outputs_writable(args.out_dir, None)
    except OSError as error:  # before Prefect starts, so one line and no traceback
        print(f"emonet-training-pipeline: error: {error}", file=sys.stderr)
        return 1
    try:
        with on_stop_requested(_exit_after_stop):
            summary = emonet_training_pipeline(
                config=config,
                data_root=args.data_root,
                demo_dir=args.demo_dir,
                out_dir=args.out_dir,
                epochs=args.epochs,
                seed=args.seed,
                force_retrain=args.force_retrain,
            )
    except (TrainingStopped, KeyboardInterrupt) as error:
        print(f"\n{stop_reason(error)}", file=sys.stderr)
        return 1
    print(run_report(summary))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
