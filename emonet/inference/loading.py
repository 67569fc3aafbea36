"""Loading a model for prediction: a :class:`~emonet.inference.predictor.Predictor` from a
checkpoint file, an MLflow model URI, or a Predictor already built."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from emonet.data.normalize import AffectNormalizer
from emonet.inference.predictor import Predictor
from emonet.models.devices import resolve_device
from emonet.utils.store import check_store

logger = logging.getLogger(__name__)

__all__ = ["ModelSource", "describe_model", "is_mlflow_uri", "load_predictor"]

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

    Raises
    ------
    FileNotFoundError
        No checkpoint at the given path.
    ValueError
        A bad ``batch_size``, a file that is not an EmoNet checkpoint, or an MLflow
        model that is not an EmoNet pyfunc.
    """
    if isinstance(model, Predictor):
        return model
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model must be a Predictor, a checkpoint path or an MLflow URI, got {type(model).__name__}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if is_mlflow_uri(model):
        return _load_mlflow_predictor(str(model), device, batch_size, normalizer)
    return Predictor.from_checkpoint(
        model, normalizer=normalizer, device=resolve_device(device), batch_size=batch_size or 32
    )


def _load_mlflow_predictor(
    uri: str, device: str, batch_size: int | None, normalizer: AffectNormalizer | str | Path | None
) -> Predictor:
    import mlflow  # heavy; only needed for MLflow models

    if normalizer is not None:
        logger.warning("normalizer ignored: the MLflow model %s carries its own normalization", uri)
    model_config: dict[str, Any] = {"inference_device": device}
    if batch_size is not None:
        model_config["inference_batch_size"] = batch_size
    # MLflow would create its tables in an empty or foreign SQLite file, then fail on it.
    for store in {mlflow.get_tracking_uri(), mlflow.get_registry_uri()}:
        check_store(store)
    pyfunc = mlflow.pyfunc.load_model(uri, model_config=model_config)
    try:
        python_model = pyfunc.unwrap_python_model()
    except Exception as error:  # MLflow raises MlflowException for non-Python models
        raise ValueError(f"{uri} is not an EmoNet pyfunc model: {error}") from None
    predictor = getattr(python_model, "predictor", None)
    if not isinstance(predictor, Predictor):
        raise ValueError(f"{uri} is not an EmoNet pyfunc model (it holds {type(python_model).__name__})")
    logger.info("loaded %s (%s, %s) on %s", uri, predictor.variant, predictor.config.model.backbone, predictor.device)
    return predictor


def describe_model(model: ModelSource) -> str:
    """A short text naming where a model came from, for summaries and logs."""
    if isinstance(model, Predictor):
        return f"Predictor({model.variant}, {model.config.model.backbone})"
    return str(model)
