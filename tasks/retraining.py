"""Prefect task for the decision whether a flow run trains: it fingerprints what the run
would train from and tags the run with it and with the decision, which the library takes
(:func:`emonet.tracking.recipe.decide_retraining`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from emonet.config import EmoNetConfig, config_to_dict
from emonet.reports.evaluation import split_fingerprint
from emonet.tracking.recipe import SKIP_REASON_TAG, TRAINING_SKIPPED_TAG, code_version, decide_retraining, recipe_tags
from tasks.tracking import NOT_CACHED, TRACKING_RETRIES

__all__ = ["SKIP_REASON_TAG", "TRAINING_SKIPPED_TAG", "check_retraining"]


@task(name="check-retraining", **TRACKING_RETRIES, **NOT_CACHED)
def check_retraining(
    *,
    run_id: str,
    registered_model_name: str,
    frames: dict[str, pd.DataFrame],
    normalization_json: Path,
    config: EmoNetConfig,
    force_retrain: bool = False,
) -> str | None:
    """Tag the run with what it trains from (the split fingerprints with the affect
    normalization, the resolved config, the code's git commit), and say why training can
    be skipped: the champion's run recorded the same (:func:`emonet.tracking.recipe.retraining_unneeded`).

    Returns the reason to skip, already logged and tagged on the run
    (``emonet.training_skipped``, ``emonet.skip_reason``), or None to train.
    """
    logger = get_run_logger()
    client = MlflowClient()
    recipe = recipe_tags(
        {split: split_fingerprint(frame) for split, frame in sorted(frames.items())},
        json.loads(Path(normalization_json).read_text()),
        config_to_dict(config),
        code_version(),
    )
    decision = decide_retraining(client, registered_model_name, recipe, force=force_retrain)
    if decision.forced and decision.unneeded is not None:
        logger.info("force_retrain: training although %s", decision.unneeded)
    if decision.skip_reason is not None:
        logger.info("skipping training: %s (force_retrain=True trains anyway)", decision.skip_reason)
    # One request, so a run never holds the recipe without the decision taken on it.
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in decision.run_tags().items()])
    return decision.skip_reason
