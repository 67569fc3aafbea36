"""MLflow plumbing for EmoNet: where runs are stored (and the checks that keep the store
whole), logging a run's metrics, and logging the pyfunc model from code with its checkpoint.

Promotion in the model registry is :mod:`emonet.tracking.registry`; closing the runs of killed
flows is :mod:`emonet.tracking.stale_runs`."""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import io
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.types import ColSpec, Schema
from PIL import Image

from emonet.config import TIMM_PREFIX, EmoNetConfig
from emonet.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_REQUEST_PIXELS, DEFAULT_MAX_ROWS
from emonet.data.normalize import AffectNormalizer
from emonet.inference.predictor import EMOTIONS_COLUMN, OUTPUT_COLUMNS
from emonet.models.checkpoint import (
    SERVING_CHECKPOINT,
    load_checkpoint,
    serving_checkpoint_of,
    write_serving_checkpoint,
)
from emonet.tracking.model_export import check_export_options, make_exports
from emonet.utils.store import check_sqlite_store, default_tracking_uri, sqlite_lock, sqlite_path

logger = logging.getLogger(__name__)

__all__ = [
    "configure_mlflow",
    "log_emonet_model",
    "log_metrics",
    "model_signature",
    "pip_requirements",
]

# The whole package is logged with the model (its code_paths); the model file is run by MLflow.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PYFUNC_MODEL_FILE = PACKAGE_DIR / "inference" / "pyfunc_model.py"

# Distributions the logged model imports to load and predict (emonet.inference.pyfunc_model and
# what it imports: no training code, so no scikit-learn; tqdm for the prediction loop's
# progress bar). Pinned to the versions installed when logging.
MODEL_REQUIREMENTS: tuple[str, ...] = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pillow",
    "mlflow",
    "pydantic",
    "pyyaml",
    "tqdm",
    "lazy-loader",  # the subpackages' lazy re-exports
    "onnxruntime",  # runs the ONNX export (the exporter itself is needed at registration only)
)


def _as_uri(location: str | Path) -> str:
    text = str(location)
    if isinstance(location, Path) or not urlparse(text).scheme or len(urlparse(text).scheme) == 1:
        # A plain (possibly relative) path; one-letter schemes are Windows drives.
        return Path(text).expanduser().resolve().as_uri()
    return text


def configure_mlflow(
    tracking_uri: str | None = None,
    experiment_name: str = "emonet",
    artifact_location: str | Path | None = None,
) -> str:
    """Point MLflow (tracking and registry) at a store and make sure the experiment exists.

    Parameters
    ----------
    tracking_uri : defaults to :func:`default_tracking_uri`. The folder of a SQLite
        database is created if missing, and so is the database; an existing file must
        be an MLflow store. Processes that open a new SQLite store at the same time
        take turns (MLflow's table creation is not safe to run twice at once).
    experiment_name : created if missing.
    artifact_location : where a new experiment stores artifacts (a path or URI).
        Defaults to ``artifacts/`` beside a SQLite database (for the default store,
        :func:`default_artifact_location`), and to the server's choice otherwise. An
        existing experiment keeps its own location.

    Returns
    -------
    str
        The experiment id.

    Raises
    ------
    ValueError
        The experiment exists but is deleted, or the SQLite file is empty, not a
        SQLite database, malformed or not an MLflow store (the message names it).
    """
    uri = tracking_uri or default_tracking_uri()
    db_path = sqlite_path(uri)
    if db_path is None:
        return _configure_experiment(uri, experiment_name, artifact_location, None)
    db_path = db_path.resolve()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite_lock(db_path):
        check_sqlite_store(db_path)
        return _configure_experiment(uri, experiment_name, artifact_location, db_path)


def _configure_experiment(
    uri: str, experiment_name: str, artifact_location: str | Path | None, db_path: Path | None
) -> str:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_registered_models(max_results=1)  # creates the registry tables now, under the lock

    location = _as_uri(artifact_location) if artifact_location is not None else None
    if location is None and db_path is not None:
        location = (db_path.parent / "artifacts").as_uri()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(experiment_name, artifact_location=location)
            logger.info(
                "created MLflow experiment %r (%s) with artifacts at %s", experiment_name, experiment_id, location
            )
            return experiment_id
        except MlflowException as error:  # another process created it meanwhile
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(experiment_name)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {experiment_name!r} ({experiment.experiment_id}) is deleted; "
            "restore it (mlflow experiments restore) or choose another name"
        )
    if artifact_location is not None and experiment.artifact_location != location:
        logger.warning(
            "experiment %r keeps its artifact location %s (asked for %s)",
            experiment_name,
            experiment.artifact_location,
            location,
        )
    return experiment.experiment_id


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int = 0, prefix: str = "") -> None:
    """Log the finite numbers of ``metrics`` to run ``run_id`` in one batch, as ``prefix + key`` at ``step``.

    NaN and infinite values (an undefined AP, an empty group) and non-numbers are left
    out: a metric that cannot be computed is absent, not a NaN that breaks the charts.
    """
    now = int(time.time() * 1000)
    finite = [
        Metric(key=f"{prefix}{key}", value=float(value), timestamp=now, step=step)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and math.isfinite(value)
    ]
    client.log_batch(run_id, metrics=finite)


def pip_requirements(config: EmoNetConfig | None = None) -> list[str]:
    """``name==version`` for each of :data:`MODEL_REQUIREMENTS`, as installed now, and
    ``timm`` when ``config`` names a timm encoder (``timm:<name>``) for either stream.

    Local version labels (``2.4.0+cpu``) are dropped: they name a wheel index, not a
    release that pip can find on PyPI.
    """
    names = list(MODEL_REQUIREMENTS)
    if config is not None and any(
        encoder.startswith(TIMM_PREFIX) for encoder in (config.model.backbone, config.model.context_encoder)
    ):
        names.append("timm")  # it brings huggingface-hub and safetensors, which it imports
    requirements = []
    for name in names:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(f"{name} is not installed, but the EmoNet model needs it") from None
        requirements.append(f"{name}=={version.split('+')[0]}")
    return requirements


def model_signature(uses_context: bool = False) -> ModelSignature:
    """The pyfunc's signature: image path or base64 in, the predict_frame columns out.

    All input columns are optional to MLflow's schema check, since a row needs only one
    of ``image_path``/``image_b64``; the model itself rejects a row with neither.
    """
    inputs = [ColSpec("string", "image_path", required=False), ColSpec("string", "image_b64", required=False)]
    if uses_context:
        inputs += [ColSpec("string", "context_path", required=False), ColSpec("string", "context_b64", required=False)]
    outputs = [ColSpec("string" if c == EMOTIONS_COLUMN else "double", c) for c in OUTPUT_COLUMNS]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def _example_png_b64(size: int = 32) -> str:
    """A small, deterministic RGB gradient as base64 PNG: an input example valid anywhere."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1][None, :]), axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _input_example(uses_context: bool, paths: Sequence[str | Path] | None) -> pd.DataFrame:
    if paths:
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"input example files not found: {missing}")
        example = pd.DataFrame({"image_path": [str(Path(p).resolve()) for p in paths]})
    else:
        example = pd.DataFrame({"image_b64": [_example_png_b64()]})
    if uses_context:
        example["context_b64"] = _example_png_b64(48)
    return example


@contextlib.contextmanager
def _run_context(run_id: str) -> Iterator[Run]:
    """Make ``run_id`` the active run of THIS thread, and leave its status as it was.

    MLflow's active run is thread-local, so this works from any worker thread. A run
    that was RUNNING stays RUNNING (MLflow records an end time on the way out; the
    owner's own ``end_run`` overwrites it).
    """
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield active
        return
    status = MlflowClient().get_run(run_id).info.status
    run = mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        yield run
    finally:
        mlflow.end_run(status=status)


def log_emonet_model(
    run_id: str,
    checkpoint_path: str | Path,
    normalization_path: str | Path | None = None,
    input_example_paths: Sequence[str | Path] | None = None,
    registered_model_name: str = "emonet",
    *,
    name: str = "model",
    batch_size: int = 32,
    device: str = "auto",
    config: EmoNetConfig | None = None,
    onnx: bool = True,
    check_csv: str | Path | None = None,
    img_dir: str | Path | None = None,
    quantize: str | None = None,
) -> ModelVersion:
    """Log the EmoNet pyfunc (models from code) to ``run_id`` and register it.

    The model is ``emonet/inference/pyfunc_model.py`` with the artifacts ``checkpoint`` (the
    serving part of ``checkpoint_path``: :func:`~emonet.models.checkpoint.write_serving_checkpoint`),
    ``normalization`` (JSON) and ``onnx`` (``emonet.onnx``, the network exported for ONNX
    Runtime and checked against torch: :func:`~emonet.tracking.model_export.export_checked_onnx`;
    absent when the export or its check failed, which the version's ``onnx_export`` tag
    and a warning say), the whole ``emonet`` package as ``code_paths`` (so it
    loads in a process that never saw this repository), exact ``pip_requirements``
    (:func:`pip_requirements`), an explicit signature (:func:`model_signature`) and an
    input example.

    Parameters
    ----------
    run_id : the run to log to; works from any thread (nothing relies on the caller's
        active run), and the run's status is left unchanged.
    checkpoint_path : a ``best.pt`` written by :func:`emonet.training.trainer.fit`.
    normalization_path : the ``normalization.json`` of the training data; None logs
        the default 1..10 scale bounds.
    input_example_paths : crop files for the input example (an ``image_path`` column;
        they must exist now, and the example is only valid where they do). None uses a
        small base64 PNG in ``image_b64``, which is valid anywhere.
    registered_model_name : registry name of the new version.
    name : the logged model's name within the run.
    batch_size, device : the pyfunc's default ``model_config``: images per forward
        pass, and where it runs (``"auto"``: CUDA when the serving machine has it).
        Callers override them at load time with
        ``mlflow.pyfunc.load_model(uri, model_config={"inference_batch_size": 64, "inference_device": "cpu"})``
        or, for ``mlflow models serve``, ``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"inference_device": "cpu"}'``
        (MLflow accepts overrides only for keys logged here). MLflow also copies them
        into the run's params, hence the ``inference_`` prefix: the run already holds
        the training ``batch_size``.
    config : the checkpoint's own config, when the caller has loaded it already (e.g.
        :attr:`emonet.reports.evaluation.EvaluationReport.config`): its variant and backbone
        are used and the checkpoint is not loaded again. None loads the checkpoint,
        which also checks it before anything is logged.
    onnx : export the model to ONNX (the default); False logs the torch runtime only.
    check_csv, img_dir : the split CSV (validation, normally) whose first crops the export
        is checked on, and its image arrays; None checks it on seeded random images.
    quantize : ``"int8"`` also logs an INT8 copy of the export (artifact ``onnx_int8``),
        calibrated on the first crops of ``check_csv`` (which it needs); its mAP difference
        from the float export on the whole of ``check_csv``, with its paired-bootstrap
        interval, goes to the run's metrics (``int8_val_mAP_difference``, ``_low``,
        ``_high``) and the version's ``onnx_int8`` tag
        (:func:`~emonet.tracking.model_export.quantize_checked_int8`). It is served only
        with ``inference_runtime`` ``onnxruntime-int8``. None (default): no INT8 copy.

    Returns
    -------
    ModelVersion
        The new registered version (its ``source`` is the logged model's URI).

    Raises
    ------
    FileNotFoundError
        A missing checkpoint, normalization or example file.
    ValueError
        The checkpoint is not an EmoNet checkpoint, an unknown ``quantize``, or
        ``quantize`` without ``onnx`` or ``check_csv``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_export_options(onnx, check_csv, img_dir, quantize)
    checkpoint_path = Path(checkpoint_path).resolve()
    if config is None:
        _, config, _ = load_checkpoint(checkpoint_path)  # fails early on a bad file
    elif not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
    example = _input_example(config.model.uses_context, input_example_paths)
    client = MlflowClient()

    with tempfile.TemporaryDirectory(prefix="emonet_model_") as tmp:
        if normalization_path is None:
            normalization_path = AffectNormalizer().save(Path(tmp) / "normalization.json")
            logger.info("no normalization given; logging the default 1..10 scale bounds")
        normalization_path = Path(normalization_path).resolve()
        if not normalization_path.is_file():
            raise FileNotFoundError(f"normalization file not found: {normalization_path}")
        AffectNormalizer.load(normalization_path)  # validate before logging

        # The model carries the serving checkpoint: the weights without the optimizer state.
        # A finished run wrote it with its thresholds; an older run's is derived here.
        serving_path = serving_checkpoint_of(checkpoint_path) or write_serving_checkpoint(
            checkpoint_path, Path(tmp) / SERVING_CHECKPOINT
        )
        exports = make_exports(serving_path, tmp, onnx=onnx, check_csv=check_csv, img_dir=img_dir, quantize=quantize)
        # The names emonet.inference.pyfunc_model reads them by.
        artifacts = {"checkpoint": str(serving_path), "normalization": str(normalization_path)}
        artifacts.update(exports.artifacts())
        with _run_context(run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts=artifacts,
                code_paths=[str(PACKAGE_DIR)],
                pip_requirements=pip_requirements(config),
                signature=model_signature(config.model.uses_context),
                input_example=example,
                model_config={
                    "inference_batch_size": int(batch_size),
                    "inference_device": device,
                    "inference_runtime": "auto",
                    # Logged so that they can be overridden at load time (MLflow ignores
                    # load-time keys a model was not logged with).
                    "inference_max_pixels": DEFAULT_MAX_PIXELS,
                    "inference_max_rows": DEFAULT_MAX_ROWS,
                    "inference_max_request_pixels": DEFAULT_MAX_REQUEST_PIXELS,
                    "inference_image_root": "",
                },
                registered_model_name=registered_model_name,
            )
    version = client.get_model_version(registered_model_name, str(info.registered_model_version))
    tags = {"variant": config.model.variant, "backbone": config.model.backbone, **exports.tags()}
    for key, value in (exports.int8.metrics() if exports.int8 is not None else {}).items():
        client.log_metric(run_id, key, value)
    for key, value in tags.items():
        client.set_model_version_tag(registered_model_name, version.version, key, value)
    logger.info(
        "logged %s to run %s and registered %s version %s",
        info.model_uri,
        run_id,
        registered_model_name,
        version.version,
    )
    return client.get_model_version(registered_model_name, version.version)
