"""What a training run is made from, and whether it was already trained.

A run is tagged with its recipe: fingerprints of its data (the splits and the affect
normalization) and of its resolved config, and the git commit of its code. When the
champion's run recorded the same recipe from a clean commit, training again would
reproduce the champion, and the flow skips it (``force_retrain`` trains anyway)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from emonet.tracking.registry import champion_version

__all__ = [
    "CODE_VERSION_TAG",
    "CONFIG_FINGERPRINT_TAG",
    "DATA_FINGERPRINT_TAG",
    "RECIPE_TAGS",
    "SKIP_REASON_TAG",
    "TRAINING_SKIPPED_TAG",
    "RetrainingDecision",
    "code_version",
    "decide_retraining",
    "recipe_tags",
    "retraining_unneeded",
]

# Run tags that say what a run trained from: the splits (their fingerprints and the affect
# normalization), the resolved config, and the code (the checkout's git commit).
DATA_FINGERPRINT_TAG = "emonet.data_fingerprint"
CONFIG_FINGERPRINT_TAG = "emonet.config_fingerprint"
CODE_VERSION_TAG = "emonet.code_version"
RECIPE_TAGS: tuple[str, ...] = (DATA_FINGERPRINT_TAG, CONFIG_FINGERPRINT_TAG, CODE_VERSION_TAG)
# Run tags of the decision taken on that recipe: whether the run skipped training, and why.
TRAINING_SKIPPED_TAG = "emonet.training_skipped"
SKIP_REASON_TAG = "emonet.skip_reason"
UNKNOWN_CODE_VERSION = "unknown"
DIRTY_SUFFIX = "+dirty"  # the commit, with uncommitted changes to tracked files on top


def code_version(checkout: str | Path | None = None) -> str:
    """The git commit of the checkout the code runs from (``git rev-parse HEAD``).

    ``<commit>+dirty`` when tracked files differ from it (the commit does not say what
    ran), ``unknown`` outside a git checkout or without git.
    """
    checkout = Path(checkout) if checkout is not None else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "-C", str(checkout), "diff", "--quiet", "HEAD", "--"], capture_output=True, timeout=30
            ).returncode
            != 0
        )
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN_CODE_VERSION
    return f"{commit}{DIRTY_SUFFIX}" if dirty else commit or UNKNOWN_CODE_VERSION


def recipe_tags(
    split_ids: dict[str, str], normalization: dict[str, Any], config: dict[str, Any], code: str
) -> dict[str, str]:
    """The run tags :func:`retraining_unneeded` compares: SHA-256 digests of the data and the config, and the code.

    Parameters
    ----------
    split_ids : split name -> :func:`emonet.reports.evaluation.split_fingerprint` of its rows.
    normalization : the affect normalizer's parameters (``normalization.json``): the
        training targets depend on them, and the split fingerprints do not.
    config : the resolved config as a dict (``config_to_dict``).
    code : :func:`code_version`.
    """

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    return {
        DATA_FINGERPRINT_TAG: digest({"splits": split_ids, "normalization": normalization}),
        CONFIG_FINGERPRINT_TAG: digest(config),
        CODE_VERSION_TAG: code,
    }


def retraining_unneeded(client: MlflowClient, name: str, tags: dict[str, str]) -> str | None:
    """Why training again would reproduce the champion of ``name``, or None when it would not.

    Training is unneeded when the champion's run recorded the same :func:`recipe_tags`
    (the same data, config and code) and the code version is a clean commit (an
    ``unknown`` or ``+dirty`` version does not say which code ran).
    """
    code = tags.get(CODE_VERSION_TAG, UNKNOWN_CODE_VERSION)
    if code == UNKNOWN_CODE_VERSION or code.endswith(DIRTY_SUFFIX):
        return None  # checked first: it needs no request to the store
    if name not in {model.name for model in client.search_registered_models(f"name = '{name}'")}:
        return None
    champion = champion_version(client, name)
    if champion is None or not champion.run_id:
        return None
    recorded = client.get_run(champion.run_id).data.tags
    if any(recorded.get(key) != tags.get(key) for key in RECIPE_TAGS):
        return None
    return (
        f"the data, the resolved config and the code (commit {code[:12]}) are those of champion version "
        f"{champion.version} of {name!r} (MLflow run {champion.run_id}): training again would reproduce it"
    )


@dataclass(frozen=True)
class RetrainingDecision:
    """Whether a run trains, decided on its recipe (:func:`decide_retraining`)."""

    recipe: dict[str, str]  # the run's :func:`recipe_tags`
    unneeded: str | None  # why training again would reproduce the champion; None when it would not
    forced: bool = False  # ``force_retrain``: train even when ``unneeded``

    @property
    def skip_reason(self) -> str | None:
        """Why the run skips training, or None when it trains."""
        return None if self.forced else self.unneeded

    @property
    def trains(self) -> bool:
        return self.skip_reason is None

    def run_tags(self) -> dict[str, str]:
        """The recipe with the decision taken on it (``emonet.training_skipped``, and
        ``emonet.skip_reason`` when skipped): one batch, so a run never holds the recipe
        without its decision."""
        tags = {**self.recipe, TRAINING_SKIPPED_TAG: str(not self.trains).lower()}
        if not self.trains:
            tags[SKIP_REASON_TAG] = str(self.skip_reason)
        return tags


def decide_retraining(
    client: MlflowClient, name: str, recipe: dict[str, str], *, force: bool = False
) -> RetrainingDecision:
    """Whether a run with ``recipe`` (:func:`recipe_tags`) trains a new version of ``name``.

    It skips training when :func:`retraining_unneeded` says the champion's run had the same
    recipe, unless ``force`` (the flow's ``force_retrain``); the reason is kept either way.
    """
    return RetrainingDecision(recipe=dict(recipe), unneeded=retraining_unneeded(client, name, recipe), forced=force)
