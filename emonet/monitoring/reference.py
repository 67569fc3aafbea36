"""A registered version's monitoring reference: its signals on its own validation split.

The reference is computed once per model version, on up to :data:`REFERENCE_ROWS`
validation crops (a seeded sample beyond), through the same pass as a monitored batch
(:func:`emonet.monitoring.scoring.score_batch`), and stored with the version: in the
artifacts of the run that registered it, under ``monitoring_reference/``
(``signals.csv``, ``features.npy``, ``labels.npy``, ``reference.json``), with the version
tag ``emonet.monitoring_reference`` saying what it was computed on. Registration stores
it; a version registered before gets it on first use, from the validation split of the
archive its run trained on (the run's ``data_root`` parameter) or from a split given.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from emonet.inference.predictor import Predictor
from emonet.monitoring.batches import open_batch
from emonet.monitoring.scoring import score_batch
from emonet.monitoring.signals import SIGNALS
from emonet.schema import EMOTIONS, annotations_path, arrays_dir
from emonet.utils.io import save_npy_atomic, write_csv_atomic, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "REFERENCE_ARTIFACT",
    "REFERENCE_ROWS",
    "REFERENCE_TAG",
    "Reference",
    "build_reference",
    "ensure_reference",
    "load_reference",
    "reference_split",
    "save_reference",
]

REFERENCE_ARTIFACT = "monitoring_reference"
REFERENCE_TAG = "emonet.monitoring_reference"
# Enough for the tests' power at a few hundred batch crops; the MMD test samples 400 of them.
REFERENCE_ROWS = 2000


@dataclass(frozen=True, eq=False)
class Reference:
    """The signals, features and labels of a version's validation crops, and what they came from."""

    table: pd.DataFrame
    features: np.ndarray
    labels: np.ndarray | None
    emotion_prob: np.ndarray
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.table)


def build_reference(
    predictor: Predictor,
    split_csv: str | Path,
    img_dir: str | Path,
    *,
    max_rows: int = REFERENCE_ROWS,
    seed: int = 0,
    face_landmarker: str | Path | None = None,
) -> Reference:
    """The reference of ``predictor`` on the validation split ``split_csv`` (archive layout)."""
    batch = open_batch(split_csv, img_dir=img_dir, needs_context=predictor.needs_context)
    rows = np.arange(len(batch))
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    scored = score_batch(predictor, batch, rows=rows, face_landmarker=face_landmarker)
    meta = {
        "split_csv": str(split_csv),
        "rows": len(scored),
        "skipped": scored.skipped,
        "split_fingerprint": batch.fingerprint,
        "runtime": predictor.runtime,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return Reference(scored.table, scored.features, scored.labels, scored.emotion_prob, meta)


def save_reference(reference: Reference, folder: str | Path) -> Path:
    """Write ``reference`` into ``folder`` (created), each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(reference.table, folder / "signals.csv")
    save_npy_atomic(reference.features.astype(np.float32), folder / "features.npy")
    if reference.labels is not None:
        save_npy_atomic(reference.labels.astype(np.uint8), folder / "labels.npy")
    write_json_atomic(reference.meta, folder / "reference.json")
    return folder


def load_reference(folder: str | Path) -> Reference:
    """A reference written by :func:`save_reference`.

    Raises
    ------
    ValueError
        A file is missing or does not hold what a reference holds.
    """
    folder = Path(folder)
    try:
        table = pd.read_csv(folder / "signals.csv")
        features = np.load(folder / "features.npy")
        meta = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder} is not a monitoring reference: {error}") from None
    missing = [signal.name for signal in SIGNALS if signal.name not in table.columns]
    if missing or len(features) != len(table):
        raise ValueError(f"{folder} is not a monitoring reference: columns {missing} missing or features misaligned")
    labels_path = folder / "labels.npy"
    labels = np.load(labels_path).astype(np.float32) if labels_path.is_file() else None
    probs = table[[f"prob_{emotion}" for emotion in EMOTIONS]].to_numpy(dtype=np.float32)
    return Reference(table, features, labels, probs, meta)


def _stored(client: MlflowClient, version: ModelVersion) -> Reference | None:
    if REFERENCE_TAG not in (version.tags or {}):
        return None
    with tempfile.TemporaryDirectory(prefix="emonet-reference-") as tmp:
        local = client.download_artifacts(version.run_id, REFERENCE_ARTIFACT, tmp)
        return load_reference(local)


def reference_split(client: MlflowClient, version: ModelVersion) -> tuple[Path, Path]:
    """The validation split (CSV, ``img_arrs`` folder) of the archive ``version``'s run trained on.

    Raises
    ------
    ValueError
        The run has no ``data_root`` parameter, or that archive's validation split is not
        there any more: the message says to pass the split.
    """
    params = client.get_run(version.run_id).data.params
    root = params.get("data_root")
    remedy = "pass reference_csv (its validation split in the archive layout) and reference_img_dir"
    if root is None:
        raise ValueError(
            f"{version.name} version {version.version} has no monitoring reference and its run records no "
            f"data_root: {remedy}"
        )
    split_csv, img_dir = annotations_path(root, "val"), arrays_dir(root)
    if not split_csv.is_file() or not img_dir.is_dir():
        raise ValueError(
            f"{version.name} version {version.version} has no monitoring reference, and its validation split "
            f"{split_csv} is not there any more: {remedy}"
        )
    return split_csv, img_dir


def ensure_reference(
    client: MlflowClient,
    version: ModelVersion,
    predictor: Predictor,
    *,
    split_csv: str | Path | None = None,
    img_dir: str | Path | None = None,
    face_landmarker: str | Path | None = None,
) -> Reference:
    """The stored reference of ``version``, computed and stored first when it has none.

    ``split_csv``/``img_dir`` name the validation split to compute it on; without them
    the split is found from the version's run (:func:`reference_split`).
    """
    stored = _stored(client, version)
    if stored is not None:
        return stored
    if split_csv is None or img_dir is None:
        split_csv, img_dir = reference_split(client, version)
    logger.info("computing the monitoring reference of %s version %s on %s", version.name, version.version, split_csv)
    reference = build_reference(predictor, split_csv, img_dir, face_landmarker=face_landmarker)
    reference.meta.update({"model_name": version.name, "model_version": str(version.version)})
    with tempfile.TemporaryDirectory(prefix="emonet-reference-") as tmp:
        client.log_artifacts(version.run_id, str(save_reference(reference, tmp)), REFERENCE_ARTIFACT)
    described = f"{len(reference)} validation crops of {Path(split_csv).name} ({reference.meta['created']})"
    client.set_model_version_tag(version.name, version.version, REFERENCE_TAG, described)
    return reference
