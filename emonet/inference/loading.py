"""Loading a model for prediction: a :class:`~emonet.inference.predictor.Predictor` from a
checkpoint file, an MLflow model URI, or a Predictor already built."""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from emonet.data.normalize import AffectNormalizer
from emonet.inference.onnx_runtime import RUNTIMES
from emonet.inference.predictor import Predictor
from emonet.models.devices import resolve_device
from emonet.utils.store import check_store, without_password

logger = logging.getLogger(__name__)

__all__ = ["ModelSource", "check_registered_model_uri", "describe_model", "is_mlflow_uri", "load_predictor"]

ModelSource = Predictor | str | Path


def is_mlflow_uri(model: str | Path) -> bool:
    """Whether ``model`` names an MLflow model rather than a checkpoint file.

    True for URIs with a scheme (``models:/emonet@champion``, ``runs:/<id>/model``,
    ``s3://...``, ``file:///...``) and for a local folder holding an ``MLmodel`` file.
    One-letter schemes are Windows drive letters, i.e. plain paths.
    """
    if isinstance(model, str) and len(urlparse(model).scheme) > 1:
        return True
    return (Path(model) / "MLmodel").is_file()


def load_predictor(
    model: ModelSource,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    normalizer: AffectNormalizer | str | Path | None = None,
    runtime: str = "auto",
) -> Predictor:
    """A :class:`~emonet.inference.predictor.Predictor` from a checkpoint, an MLflow model or itself.

    Parameters
    ----------
    model : a :class:`Predictor` (returned as is: ``device``, ``batch_size`` and
        ``normalizer`` are ignored); an MLflow model URI such as
        ``models:/emonet@champion`` or ``runs:/<run_id>/model`` (or a local folder with
        an ``MLmodel`` file), loaded with the current tracking/registry URI; or the path
        of a checkpoint written by :func:`emonet.training.trainer.fit`.
    device : ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    batch_size : images per forward pass; None keeps the MLflow model's setting (or 32
        for a checkpoint).
    normalizer : for a checkpoint only (an MLflow model carries its own): an
        :class:`AffectNormalizer` or a ``normalization.json``; None uses the 1..10 bounds.
    runtime : what runs the network: ``"auto"`` (ONNX Runtime when an MLflow model has
        its ONNX export and runs on the CPU, else torch), ``"onnxruntime"``,
        ``"onnxruntime-int8"`` (a version registered with ``quantize="int8"``) or ``"torch"``
        (see :func:`~emonet.inference.onnx_runtime.resolve_runtime`). A checkpoint file
        has no export: it runs with torch.

    Raises
    ------
    FileNotFoundError
        No checkpoint at the given path.
    ValueError
        A bad ``batch_size`` or ``runtime`` (``onnxruntime`` for a checkpoint file, or
        for a model without an export), a file that is not an EmoNet checkpoint, an MLflow model
        that is not an EmoNet pyfunc, or a ``models:/`` URI whose registered model,
        version or alias does not exist (one line naming it and what does exist).

    Notes
    -----
    A ``models:/`` URI is resolved in the registry before anything is loaded, and the
    model is then loaded from a temporary copy (MLflow's ``dst_path``), which is removed
    once the model is in memory: MLflow writes a ``registered_model_meta`` file into the
    folder it loads a registered model from, so loading never writes into the store's
    artifact folders, which may be read-only.
    """
    if isinstance(model, Predictor):
        return model
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model must be a Predictor, a checkpoint path or an MLflow URI, got {type(model).__name__}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if is_mlflow_uri(model):
        return _load_mlflow_predictor(str(model), device, batch_size, normalizer, runtime)
    if runtime.startswith("onnxruntime"):
        raise ValueError(
            f"runtime {runtime!r} needs a registered model's ONNX export, and {model} is a checkpoint file: "
            "pass its models:/ URI, or use runtime 'torch' or 'auto'"
        )
    return Predictor.from_checkpoint(
        model, normalizer=normalizer, device=resolve_device(device), batch_size=batch_size or 32
    )


def _load_mlflow_predictor(
    uri: str, device: str, batch_size: int | None, normalizer: AffectNormalizer | str | Path | None, runtime: str
) -> Predictor:
    import mlflow  # heavy; only needed for MLflow models

    if normalizer is not None:
        logger.warning("normalizer ignored: the MLflow model %s carries its own normalization", uri)
    # A model registered before ONNX exports has no inference_runtime key, and MLflow drops
    # load-time keys a model was not logged with: such a model runs with torch, as it did.
    model_config: dict[str, Any] = {"inference_device": device, "inference_runtime": runtime}
    if batch_size is not None:
        model_config["inference_batch_size"] = batch_size
    # MLflow would create its tables in an empty or foreign SQLite file, then fail on it.
    for store in {mlflow.get_tracking_uri(), mlflow.get_registry_uri()}:
        check_store(store)
    if urlparse(uri).scheme == "models":
        check_registered_model_uri(uri)
        pyfunc = _load_pyfunc_from_copy(uri, model_config)
    else:
        pyfunc = mlflow.pyfunc.load_model(uri, model_config=model_config)
    try:
        python_model = pyfunc.unwrap_python_model()
    except Exception as error:  # MLflow raises MlflowException for non-Python models
        raise ValueError(f"{uri} is not an EmoNet pyfunc model: {error}") from None
    predictor = getattr(python_model, "predictor", None)
    if not isinstance(predictor, Predictor):
        raise ValueError(f"{uri} is not an EmoNet pyfunc model (it holds {type(python_model).__name__})")
    if runtime.startswith("onnxruntime") and predictor.runtime != runtime:
        # A version registered before exports drops the inference_runtime key and runs with torch.
        raise ValueError(
            f"runtime {runtime!r} needs the model's ONNX export, and {uri} has none: use 'torch' or 'auto'"
        )
    logger.info(
        "loaded %s (%s, %s) with %s on %s",
        uri,
        predictor.variant,
        predictor.config.model.backbone,
        predictor.runtime,
        predictor.device,
    )
    return predictor


def _load_pyfunc_from_copy(uri: str, model_config: dict[str, Any]) -> Any:
    """``mlflow.pyfunc.load_model`` with ``dst_path`` a temporary folder, removed afterwards.

    For a ``models:/`` URI MLflow's loader writes ``registered_model_meta`` into the folder
    it loads from; without ``dst_path`` that is the store's own artifact folder when the
    store is local. The EmoNet pyfunc reads its artifacts in ``load_context``, so the copy
    is not needed once the model is loaded.
    """
    import mlflow

    with tempfile.TemporaryDirectory(prefix="emonet-model-") as copy:
        try:
            return mlflow.pyfunc.load_model(uri, dst_path=copy, model_config=model_config)
        finally:
            # MLflow puts the copy's code_paths folder first on sys.path; it is gone below.
            sys.path[:] = [entry for entry in sys.path if not entry.startswith(copy)]


# Names, versions and aliases listed in a "does not exist" message; the rest are counted.
_LISTED = 20


def _listing(items: list[str], none: str) -> str:
    if not items:
        return none
    shown = ", ".join(items[:_LISTED])
    return shown + (f" (and {len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def _registered_names(client: Any) -> list[str]:
    names: list[str] = []
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        names.extend(model.name for model in page)
        token = page.token
        if not token:
            return sorted(names)


def _versions_and_aliases(client: Any, model: Any) -> str:
    try:
        found = client.search_model_versions(f"name = '{model.name}'")
        versions = _listing([str(v) for v in sorted((int(v.version) for v in found), reverse=True)], "none")
    except Exception:  # an odd name the filter syntax cannot quote, say: list the aliases only
        versions = "(could not be listed)"
    aliases = getattr(model, "aliases", None) or {}
    return (
        f"its versions: {versions}; "
        f"its aliases: {_listing([f'{a} -> {v}' for a, v in sorted(aliases.items())], 'none')}"
    )


def check_registered_model_uri(uri: str) -> None:
    """Check that a ``models:/`` URI names something in the registry, before MLflow loads it.

    Resolves ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/NAME/latest`` and
    ``models:/NAME/STAGE`` with the current registry URI (``models:/m-<id>``, a logged
    model's ID, and Databricks profile URIs are left to MLflow). Any other failure of the
    registry (an unreachable server, say) is left to MLflow's loader too.

    Raises
    ------
    ValueError
        One line: no registered model of that name (the registered names are listed),
        or no such version or alias of it (its versions and aliases are listed).
    """
    from mlflow import MlflowClient, get_registry_uri
    from mlflow.exceptions import MlflowException

    parsed = urlparse(uri)
    if parsed.scheme != "models" or parsed.netloc or not parsed.path.startswith("/"):
        return
    parts = parsed.path[1:].split("/")
    if len(parts) > 2 or not parts[0].strip():
        return  # MLflow explains the URI forms
    if len(parts) == 2:
        name, suffix, alias = parts[0], parts[1], None
    elif "@" in parts[0]:
        name, alias = parts[0].rsplit("@", 1)
        suffix = None
    else:
        return  # models:/<model_id>, a logged model
    if not name.strip() or (suffix is not None and not suffix.strip()) or (alias is not None and not alias.strip()):
        return

    client = MlflowClient()

    def missing(error: MlflowException) -> bool:
        return error.error_code == "RESOURCE_DOES_NOT_EXIST"

    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if not missing(error):
            return
        try:
            names = _listing([repr(n) for n in _registered_names(client)], "none")
        except Exception:  # a registry that serves names but not searches
            names = "(could not be listed)"
        raise ValueError(
            f"{uri}: no registered model named {name!r} in {without_password(get_registry_uri())}; "
            f"registered models: {names}"
        ) from None
    if alias is not None:
        if alias not in (getattr(model, "aliases", None) or {}):
            raise ValueError(
                f"{uri}: registered model {name!r} has no alias {alias!r}; {_versions_and_aliases(client, model)}"
            )
        return
    assert suffix is not None
    if suffix.isdigit():
        try:
            client.get_model_version(name, suffix)
        except MlflowException as error:
            if not missing(error):
                return
            raise ValueError(
                f"{uri}: registered model {name!r} has no version {suffix}; {_versions_and_aliases(client, model)}"
            ) from None
        return
    stage = None if suffix.lower() == "latest" else suffix
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stages are deprecated; MLflow still resolves them
            latest = client.get_latest_versions(name, None if stage is None else [stage])
    except MlflowException as error:
        if error.error_code != "INVALID_PARAMETER_VALUE":
            return
        latest = []  # not a stage MLflow knows either (an alias written as models:/NAME/ALIAS?)
    if not latest:
        what = "no versions" if stage is None else f"no version in stage {stage!r} (an alias is written {name}@{stage})"
        raise ValueError(f"{uri}: registered model {name!r} has {what}; {_versions_and_aliases(client, model)}")


def describe_model(model: ModelSource) -> str:
    """A short text naming where a model came from, for summaries and logs."""
    if isinstance(model, Predictor):
        return f"Predictor({model.variant}, {model.config.model.backbone})"
    return str(model)
