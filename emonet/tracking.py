"""MLflow plumbing for EmoNet: where runs are stored, logging the pyfunc model from code with
its checkpoint, moving the ``champion`` alias only to a model that beats it on the same test
split, and closing the runs of flows that were killed."""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import io
import logging
import math
import os
import socket
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import psutil
from filelock import FileLock
from filelock import Timeout as FileLockTimeout
from mlflow import MlflowClient
from mlflow.entities import Metric, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.types import ColSpec, Schema
from PIL import Image

from emonet.annotations import load_annotations
from emonet.data import EmoticDataset
from emonet.images import DEFAULT_MAX_PIXELS
from emonet.inference import EMOTIONS_COLUMN, OUTPUT_COLUMNS
from emonet.metrics import mean_average_precision_score
from emonet.normalize import AffectNormalizer

logger = logging.getLogger(__name__)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEMO_MODEL_NAME",
    "MODEL_NAME",
    "close_stale_runs",
    "configure_mlflow",
    "default_artifact_location",
    "default_tracking_uri",
    "end_open_runs",
    "find_run_version",
    "log_emonet_model",
    "log_metrics",
    "model_signature",
    "pip_requirements",
    "process_tags",
    "promote_model",
    "score_model_on_split",
    "split_score_tag",
]

PACKAGE_DIR = Path(__file__).resolve().parent
PYFUNC_MODEL_FILE = PACKAGE_DIR / "pyfunc_model.py"
MLRUNS_DIRNAME = "mlruns"
DB_FILENAME = "mlflow.db"

MODEL_NAME = "emonet"  # models trained on a real archive
DEMO_MODEL_NAME = "emonet-demo"  # models trained on the generated demo data, kept apart
CHAMPION = "champion"
CHALLENGER = "challenger"
TEST_MAP_TAG = "test_mAP"  # version tag: the version's test mAP
TEST_SPLIT_TAG = "test_split"  # version tag: fingerprint of the test split it was scored on
TEST_MAP_METRIC = "test_mAP"  # run metric read when a champion predates the version tag
# Version tag prefix: "test_mAP.<first 16 hex digits of a split fingerprint>" holds the
# version's test mAP on that split (its own, or one it was re-scored on as champion).
SPLIT_SCORE_TAG_PREFIX = "test_mAP."
SPLIT_SCORE_TAG_DIGITS = 16

# How long a registration waits for another one's decide-and-alias step; the step
# itself takes well under a second (re-scoring a champion happens outside the lock).
PROMOTION_LOCK_TIMEOUT_S = 600.0
# A registry lock (stores other than SQLite) older than this was left by a killed process.
STALE_REGISTRY_LOCK_S = 3600.0
# Attempts at the decision when other registrations keep moving the champion meanwhile.
PROMOTION_ATTEMPTS = 5

# Run tags naming the process that owns a run, so that a later run can tell that a run
# left RUNNING belongs to a process that is gone (killed, or crashed before closing it).
FLOW_RUN_TAG = "prefect.flow_run_id"
HOST_TAG = "emonet.host"
PID_TAG = "emonet.pid"
PROCESS_START_TAG = "emonet.process_start"
END_REASON_TAG = "emonet.end_reason"  # why a run was ended by someone other than its owner

# Distributions the logged model imports to load and predict (emonet.pyfunc_model and
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
)


# --------------------------------------------------------------------------- store


def _repo_root(root: str | Path | None) -> Path:
    return (Path(root) if root is not None else PACKAGE_DIR.parent).resolve()


def default_tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``<root>/mlruns/mlflow.db``.

    Parameters
    ----------
    root : folder holding ``mlruns/``; the repository root (the parent of the
        ``emonet`` package) by default. ``mlruns/`` is created if missing.

    Returns
    -------
    str
        e.g. ``sqlite:////abs/path/mlruns/mlflow.db`` (MLflow's file store is deprecated).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    mlruns = _repo_root(root) / MLRUNS_DIRNAME
    mlruns.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(mlruns / DB_FILENAME).as_posix()}"


def default_artifact_location(root: str | Path | None = None) -> str:
    """``<root>/mlruns/artifacts`` as an absolute ``file://`` URI (root as in :func:`default_tracking_uri`)."""
    return (_repo_root(root) / MLRUNS_DIRNAME / "artifacts").as_uri()


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def _as_uri(location: str | Path) -> str:
    text = str(location)
    if isinstance(location, Path) or not urlparse(text).scheme or len(urlparse(text).scheme) == 1:
        # A plain (possibly relative) path; one-letter schemes are Windows drives.
        return Path(text).expanduser().resolve().as_uri()
    return text


def _lock_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".lock")


@contextlib.contextmanager
def _sqlite_lock(db_path: Path, timeout: float = PROMOTION_LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive lock on ``<db>.lock`` beside a SQLite store, across processes.

    The OS releases it when its holder dies, so a killed run never blocks the next one.
    """
    lock_path = _lock_path(db_path)
    try:
        with FileLock(lock_path, timeout=timeout):
            yield
    except FileLockTimeout:
        raise TimeoutError(f"another process held {lock_path} for more than {timeout:.0f} s") from None


SQLITE_HEADER = b"SQLite format 3\x00"


def _check_sqlite_store(db_path: Path) -> None:
    """Refuse an existing file that is not an MLflow SQLite store.

    MLflow would silently create fresh tables in an empty file (losing the registry
    without a word) and fails without naming the file on a malformed one.
    """
    if not db_path.exists():
        return
    if not db_path.is_file():
        raise ValueError(f"MLflow store {db_path} is not a file")
    remedy = "restore it from a backup, or move it away to start a new, empty store"
    if db_path.stat().st_size == 0:
        raise ValueError(f"MLflow store {db_path} is empty (0 bytes), not an MLflow database: {remedy}")
    with open(db_path, "rb") as file:
        header = file.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise ValueError(f"MLflow store {db_path} is not a SQLite database: {remedy}")
    try:
        with contextlib.closing(sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=30)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as error:
        raise ValueError(f"MLflow store {db_path} is malformed ({error}): {remedy}") from None
    if not {"experiments", "alembic_version"} <= tables:
        raise ValueError(f"{db_path} is a SQLite database but not an MLflow store (no experiments table): {remedy}")


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
    db_path = _sqlite_path(uri)
    if db_path is None:
        return _configure_experiment(uri, experiment_name, artifact_location, None)
    db_path = db_path.resolve()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with _sqlite_lock(db_path):
        _check_sqlite_store(db_path)
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


# --------------------------------------------------------------------------- model logging


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


def pip_requirements() -> list[str]:
    """``name==version`` for each of :data:`MODEL_REQUIREMENTS`, as installed now.

    Local version labels (``2.4.0+cpu``) are dropped: they name a wheel index, not a
    release that pip can find on PyPI.
    """
    requirements = []
    for name in MODEL_REQUIREMENTS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(f"{name} is not installed, but the EmoNet model needs it") from None
        requirements.append(f"{name}=={version.split('+')[0]}")
    return requirements


def model_signature(variant: str = "body") -> ModelSignature:
    """The pyfunc's signature: image path or base64 in, the predict_frame columns out.

    All input columns are optional to MLflow's schema check, since a row needs only one
    of ``image_path``/``image_b64``; the model itself rejects a row with neither.
    """
    inputs = [ColSpec("string", "image_path", required=False), ColSpec("string", "image_b64", required=False)]
    if variant == "body_context":
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


def _input_example(variant: str, paths: Sequence[str | Path] | None) -> pd.DataFrame:
    if paths:
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"input example files not found: {missing}")
        example = pd.DataFrame({"image_path": [str(Path(p).resolve()) for p in paths]})
    else:
        example = pd.DataFrame({"image_b64": [_example_png_b64()]})
    if variant == "body_context":
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
) -> ModelVersion:
    """Log the EmoNet pyfunc (models from code) to ``run_id`` and register it.

    The model is ``emonet/pyfunc_model.py`` with the artifacts ``checkpoint`` and
    ``normalization`` (JSON), the whole ``emonet`` package as ``code_paths`` (so it
    loads in a process that never saw this repository), exact ``pip_requirements``
    (:func:`pip_requirements`), an explicit signature (:func:`model_signature`) and an
    input example.

    Parameters
    ----------
    run_id : the run to log to; works from any thread (nothing relies on the caller's
        active run), and the run's status is left unchanged.
    checkpoint_path : a ``best.pt`` written by :func:`emonet.train.fit`.
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

    Returns
    -------
    ModelVersion
        The new registered version (its ``source`` is the logged model's URI).

    Raises
    ------
    FileNotFoundError
        A missing checkpoint, normalization or example file.
    ValueError
        The checkpoint is not an EmoNet checkpoint.
    """
    from emonet.checkpoint import load_checkpoint  # heavy; only needed here

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    checkpoint_path = Path(checkpoint_path).resolve()
    _, config, _ = load_checkpoint(checkpoint_path)  # fails early on a bad file
    variant = config.model.variant
    example = _input_example(variant, input_example_paths)
    client = MlflowClient()

    with tempfile.TemporaryDirectory(prefix="emonet_model_") as tmp:
        if normalization_path is None:
            normalization_path = AffectNormalizer().save(Path(tmp) / "normalization.json")
            logger.info("no normalization given; logging the default 1..10 scale bounds")
        normalization_path = Path(normalization_path).resolve()
        if not normalization_path.is_file():
            raise FileNotFoundError(f"normalization file not found: {normalization_path}")
        AffectNormalizer.load(normalization_path)  # validate before logging

        with _run_context(run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts={"checkpoint": str(checkpoint_path), "normalization": str(normalization_path)},
                code_paths=[str(PACKAGE_DIR)],
                pip_requirements=pip_requirements(),
                signature=model_signature(variant),
                input_example=example,
                model_config={
                    "inference_batch_size": int(batch_size),
                    "inference_device": device,
                    # Logged so that they can be overridden at load time (MLflow ignores
                    # load-time keys a model was not logged with).
                    "inference_max_pixels": DEFAULT_MAX_PIXELS,
                    "inference_image_root": "",
                },
                registered_model_name=registered_model_name,
            )
    version = client.get_model_version(registered_model_name, str(info.registered_model_version))
    for key, value in (("variant", variant), ("backbone", config.model.backbone)):
        client.set_model_version_tag(registered_model_name, version.version, key, value)
    logger.info(
        "logged %s to run %s and registered %s version %s",
        info.model_uri,
        run_id,
        registered_model_name,
        version.version,
    )
    return client.get_model_version(registered_model_name, version.version)


# --------------------------------------------------------------------------- promotion


def find_run_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version of ``name`` registered from ``run_id``, if any (the oldest if several).

    A retried registration looks here first, so one run never gets two versions.
    """
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def split_score_tag(test_split_id: str) -> str:
    """The version tag holding a test mAP on the split ``test_split_id`` (a fingerprint)."""
    return f"{SPLIT_SCORE_TAG_PREFIX}{test_split_id.removeprefix('sha256:')[:SPLIT_SCORE_TAG_DIGITS]}"


def score_model_on_split(model_uri: str, test_csv: str | Path, img_dir: str | Path) -> float:
    """Test mAP of a model on a labelled split: how a champion is re-scored on a new split.

    Parameters
    ----------
    model_uri : an MLflow model URI (``models:/emonet/3``) or a checkpoint path,
        loaded with :func:`emonet.batch.load_predictor`.
    test_csv : the split in the archive's layout: ``Crop_name`` (and ``Arr_name`` for
        ``body_context`` models) and the 26 emotion columns.
    img_dir : the archive's ``img_arrs`` folder.

    Returns
    -------
    float
        :func:`emonet.metrics.mean_average_precision_score` of the model's probabilities.
    """
    from emonet.batch import load_predictor  # loads torch models; only needed here

    predictor = load_predictor(model_uri)
    annotations = load_annotations(test_csv)
    dataset = EmoticDataset(annotations, img_dir, predictor.transform, with_context=predictor.needs_context)
    predictions = predictor.predict(dataset, desc="re-score")
    score = mean_average_precision_score(predictions.emotions_true, predictions.emotion_prob)
    logger.info("%s scores test mAP %.4f on %s (%d rows)", model_uri, score, test_csv, len(annotations))
    return float(score)


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    # The registered model's alias map, rather than get_model_version_by_alias: stores
    # disagree on the error code for a missing alias.
    aliases = client.get_registered_model(name).aliases or {}
    version = aliases.get(CHAMPION)
    return client.get_model_version(name, str(version)) if version is not None else None


def _finite(value: Any) -> float | None:
    try:
        result = float(value) if value is not None else None
    except ValueError:
        return None
    return result if result is not None and math.isfinite(result) else None


def _recorded_map(client: MlflowClient, version: ModelVersion, test_split_id: str) -> float | None:
    """A version's recorded test mAP on ``test_split_id``, or None if it was never scored there.

    Its own split: the ``test_mAP`` tag, else its run's ``test_mAP`` metric (a version
    registered by hand); another split: the ``test_mAP.<split>`` tag of a re-scoring.
    """
    tags = version.tags
    if tags.get(TEST_SPLIT_TAG) == test_split_id:
        value: Any = tags.get(TEST_MAP_TAG)
        if value is None and version.run_id:
            try:
                value = client.get_run(version.run_id).data.metrics.get(TEST_MAP_METRIC)
            except MlflowException:
                value = None
        if _finite(value) is not None:
            return _finite(value)
    return _finite(tags.get(split_score_tag(test_split_id)))


def _champion_map_on_split(
    client: MlflowClient,
    name: str,
    champion: ModelVersion,
    test_split_id: str,
    test_csv: str | Path | None,
    img_dir: str | Path | None,
) -> tuple[float | None, str | None]:
    """The champion's test mAP on the candidate's split, recorded or re-scored now.

    Returns ``(score, None)``, or ``(None, why)`` when the champion cannot be scored
    (it does not load or predict: deleted artifacts, incompatible code).
    """
    recorded = _recorded_map(client, champion, test_split_id)
    if recorded is not None:
        return recorded, None
    if test_csv is None or img_dir is None:
        raise ValueError(
            f"champion version {champion.version} of {name!r} was never scored on test split {test_split_id}: "
            "pass test_csv and img_dir so that it can be re-scored"
        )
    uri = f"models:/{name}/{champion.version}"
    logger.info("re-scoring champion %s on the candidate's test split %s", uri, test_split_id)
    try:
        score = score_model_on_split(uri, test_csv, img_dir)
    except Exception as error:  # any failure to load or run the old model: it cannot defend its title
        logger.warning("champion %s cannot be scored on %s", uri, test_csv, exc_info=True)
        return None, f"{type(error).__name__}: {error}"
    client.set_model_version_tag(name, champion.version, split_score_tag(test_split_id), repr(score))
    return score, None


@contextlib.contextmanager
def _registry_lock(client: MlflowClient, name: str, timeout: float = PROMOTION_LOCK_TIMEOUT_S) -> Iterator[None]:
    """A lock held as a registered model ``<name>.promotion-lock``, for stores with no shared file.

    Creating a registered model is atomic in every store (its name is unique), so only
    one process holds the lock; one older than :data:`STALE_REGISTRY_LOCK_S` was left
    by a killed holder and is broken.
    """
    lock_name = f"{name}.promotion-lock"
    owner = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(
                lock_name,
                tags={"owner": owner, "acquired": repr(time.time())},
                description=f"held while a new version of {name!r} is placed; deleted right after",
            )
            break
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        try:
            held = client.get_registered_model(lock_name)
        except MlflowException:
            continue  # released meanwhile
        acquired = _finite(held.tags.get("acquired"))
        if acquired is not None and time.time() - acquired > STALE_REGISTRY_LOCK_S:
            logger.warning("breaking the stale promotion lock %r of %s", lock_name, held.tags.get("owner"))
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock_name)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the promotion lock {lock_name!r} was held by {held.tags.get('owner')} for more than {timeout:.0f} s"
            )
        time.sleep(0.2)
    try:
        yield
    finally:
        client.delete_registered_model(lock_name)


def _promotion_lock(client: MlflowClient, name: str) -> contextlib.AbstractContextManager[None]:
    """The lock that makes decide-and-alias atomic: a file beside a SQLite store, else the registry's."""
    db_path = _sqlite_path(client._registry_uri)  # MlflowClient keeps the URI it resolved
    return _sqlite_lock(db_path.resolve()) if db_path is not None else _registry_lock(client, name)


def promote_model(
    client: MlflowClient,
    name: str,
    version: str | int,
    test_map: float,
    test_split_id: str,
    run_id: str,
    *,
    test_csv: str | Path | None = None,
    img_dir: str | Path | None = None,
    min_improvement: float = 0.0,
) -> dict[str, Any]:
    """Give a new version the ``champion`` alias if it beats the champion, else ``challenger``.

    Like is compared with like: the champion's score on the candidate's test split is
    its recorded one when it was scored on that split, else the champion is loaded from
    the registry and re-scored on ``test_csv`` now (:func:`score_model_on_split`), and
    the score is kept on the champion version as the tag ``test_mAP.<split>``. The
    candidate becomes champion when its test mAP exceeds that score by more than
    ``min_improvement``; a champion that cannot be loaded or scored is replaced.

    Concurrent registrations are safe: the decision and the alias move happen under a
    lock (a file beside a SQLite store, a lock entry in the registry otherwise), and a
    decision is remade if another registration moved the champion while this one was
    scoring it. So the better version ends as champion, whichever finishes first.

    The version gets the tags ``test_mAP``, ``test_split`` and ``test_mAP.<split>``; the
    run the tags ``promotion_decision``, ``promotion_reason``, ``promotion_alias``,
    ``champion_previous_version`` and the metrics ``candidate_test_mAP`` and (when
    known) ``champion_previous_test_mAP``, the champion's score on this split.

    Parameters
    ----------
    client : an ``MlflowClient`` on the registry.
    name, version : the registered model version to place.
    test_map : its test mAP (on the scale :func:`score_model_on_split` gives).
    test_split_id : fingerprint of the test split, e.g. :func:`emonet.evaluation.split_fingerprint` of the test split.
    run_id : the run that produced the version; the decision is logged there.
    test_csv, img_dir : the test split (archive layout) and its ``img_arrs`` folder, to
        re-score a champion that was scored on another split (required then).
    min_improvement : how much higher than the champion's the test mAP must be; 0.0
        means strictly higher.

    Returns
    -------
    dict
        ``alias`` (``"champion"`` or ``"challenger"``), ``decision`` (``first_version``,
        ``promoted``, ``not_better``, ``champion_unavailable`` or
        ``already_champion``), ``reason`` (a sentence), ``new_map``, ``previous_map``
        (the champion's score on this split) and ``previous_version`` (None when there
        was no champion).

    Raises
    ------
    ValueError
        ``test_map`` or ``min_improvement`` is not a finite number (the latter >= 0),
        ``test_split_id`` is empty, or a champion needs re-scoring without ``test_csv``.
    """
    test_map = float(test_map)
    if not math.isfinite(test_map):
        raise ValueError(f"test_map must be a finite number, got {test_map}")
    min_improvement = float(min_improvement)
    if not (math.isfinite(min_improvement) and min_improvement >= 0):
        raise ValueError(f"min_improvement must be a finite number >= 0, got {min_improvement}")
    if not isinstance(test_split_id, str) or not test_split_id.strip():
        raise ValueError(f"test_split_id must be a non-empty string, got {test_split_id!r}")
    version = str(version)
    client.get_model_version(name, version)  # fails clearly on an unknown version
    for key, value in (
        (TEST_MAP_TAG, repr(test_map)),
        (TEST_SPLIT_TAG, test_split_id),
        (split_score_tag(test_split_id), repr(test_map)),
    ):
        client.set_model_version_tag(name, version, key, value)

    for _ in range(PROMOTION_ATTEMPTS):
        # Scoring the champion can take minutes (a re-scoring predicts the whole split),
        # so it happens outside the lock; under the lock, the champion must be unchanged.
        champion = _champion(client, name)
        previous_version = str(champion.version) if champion is not None else None
        previous_map, unavailable = None, None
        if champion is not None and previous_version != version:
            previous_map, unavailable = _champion_map_on_split(
                client, name, champion, test_split_id, test_csv, img_dir
            )
        elif champion is not None:
            previous_map = test_map
        with _promotion_lock(client, name):
            current = _champion(client, name)
            if (str(current.version) if current is not None else None) != previous_version:
                logger.info("another registration moved the champion of %r meanwhile: deciding again", name)
                continue
            alias, decision, reason = _decide(
                version, test_map, previous_version, previous_map, unavailable, min_improvement
            )
            client.set_registered_model_alias(name, alias, version)
        break
    else:
        raise RuntimeError(f"the champion of {name!r} kept moving during {PROMOTION_ATTEMPTS} attempts; retry later")

    client.set_tag(run_id, "promotion_decision", decision)
    client.set_tag(run_id, "promotion_reason", reason)
    client.set_tag(run_id, "promotion_alias", alias)
    client.set_tag(run_id, "champion_previous_version", previous_version or "none")
    client.log_metric(run_id, "candidate_test_mAP", test_map)
    if previous_map is not None:
        client.log_metric(run_id, "champion_previous_test_mAP", previous_map)
    log = logger.warning if decision == "champion_unavailable" else logger.info
    log("%s version %s -> %s (%s): %s", name, version, alias, decision, reason)
    return {
        "alias": alias,
        "decision": decision,
        "reason": reason,
        "new_map": test_map,
        "previous_map": previous_map,
        "previous_version": previous_version,
    }


def _decide(
    version: str,
    test_map: float,
    champion: str | None,
    champion_map: float | None,
    unavailable: str | None,
    min_improvement: float,
) -> tuple[str, str, str]:
    """``(alias, decision, reason)`` of the rule in :func:`promote_model`."""
    if champion is None:
        return CHAMPION, "first_version", "no champion yet: the first version becomes champion"
    if champion == version:
        return CHAMPION, "already_champion", f"version {version} already is the champion"
    if unavailable is not None:
        return CHAMPION, "champion_unavailable", (
            f"champion version {champion} cannot be scored on this test split ({unavailable}); "
            f"version {version} replaces it"
        )
    margin = f" + min_improvement {min_improvement:g}" if min_improvement else ""
    if test_map > champion_map + min_improvement:
        return CHAMPION, "promoted", (
            f"test mAP {test_map:.4f} beats champion version {champion}'s {champion_map:.4f}{margin} on the same split"
        )
    return CHALLENGER, "not_better", (
        f"test mAP {test_map:.4f} does not beat champion version {champion}'s {champion_map:.4f}{margin} "
        "on the same split; the champion stays"
    )


# --------------------------------------------------------------------------- runs left RUNNING


def process_tags() -> dict[str, str]:
    """Run tags naming this process (host, pid, start time), for :func:`close_stale_runs`."""
    process = psutil.Process()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(process.pid), PROCESS_START_TAG: repr(process.create_time())}


def _owner_gone(tags: dict[str, str]) -> bool:
    """Whether the process named by a run's :func:`process_tags` has ended.

    Only known on the same host; the start time tells a reused pid from the owner.
    """
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return False
    try:
        started = psutil.Process(int(tags[PID_TAG])).create_time()
    except psutil.NoSuchProcess:
        return True
    except (ValueError, psutil.Error):  # a malformed tag, or a process we may not inspect
        return False
    recorded = _finite(tags.get(PROCESS_START_TAG))
    return recorded is not None and abs(started - recorded) > 1.0


def end_run_with_reason(client: MlflowClient, run_id: str, status: str, reason: str) -> None:
    """End a run someone else left open: ``status`` (``KILLED``/``FAILED``) and the tag ``emonet.end_reason``."""
    client.set_tag(run_id, END_REASON_TAG, reason)
    client.set_terminated(run_id, status=status)
    logger.warning("marked MLflow run %s %s: %s", run_id, status, reason)


def _running_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs(
            experiment_ids, f"attributes.status = 'RUNNING'{filter_string}", max_results=1000, page_token=page_token
        )
        runs += list(page)
        page_token = page.token
        if not page_token:
            return runs


def close_stale_runs(
    client: MlflowClient,
    experiment_id: str,
    final_state_of: Callable[[str], str | None],
    keep: Sequence[str] = (),
) -> list[dict[str, str]]:
    """End the runs of an experiment left ``RUNNING`` by flows that were killed or crashed.

    A run is stale when its Prefect flow run (tag ``prefect.flow_run_id``) has ended
    (``final_state_of`` returns the final state's name: ``KILLED`` for ``CANCELLED`` and
    ``CRASHED``, else ``FAILED``), or when its process (:func:`process_tags`) ran on
    this host and is gone (``KILLED``: a SIGKILL leaves the flow run itself ``RUNNING``).
    Runs of live processes and of unknown owners (another host, no tags) are kept.

    Parameters
    ----------
    client : an ``MlflowClient`` on the tracking store.
    experiment_id : the experiment to look in.
    final_state_of : a flow run id -> its final state's type (``"COMPLETED"``,
        ``"FAILED"``, ``"CRASHED"``, ``"CANCELLED"``), or None while it runs or when unknown.
    keep : run ids never to close (the caller's own).

    Returns
    -------
    list of dict
        ``run_id``, ``status`` and ``reason`` of every run closed (tagged ``emonet.end_reason``).
    """
    closed = []
    for run in _running_runs(client, [experiment_id], ""):
        if run.info.run_id in keep:
            continue
        tags = run.data.tags
        flow_run_id = tags.get(FLOW_RUN_TAG)
        state = final_state_of(flow_run_id) if flow_run_id and flow_run_id != "None" else None
        if state is not None:
            status = "KILLED" if state in ("CANCELLED", "CRASHED") else "FAILED"
            reason = f"Prefect flow run {flow_run_id} ended ({state}) without closing its MLflow run"
        elif _owner_gone(tags):
            status = "KILLED"
            reason = (
                f"process {tags[PID_TAG]} on {tags[HOST_TAG]} ended (killed or crashed) without closing its MLflow run"
            )
        else:
            continue
        end_run_with_reason(client, run.info.run_id, status, reason)
        closed.append({"run_id": run.info.run_id, "status": status, "reason": reason})
    return closed


def end_open_runs(client: MlflowClient, flow_run_id: str, status: str, reason: str) -> list[str]:
    """End the ``RUNNING`` runs of a Prefect flow run (tag ``prefect.flow_run_id``), in any experiment.

    For a flow's crash and cancellation hooks, which run when no ``finally`` block does.
    Returns the ids of the runs ended.
    """
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    if not experiment_ids:
        return []
    runs = _running_runs(client, experiment_ids, f" and tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")
    for run in runs:
        end_run_with_reason(client, run.info.run_id, status, reason)
    return [run.info.run_id for run in runs]
