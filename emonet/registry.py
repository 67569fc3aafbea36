"""The EmoNet model registry: a new version takes the ``champion`` alias only when it beats
the champion on the same test split (the champion is re-scored on a split it was never
scored on), under a lock so that concurrent registrations leave the better one champion."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from emonet.annotations import load_annotations
from emonet.batch import load_predictor
from emonet.data import EmoticDataset
from emonet.metrics import mean_average_precision_score
from emonet.tracking import sqlite_lock, sqlite_path

logger = logging.getLogger(__name__)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEMO_MODEL_NAME",
    "MODEL_NAME",
    "PromotionDecision",
    "find_run_version",
    "promote_model",
    "score_model_on_split",
    "split_score_tag",
]

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

Decision = Literal["first_version", "promoted", "not_better", "champion_unavailable", "already_champion"]


@dataclass(frozen=True)
class PromotionDecision:
    """Where :func:`promote_model` placed a registered version, and why."""

    version: str  # the registered version placed
    alias: str  # CHAMPION or CHALLENGER
    decision: Decision
    reason: str  # one sentence, also the run's ``promotion_reason`` tag
    new_map: float  # the version's test mAP
    previous_map: float | None  # the champion's test mAP on the same split; None without one
    previous_version: str | None  # the champion before; None when there was none


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
    db_path = sqlite_path(client._registry_uri)  # MlflowClient keeps the URI it resolved
    if db_path is None:
        return _registry_lock(client, name)
    return sqlite_lock(db_path.resolve(), timeout=PROMOTION_LOCK_TIMEOUT_S)


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
) -> PromotionDecision:
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
    PromotionDecision
        The ``version``, its ``alias`` (``"champion"`` or ``"challenger"``), the
        ``decision`` (``first_version``, ``promoted``, ``not_better``,
        ``champion_unavailable`` or ``already_champion``), the ``reason`` (a sentence),
        ``new_map``, ``previous_map`` (the champion's score on this split) and
        ``previous_version`` (None when there was no champion).

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
    return PromotionDecision(
        version=version,
        alias=alias,
        decision=decision,
        reason=reason,
        new_map=test_map,
        previous_map=previous_map,
        previous_version=previous_version,
    )


def _decide(
    version: str,
    test_map: float,
    champion: str | None,
    champion_map: float | None,
    unavailable: str | None,
    min_improvement: float,
) -> tuple[str, Decision, str]:
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
