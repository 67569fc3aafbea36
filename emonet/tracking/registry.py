"""The EmoNet model registry: a new version takes the ``champion`` alias only when the
evidence says it beats the champion on the same validation split (a paired bootstrap of
the mAP difference over the same rows; the champion is re-scored on a split it was never
scored on), under a lock so that concurrent registrations leave the better one champion."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from emonet.data.annotations import load_annotations
from emonet.data.dataset import EmoticDataset
from emonet.inference.loading import load_predictor
from emonet.inference.loop import Predictions
from emonet.metrics import finite_or_none, mean_average_precision_score
from emonet.metrics.bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    BootstrapInterval,
    check_bootstrap_settings,
    paired_bootstrap_map_difference,
)
from emonet.utils.store import sqlite_lock, sqlite_path

logger = logging.getLogger(__name__)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEMO_MODEL_NAME",
    "MODEL_NAME",
    "PROMOTION_SPLITS",
    "PromotionDecision",
    "champion_version",
    "describe_difference",
    "find_run_version",
    "predict_model_on_split",
    "promote_model",
    "recorded_maps",
    "split_score_tag",
]

MODEL_NAME = "emonet"  # models trained on a real archive
DEMO_MODEL_NAME = "emonet-demo"  # models trained on the generated demo data, kept apart
CHAMPION = "champion"
CHALLENGER = "challenger"
# The splits a promotion may be decided on: validation (the default; the test split then
# never chooses) or test (the rule before validation decided).
PROMOTION_SPLITS: tuple[str, ...] = ("val", "test")
# Version tags "<split>_mAP" and "<split>_split": the version's own mAP on that split and
# the split's fingerprint. A champion registered by hand may carry only its run's metric
# "test_mAP", which is read in place of the tag for the test split.
TEST_MAP_METRIC = "test_mAP"
# Version tag prefix: "mAP.<first 16 hex digits of a split fingerprint>" holds the
# version's mAP on that split (its own, or one it was re-scored on as champion).
SPLIT_SCORE_TAG_PREFIX = "mAP."
SPLIT_SCORE_TAG_DIGITS = 16
# The predictions behind that score, kept in the version's run (artifact folder), so a
# champion is re-scored on a split once, and a paired bootstrap can resample them.
PREDICTIONS_ARTIFACT_DIR = "promotion"

# How long a registration waits for another one's decide-and-alias step; the step
# itself takes well under a second (re-scoring a champion happens outside the lock).
PROMOTION_LOCK_TIMEOUT_S = 600.0
# A registry lock (stores other than SQLite) older than this was left by a killed process.
STALE_REGISTRY_LOCK_S = 3600.0
# Attempts at the decision when other registrations keep moving the champion meanwhile.
PROMOTION_ATTEMPTS = 5

Decision = Literal[
    "first_version",
    "promoted",
    "clearly_worse",
    "not_significantly_better",
    "champion_unloadable",
    "already_champion",
]
# The error of a champion that cannot be loaded or scored, as the run and version tag
# ``promotion_error`` keep it: one line, at most this many characters.
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class PromotionDecision:
    """Where :func:`promote_model` placed a registered version, and why."""

    version: str  # the registered version placed
    alias: str  # CHAMPION or CHALLENGER
    decision: Decision
    reason: str  # one sentence, also the run's ``promotion_reason`` tag
    new_map: float  # the version's mAP on the split that decided
    previous_map: float | None  # the champion's mAP on the same split; None without one
    previous_version: str | None  # the champion before; None when there was none
    split: str  # the split that decided: "val" or "test"
    split_id: str  # its fingerprint
    # mAP(candidate) - mAP(champion) on the split with its paired-bootstrap interval
    # (low == high == estimate at confidence 0); None when nothing was compared
    difference: BootstrapInterval | None = None
    # The champion's recorded mAP on each of the run's splits by name ("val", "test"),
    # None where it was never scored (see recorded_maps); filled by the caller that knows them
    previous_maps: dict[str, float | None] = field(default_factory=dict)
    # The registered model's name, for the commands explain() gives; None when unknown
    name: str | None = None
    # Why the champion could not be loaded or scored (``champion_unloadable``), one line
    error: str | None = None

    def explain(self) -> str:
        """A short plain-text explanation of the decision, a sentence or a command per line.

        For ``champion_unloadable`` it names the error and how to promote the version by
        hand, should a person decide it replaces the champion that cannot be scored.
        """
        name = self.name or "<registered model>"
        champion = f"champion version {self.previous_version}"
        if self.decision == "first_version":
            return f"Version {self.version} is the first version of {name}: it becomes champion."
        if self.decision == "already_champion":
            return f"Version {self.version} already is the champion of {name}: nothing changed."
        if self.decision != "champion_unloadable":
            verdict = (
                f"Version {self.version} replaces {champion} as champion"
                if self.alias == CHAMPION
                else f"Version {self.version} stays challenger; {champion} stays champion"
            )
            return f"{verdict} ({self.decision}), on the {self.split} split: {self.reason}."
        command = (
            f"from mlflow import MlflowClient; "
            f"MlflowClient().set_registered_model_alias({name!r}, {CHAMPION!r}, {self.version!r})"
        )
        return "\n".join(
            [
                f"The {champion} of {name} could not be loaded or scored on the {self.split} split, "
                f"so version {self.version} was not compared with it: the champion keeps its alias and "
                f"version {self.version} stays {self.alias}.",
                f"Error: {self.error or 'unknown'}",
                "Fix what breaks the champion and register again, or, if version "
                f"{self.version} should be champion, promote it by hand (with MLFLOW_TRACKING_URI set to the store):",
                f'    python -c "{command}"',
            ]
        )


class _Rows(NamedTuple):
    """A model's scored rows of one split: positions in the split's CSV, labels, probabilities."""

    indices: np.ndarray  # (N,) int64
    y_true: np.ndarray  # (N, 26)
    y_prob: np.ndarray  # (N, 26)


def find_run_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version of ``name`` registered from ``run_id``, if any (the oldest if several).

    A retried registration looks here first, so one run never gets two versions.
    """
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def split_score_tag(split_id: str) -> str:
    """The version tag holding an mAP on the split ``split_id`` (a fingerprint)."""
    return f"{SPLIT_SCORE_TAG_PREFIX}{_short(split_id)}"


def _short(split_id: str) -> str:
    return split_id.removeprefix("sha256:")[:SPLIT_SCORE_TAG_DIGITS]


def predict_model_on_split(model_uri: str, split_csv: str | Path, img_dir: str | Path) -> Predictions:
    """A model's predictions on a labelled split: how a champion is re-scored on a new split.

    Parameters
    ----------
    model_uri : an MLflow model URI (``models:/emonet/3``) or a checkpoint path,
        loaded with :func:`emonet.inference.loading.load_predictor`.
    split_csv : the split in the archive's layout: ``Crop_name`` (and ``Arr_name`` for
        ``body_context`` models) and the 26 emotion columns.
    img_dir : the archive's ``img_arrs`` folder.

    Returns
    -------
    Predictions
        With ``emotions_true``; ``indices`` are row positions in ``split_csv``.
    """
    predictor = load_predictor(model_uri)
    annotations = load_annotations(split_csv)
    dataset = EmoticDataset(annotations, img_dir, predictor.transform, with_context=predictor.needs_context)
    predictions = predictor.predict(dataset, desc="re-score")
    logger.info(
        "%s scores mAP %.4f on %s (%d rows)",
        model_uri,
        mean_average_precision_score(predictions.emotions_true, predictions.emotion_prob),
        split_csv,
        len(annotations),
    )
    return predictions


def champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version of ``name`` that holds the ``champion`` alias, if any."""
    # The registered model's alias map, rather than get_model_version_by_alias: stores
    # disagree on the error code for a missing alias.
    aliases = client.get_registered_model(name).aliases or {}
    version = aliases.get(CHAMPION)
    return client.get_model_version(name, str(version)) if version is not None else None


def _recorded_map(client: MlflowClient, version: ModelVersion, split: str, split_id: str) -> float | None:
    """A version's recorded mAP on ``split_id``, or None if it was never scored there.

    Its own split: the ``<split>_mAP`` tag, else (test split) its run's ``test_mAP``
    metric (a version registered by hand); another split: the ``mAP.<split>`` tag of a
    re-scoring.
    """
    tags = version.tags
    if tags.get(f"{split}_split") == split_id:
        value: Any = tags.get(f"{split}_mAP")
        if value is None and split == "test" and version.run_id:
            try:
                value = client.get_run(version.run_id).data.metrics.get(TEST_MAP_METRIC)
            except MlflowException:
                value = None
        if finite_or_none(value) is not None:
            return finite_or_none(value)
    return finite_or_none(tags.get(split_score_tag(split_id)))


def recorded_maps(
    client: MlflowClient, name: str, version: str | None, split_ids: dict[str, str]
) -> dict[str, float | None]:
    """A version's recorded mAP on each split of ``split_ids`` (name -> fingerprint), None where never scored.

    Its own score on its own split, or the one kept when it was re-scored there as
    champion; nothing is re-scored here. An empty dict when ``version`` is None.
    """
    if version is None:
        return {}
    model_version = client.get_model_version(name, str(version))
    return {split: _recorded_map(client, model_version, split, split_id) for split, split_id in split_ids.items()}


def _predictions_artifact(split_id: str) -> str:
    return f"{PREDICTIONS_ARTIFACT_DIR}/predictions-{_short(split_id)}.npz"


def _save_rows(client: MlflowClient, run_id: str, split_id: str, rows: _Rows) -> None:
    """Keep a version's scored rows of a split in its run, for later comparisons."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(_predictions_artifact(split_id)).name
        np.savez_compressed(path, indices=rows.indices, y_true=rows.y_true, y_prob=rows.y_prob)
        client.log_artifact(run_id, str(path), PREDICTIONS_ARTIFACT_DIR)


def _load_rows(client: MlflowClient, version: ModelVersion, split_id: str) -> _Rows | None:
    """A version's kept rows of a split (see :func:`_save_rows`), or None if it has none."""
    artifact = _predictions_artifact(split_id)
    if not version.run_id:
        return None
    try:
        kept = {info.path for info in client.list_artifacts(version.run_id, PREDICTIONS_ARTIFACT_DIR)}
        if artifact not in kept:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            with np.load(client.download_artifacts(version.run_id, artifact, tmp)) as data:
                return _Rows(data["indices"], data["y_true"], data["y_prob"])
    except (MlflowException, OSError, KeyError, ValueError):
        logger.warning(
            "the kept predictions of version %s on %s cannot be read; re-scoring it",
            version.version,
            split_id,
            exc_info=True,
        )
        return None


def _rows_of(predictions: Predictions) -> _Rows:
    if predictions.emotions_true is None:
        raise ValueError("the candidate's predictions carry no emotions_true: predict a labelled split")
    return _Rows(
        np.asarray(predictions.indices), np.asarray(predictions.emotions_true), np.asarray(predictions.emotion_prob)
    )


def _champion_on_split(
    client: MlflowClient,
    name: str,
    champion: ModelVersion,
    split: str,
    split_id: str,
    split_csv: str | Path | None,
    img_dir: str | Path | None,
    need_rows: bool,
) -> tuple[float | None, _Rows | None, str | None]:
    """The champion's mAP on the candidate's split and, when ``need_rows``, its scored rows.

    Recorded (a score tag; rows kept in its run) or re-scored now and then recorded.
    Returns ``(score, rows, None)``, or ``(None, None, why)`` when the champion cannot
    be scored (it does not load or predict: deleted artifacts, incompatible code, a
    model file that raises), ``why`` being the error on one line (:func:`_one_line`).
    """
    if need_rows:
        rows = _load_rows(client, champion, split_id)
        if rows is not None:  # its score from the same rows the bootstrap resamples
            return mean_average_precision_score(rows.y_true, rows.y_prob), rows, None
    recorded = _recorded_map(client, champion, split, split_id)
    if recorded is not None and not need_rows:
        return recorded, None, None
    if split_csv is None or img_dir is None:
        raise ValueError(
            f"champion version {champion.version} of {name!r} was never scored on {split} split {split_id}"
            + (" (its predictions there are not kept)" if recorded is not None else "")
            + ": pass split_csv and img_dir so that it can be re-scored"
        )
    uri = f"models:/{name}/{champion.version}"
    logger.info("re-scoring champion %s on the candidate's %s split %s", uri, split, split_id)
    try:
        rows = _rows_of(predict_model_on_split(uri, split_csv, img_dir))
        score = mean_average_precision_score(rows.y_true, rows.y_prob)
    except Exception as error:  # any failure to load or run the old model: a person decides, not this rule
        logger.warning("champion %s cannot be scored on %s", uri, split_csv, exc_info=True)
        return None, None, _one_line(error)
    client.set_model_version_tag(name, champion.version, split_score_tag(split_id), repr(score))
    if champion.run_id:
        try:
            _save_rows(client, champion.run_id, split_id, rows)
        except (MlflowException, OSError):  # the comparison goes on; the next one re-scores again
            logger.warning("could not keep champion %s's predictions on %s", uri, split_id, exc_info=True)
    return score, rows, None


def _one_line(error: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """``Type: message`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _paired_rows(candidate: _Rows, champion: _Rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and both models' probabilities on the rows both scored, in one order."""
    common, in_candidate, in_champion = np.intersect1d(candidate.indices, champion.indices, return_indices=True)
    if len(common) < max(len(candidate.indices), len(champion.indices)):
        logger.warning(
            "the candidate scored %d rows and the champion %d; comparing on the %d both scored",
            len(candidate.indices),
            len(champion.indices),
            len(common),
        )
    y_true = candidate.y_true[in_candidate]
    if not np.array_equal(y_true, champion.y_true[in_champion]):
        raise ValueError("the candidate's and the champion's rows carry different labels: not the same split")
    return y_true, candidate.y_prob[in_candidate], champion.y_prob[in_champion]


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
        acquired = finite_or_none(held.tags.get("acquired"))
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
    db_path = sqlite_path(client._registry_uri)  # MlflowClient keeps the URI it resolved
    if db_path is None:
        return _registry_lock(client, name)
    return sqlite_lock(db_path.resolve(), timeout=PROMOTION_LOCK_TIMEOUT_S)


def promote_model(
    client: MlflowClient,
    name: str,
    version: str | int,
    candidate: Predictions | float,
    split_id: str,
    run_id: str,
    *,
    split: str = "val",
    split_csv: str | Path | None = None,
    img_dir: str | Path | None = None,
    min_improvement: float = 0.0,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PromotionDecision:
    """Give a new version the ``champion`` alias if the evidence says it beats the champion, else ``challenger``.

    Like is compared with like, on one split (``split``: validation by default, so the
    test split never chooses and each version's test mAP stays an honest estimate): the
    champion's predictions on the candidate's split are the ones kept in its run when it
    was scored on that split, else the champion is loaded from the registry and
    re-scored on ``split_csv`` now (:func:`predict_model_on_split`), and its score (tag
    ``mAP.<split>``) and predictions (artifact ``promotion/predictions-<split>.npz`` of its
    run) are kept. The rows are then resampled together
    (:func:`~emonet.metrics.bootstrap.paired_bootstrap_map_difference`): the candidate becomes
    champion when the lower end of the ``confidence`` interval of mAP(candidate) -
    mAP(champion) exceeds ``min_improvement``. Otherwise it becomes challenger,
    ``clearly_worse`` when the upper end is below 0, else ``not_significantly_better``.
    ``confidence=0`` compares the point mAPs (any higher mAP by more than
    ``min_improvement`` wins), for which a recorded score is enough. A champion that
    cannot be loaded or scored (whatever the error) keeps its alias: the new version
    becomes challenger, ``champion_unloadable``, the error is kept (tag
    ``promotion_error``) and a person decides (:meth:`PromotionDecision.explain` says how).

    Concurrent registrations are safe: the decision and the alias move happen under a
    lock (a file beside a SQLite store, a lock entry in the registry otherwise), and a
    decision is remade if another registration moved the champion while this one was
    scoring it. So the better version ends as champion, whichever finishes first.

    The version gets the tags ``<split>_mAP``, ``<split>_split``, ``mAP.<split>`` and
    ``promotion_decision`` (and its predictions are kept in its run); the run the tags
    ``promotion_decision``, ``promotion_reason``, ``promotion_alias``,
    ``promotion_split``, ``promotion_split_id``, ``promotion_confidence``,
    ``champion_previous_version`` and the metrics ``candidate_<split>_mAP`` and, when
    known, ``champion_previous_<split>_mAP`` and ``promotion_difference_mAP`` with
    ``promotion_difference_low`` and ``promotion_difference_high``. When the champion
    cannot be scored, both also get ``promotion_error``: the error on one line.

    Parameters
    ----------
    client : an ``MlflowClient`` on the registry.
    name, version : the registered model version to place.
    candidate : the version's :class:`~emonet.inference.loop.Predictions` on the split
        (with ``emotions_true``; ``indices`` are row positions in ``split_csv``), or only
        its mAP there, which can be compared at ``confidence=0`` only.
    split_id : fingerprint of the split, :func:`emonet.reports.evaluation.split_fingerprint`.
    run_id : the run that produced the version; the decision is logged there.
    split : ``"val"`` or ``"test"``, the split's name (tags and metrics carry it).
    split_csv, img_dir : the split (archive layout) and its ``img_arrs`` folder, to
        re-score a champion that was not scored on it (required then).
    min_improvement : the margin (mAP, 0-1 scale) the interval's lower end must exceed.
    confidence : of the paired-bootstrap interval, in [0, 1); 0 compares point mAPs.
    n_resamples, seed : of the bootstrap.

    Returns
    -------
    PromotionDecision
        The ``version``, its ``alias`` (``"champion"`` or ``"challenger"``), the
        ``decision`` (``first_version``, ``promoted``, ``clearly_worse``,
        ``not_significantly_better``, ``champion_unloadable`` or ``already_champion``),
        the ``reason`` (a sentence), ``new_map``, ``previous_map`` (the champion's mAP on
        this split), ``previous_version`` (None when there was no champion), ``split``,
        ``split_id``, ``difference`` (the interval; None when nothing was compared),
        ``name`` and ``error`` (why the champion could not be scored; None otherwise).
        :meth:`PromotionDecision.explain` puts it in words.

    Raises
    ------
    ValueError
        A bad ``split``, ``min_improvement``, ``confidence`` or ``n_resamples``; an
        empty ``split_id``; a candidate score that is not finite, or one without
        predictions when a champion must be compared at ``confidence > 0``; a champion
        that needs re-scoring without ``split_csv``.
    """
    min_improvement, confidence = _checked_rule(split, split_id, min_improvement, confidence, n_resamples)
    rows = None if isinstance(candidate, (int, float)) else _rows_of(candidate)
    new_map = float(candidate) if rows is None else mean_average_precision_score(rows.y_true, rows.y_prob)
    if not math.isfinite(new_map):
        raise ValueError(f"the candidate's mAP must be a finite number, got {new_map}")
    version = str(version)
    client.get_model_version(name, version)  # fails clearly on an unknown version
    for key, value in (
        (f"{split}_mAP", repr(new_map)),
        (f"{split}_split", split_id),
        (split_score_tag(split_id), repr(new_map)),
    ):
        client.set_model_version_tag(name, version, key, value)
    if rows is not None:
        _save_rows(client, run_id, split_id, rows)

    for _ in range(PROMOTION_ATTEMPTS):
        # Scoring the champion can take minutes (a re-scoring predicts the whole split),
        # so it happens outside the lock; under the lock, the champion must be unchanged.
        champion = champion_version(client, name)
        previous_version = str(champion.version) if champion is not None else None
        previous_map, difference, error = _compare_with_champion(
            client,
            name,
            version,
            champion,
            new_map,
            rows,
            split,
            split_id,
            split_csv,
            img_dir,
            confidence=confidence,
            n_resamples=n_resamples,
            seed=seed,
        )
        with _promotion_lock(client, name):
            current = champion_version(client, name)
            if (str(current.version) if current is not None else None) != previous_version:
                logger.info("another registration moved the champion of %r meanwhile: deciding again", name)
                continue
            alias, decision, reason = _decide(
                version, new_map, previous_version, previous_map, difference, error, min_improvement, split
            )
            client.set_registered_model_alias(name, alias, version)
        break
    else:
        raise RuntimeError(f"the champion of {name!r} kept moving during {PROMOTION_ATTEMPTS} attempts; retry later")

    result = PromotionDecision(
        version=version,
        alias=alias,
        decision=decision,
        reason=reason,
        new_map=new_map,
        previous_map=previous_map,
        previous_version=previous_version,
        split=split,
        split_id=split_id,
        difference=difference,
        name=name,
        error=error,
    )
    _log_decision(client, run_id, result, confidence)
    return result


def _checked_rule(
    split: str, split_id: str, min_improvement: float, confidence: float, n_resamples: int
) -> tuple[float, float]:
    """``(min_improvement, confidence)`` as floats, once :func:`promote_model`'s settings are checked."""
    if split not in PROMOTION_SPLITS:
        raise ValueError(f"split must be one of {list(PROMOTION_SPLITS)}, got {split!r}")
    min_improvement = float(min_improvement)
    if not (math.isfinite(min_improvement) and min_improvement >= 0):
        raise ValueError(f"min_improvement must be a finite number >= 0, got {min_improvement}")
    confidence = float(confidence)
    if confidence != 0.0:
        check_bootstrap_settings(n_resamples, confidence)
    if not isinstance(split_id, str) or not split_id.strip():
        raise ValueError(f"split_id must be a non-empty string, got {split_id!r}")
    return min_improvement, confidence


def _compare_with_champion(
    client: MlflowClient,
    name: str,
    version: str,
    champion: ModelVersion | None,
    new_map: float,
    rows: _Rows | None,
    split: str,
    split_id: str,
    split_csv: str | Path | None,
    img_dir: str | Path | None,
    *,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> tuple[float | None, BootstrapInterval | None, str | None]:
    """``(champion's mAP, difference, error)`` on the split: ``(None, None, None)`` without a
    champion, ``(None, None, why)`` when it cannot be loaded or scored (:func:`_champion_on_split`)."""
    if champion is None:
        return None, None, None
    if str(champion.version) == version:
        return new_map, None, None
    if confidence > 0 and rows is None:
        raise ValueError(
            f"comparing with champion version {champion.version} at confidence {confidence:g} needs the "
            "candidate's predictions, not only its mAP (or pass confidence=0)"
        )
    previous_map, champion_rows, error = _champion_on_split(
        client, name, champion, split, split_id, split_csv, img_dir, need_rows=confidence > 0
    )
    if previous_map is None:
        return None, None, error
    return previous_map, _difference(new_map, previous_map, rows, champion_rows, confidence, n_resamples, seed), None


def _log_decision(client: MlflowClient, run_id: str, result: PromotionDecision, confidence: float) -> None:
    """The decision on the run (tags and metrics, one ``log_batch``) and on the version (tags)."""
    split = result.split
    tags = {
        "promotion_decision": result.decision,
        "promotion_reason": result.reason,
        "promotion_alias": result.alias,
        "promotion_split": split,
        "promotion_split_id": result.split_id,
        "promotion_confidence": repr(confidence),
        "champion_previous_version": result.previous_version or "none",
    }
    if result.error is not None:
        tags["promotion_error"] = result.error
    metrics = {f"candidate_{split}_mAP": result.new_map}
    if result.previous_map is not None:
        metrics[f"champion_previous_{split}_mAP"] = result.previous_map
    if result.difference is not None:
        metrics.update(
            promotion_difference_mAP=result.difference.estimate,
            promotion_difference_low=result.difference.low,
            promotion_difference_high=result.difference.high,
        )
    now = int(time.time() * 1000)
    # One request: the run never holds half a decision.
    client.log_batch(
        run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
        tags=[RunTag(key, str(value)) for key, value in tags.items()],
    )
    for key in ("promotion_decision", "promotion_error"):
        if key in tags:
            client.set_model_version_tag(result.name, result.version, key, tags[key])
    log = logger.warning if result.decision == "champion_unloadable" else logger.info
    log("%s version %s -> %s (%s): %s", result.name, result.version, result.alias, result.decision, result.reason)


def _difference(
    new_map: float,
    champion_map: float,
    rows: _Rows | None,
    champion_rows: _Rows | None,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> BootstrapInterval:
    """mAP(candidate) - mAP(champion): paired-bootstrap interval, or the point difference at confidence 0."""
    if confidence == 0.0 or rows is None or champion_rows is None:
        estimate = new_map - champion_map
        return BootstrapInterval(
            estimate=estimate, low=estimate, high=estimate, confidence=0.0, n_resamples=0, seed=seed
        )
    y_true, candidate_prob, champion_prob = _paired_rows(rows, champion_rows)
    return paired_bootstrap_map_difference(
        y_true, candidate_prob, champion_prob, n_resamples=n_resamples, confidence=confidence, seed=seed
    )


def describe_difference(difference: BootstrapInterval) -> str:
    """A mAP difference as text: ``+0.0312 [+0.0104, +0.0527] (95% paired bootstrap, 1000 resamples)``,
    or the point difference at confidence 0."""
    if difference.confidence == 0.0:
        return f"{difference.estimate:+.4f} (point estimates, confidence 0)"
    return (
        f"{difference.describe('+.4f')} "
        f"({100 * difference.confidence:g}% paired bootstrap, {difference.n_resamples} resamples)"
    )


def _decide(
    version: str,
    new_map: float,
    champion: str | None,
    champion_map: float | None,
    difference: BootstrapInterval | None,
    error: str | None,
    min_improvement: float,
    split: str,
) -> tuple[str, Decision, str]:
    """``(alias, decision, reason)`` of the rule in :func:`promote_model`."""
    if champion is None:
        return CHAMPION, "first_version", "no champion yet: the first version becomes champion"
    if champion == version:
        return CHAMPION, "already_champion", f"version {version} already is the champion"
    if error is not None:
        return (
            CHALLENGER,
            "champion_unloadable",
            (
                f"champion version {champion} cannot be loaded or scored on this {split} split ({error}); "
                f"it keeps the champion alias and version {version} stays challenger until a person decides"
            ),
        )
    compared = (
        f"{split} mAP {new_map:.4f} vs champion version {champion}'s {champion_map:.4f} on the same {split} split, "
        f"difference {describe_difference(difference)}"
    )
    if difference.low > min_improvement:
        return CHAMPION, "promoted", f"{compared}: its lower end exceeds min_improvement {min_improvement:g}"
    if difference.high < 0:
        return CHALLENGER, "clearly_worse", f"{compared}: its upper end is below 0; the champion stays"
    return (
        CHALLENGER,
        "not_significantly_better",
        (f"{compared}: its lower end does not exceed min_improvement {min_improvement:g}; the champion stays"),
    )
