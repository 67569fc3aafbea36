"""MLflow plumbing for EmoNet: where runs are stored, logging the pyfunc model from code with
its checkpoint, and moving the ``champion`` alias only to a model that beats it on the same test split."""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import io
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.types import ColSpec, Schema
from PIL import Image

from emonet.inference import EMOTIONS_COLUMN, OUTPUT_COLUMNS
from emonet.normalize import AffectNormalizer

logger = logging.getLogger(__name__)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "configure_mlflow",
    "default_artifact_location",
    "default_tracking_uri",
    "log_emonet_model",
    "model_signature",
    "pip_requirements",
    "promote_model",
]

PACKAGE_DIR = Path(__file__).resolve().parent
PYFUNC_MODEL_FILE = PACKAGE_DIR / "pyfunc_model.py"
MLRUNS_DIRNAME = "mlruns"
DB_FILENAME = "mlflow.db"

CHAMPION = "champion"
CHALLENGER = "challenger"
TEST_MAP_TAG = "test_mAP"  # version tag: the version's test mAP
TEST_SPLIT_TAG = "test_split"  # version tag: fingerprint of the test split it was scored on
TEST_MAP_METRIC = "test_mAP"  # run metric read when a champion predates the version tag

# Distributions the logged model needs at load time (emonet.train pulls in tqdm and
# scikit-learn through its metrics). Pinned to the versions installed when logging.
MODEL_REQUIREMENTS: tuple[str, ...] = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pillow",
    "mlflow",
    "pydantic",
    "pyyaml",
    "scikit-learn",
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


def configure_mlflow(
    tracking_uri: str | None = None,
    experiment_name: str = "emonet",
    artifact_location: str | Path | None = None,
) -> str:
    """Point MLflow (tracking and registry) at a store and make sure the experiment exists.

    Parameters
    ----------
    tracking_uri : defaults to :func:`default_tracking_uri`. The folder of a SQLite
        database is created if missing.
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
        The experiment exists but is deleted.
    """
    uri = tracking_uri or default_tracking_uri()
    db_path = _sqlite_path(uri)
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    location = _as_uri(artifact_location) if artifact_location is not None else None
    if location is None and db_path is not None:
        location = (db_path.parent / "artifacts").resolve().as_uri()
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
                model_config={"inference_batch_size": int(batch_size), "inference_device": device},
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


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    # The registered model's alias map, rather than get_model_version_by_alias: stores
    # disagree on the error code for a missing alias.
    aliases = client.get_registered_model(name).aliases or {}
    version = aliases.get(CHAMPION)
    return client.get_model_version(name, str(version)) if version is not None else None


def _recorded_map(client: MlflowClient, version: ModelVersion) -> float | None:
    """A version's test mAP: its tag, else its run's ``test_mAP`` metric, else None."""
    value: Any = version.tags.get(TEST_MAP_TAG)
    if value is None and version.run_id:
        try:
            value = client.get_run(version.run_id).data.metrics.get(TEST_MAP_METRIC)
        except MlflowException:
            value = None
    try:
        result = float(value) if value is not None else None
    except ValueError:
        return None
    return result if result is not None and math.isfinite(result) else None


def promote_model(
    client: MlflowClient,
    name: str,
    version: str | int,
    test_map: float,
    test_split_id: str,
    run_id: str,
) -> dict[str, Any]:
    """Give a new version the ``champion`` alias if it beats the champion, else ``challenger``.

    The first version of a model becomes champion. Later ones become champion only
    when their test mAP is strictly higher than the champion's on the SAME test split
    (the ``test_split`` version tags must be equal); on a different or unknown split
    the scores are not comparable, so the champion stays and the new version is
    challenger. The version gets the tags ``test_mAP`` and ``test_split``; the run
    gets the tags ``promotion_decision``, ``promotion_reason``, ``promotion_alias``,
    ``champion_previous_version`` and the metrics ``candidate_test_mAP`` and (when
    known) ``champion_previous_test_mAP``.

    Parameters
    ----------
    client : an ``MlflowClient`` on the registry.
    name, version : the registered model version to place.
    test_map : its test mAP (any scale, as long as every version uses the same).
    test_split_id : fingerprint of the test split, e.g. :func:`emonet.evaluation.split_fingerprint` of the test split.
    run_id : the run that produced the version; the decision is logged there.

    Returns
    -------
    dict
        ``alias`` (``"champion"`` or ``"challenger"``), ``decision`` (``first_version``,
        ``promoted``, ``not_better``, ``different_test_split``, ``no_champion_score`` or
        ``already_champion``), ``reason`` (a sentence), ``new_map``, ``previous_map``
        and ``previous_version`` (None when there was no champion).

    Raises
    ------
    ValueError
        ``test_map`` is not a finite number or ``test_split_id`` is empty.
    """
    test_map = float(test_map)
    if not math.isfinite(test_map):
        raise ValueError(f"test_map must be a finite number, got {test_map}")
    if not isinstance(test_split_id, str) or not test_split_id.strip():
        raise ValueError(f"test_split_id must be a non-empty string, got {test_split_id!r}")
    version = str(version)
    client.get_model_version(name, version)  # fails clearly on an unknown version
    client.set_model_version_tag(name, version, TEST_MAP_TAG, repr(test_map))
    client.set_model_version_tag(name, version, TEST_SPLIT_TAG, test_split_id)

    champion = _champion(client, name)
    previous_map: float | None = None
    previous_version: str | None = None
    if champion is None:
        alias, decision, reason = CHAMPION, "first_version", "no champion yet: the first version becomes champion"
    elif str(champion.version) == version:
        previous_version = version
        previous_map = _recorded_map(client, champion)
        alias, decision, reason = CHAMPION, "already_champion", f"version {version} already is the champion"
    else:
        previous_version = str(champion.version)
        previous_map = _recorded_map(client, champion)
        champion_split = champion.tags.get(TEST_SPLIT_TAG)
        if champion_split != test_split_id:
            alias, decision = CHALLENGER, "different_test_split"
            reason = (
                f"cannot compare with champion version {champion.version}: it was scored on test split "
                f"{champion_split or '(unknown)'}, this version on {test_split_id}; the champion stays"
            )
        elif previous_map is None:
            alias, decision = CHALLENGER, "no_champion_score"
            reason = f"champion version {champion.version} has no recorded test mAP; the champion stays"
        elif test_map > previous_map:
            alias, decision = CHAMPION, "promoted"
            reason = f"test mAP {test_map:.4f} beats champion version {champion.version}'s {previous_map:.4f}"
        else:
            alias, decision = CHALLENGER, "not_better"
            reason = (
                f"test mAP {test_map:.4f} does not beat champion version {champion.version}'s "
                f"{previous_map:.4f}; the champion stays"
            )

    client.set_registered_model_alias(name, alias, version)
    client.set_tag(run_id, "promotion_decision", decision)
    client.set_tag(run_id, "promotion_reason", reason)
    client.set_tag(run_id, "promotion_alias", alias)
    client.set_tag(run_id, "champion_previous_version", previous_version or "none")
    client.log_metric(run_id, "candidate_test_mAP", test_map)
    if previous_map is not None:
        client.log_metric(run_id, "champion_previous_test_mAP", previous_map)
    logger.info("%s version %s -> %s (%s): %s", name, version, alias, decision, reason)
    return {
        "alias": alias,
        "decision": decision,
        "reason": reason,
        "new_map": test_map,
        "previous_map": previous_map,
        "previous_version": previous_version,
    }
