"""Prefect task for the registration step: the pyfunc model logged and registered once
per run, and the promotion, which the library decides
(:func:`emonet.tracking.registry.promote_model`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from emonet.metrics.bootstrap import DEFAULT_CONFIDENCE
from emonet.reports.evaluation import EvaluationReport
from emonet.tracking.registry import PromotionDecision, find_run_version, promote_model, recorded_maps
from emonet.tracking.run_logging import log_emonet_model
from tasks.tracking import NOT_CACHED, TRACKING_RETRIES


@task(name="register-model", **TRACKING_RETRIES, **NOT_CACHED)
def register_model(
    *,
    run_id: str,
    checkpoint: Path,
    normalization_json: Path,
    evaluation: EvaluationReport,
    registered_model_name: str,
    test_csv: Path,
    img_dir: Path,
    val_csv: Path | None = None,
    min_improvement: float = 0.0,
    promotion_split: str = "val",
    promotion_confidence: float = DEFAULT_CONFIDENCE,
    quantize: str | None = None,
) -> PromotionDecision:
    """Log the pyfunc model and register it once per run (a retry reuses the version),
    then move `champion` only when the evidence says it beats the champion on
    ``promotion_split`` (:func:`emonet.tracking.registry.promote_model`): on validation
    (``evaluation.validation``, the rows of ``val_csv``) by default, on the test split
    (``evaluation.predictions``, ``test_csv``) when asked. The checkpoint is logged with
    the evaluation's config, not loaded again, and its ONNX export checked on the first
    validation crops (``quantize="int8"`` adds an INT8 copy, measured on validation). The
    version is tagged with its test and validation mAP; its description summarizes its
    test metrics with their intervals, the validation mAP and the decision with its
    interval and split. The returned
    decision carries the previous champion's recorded mAP on both splits."""
    logger = get_run_logger()
    client = MlflowClient()
    splits = {"test": (evaluation.predictions, evaluation.split_id, test_csv)}
    if evaluation.validation is not None:
        splits["val"] = (evaluation.validation.predictions, evaluation.validation.split_id, val_csv)
    if promotion_split not in splits:
        raise ValueError(
            f"promotion_split {promotion_split!r} needs the evaluation's predictions on that split "
            f"(the evaluation has {sorted(splits)}): evaluate with val_csv"
        )
    version = find_run_version(client, registered_model_name, run_id)
    if version is None:
        version = log_emonet_model(
            run_id,
            checkpoint,
            normalization_json,
            registered_model_name=registered_model_name,
            config=evaluation.config,
            check_csv=val_csv,  # the ONNX export is checked on validation crops
            img_dir=img_dir,
            quantize=quantize,
        )
    else:
        logger.info(
            "run %s already registered %s version %s: reusing it", run_id, registered_model_name, version.version
        )
    own_maps = {"test": evaluation.metrics["mAP"]}
    if evaluation.validation is not None:
        own_maps["val"] = evaluation.validation.metrics["mAP"]
    del own_maps[promotion_split]  # promote_model tags the version with the deciding split's
    for split, value in own_maps.items():
        client.set_model_version_tag(registered_model_name, version.version, f"{split}_mAP", repr(value))
        client.set_model_version_tag(registered_model_name, version.version, f"{split}_split", splits[split][1])
    predictions, split_id, split_csv = splits[promotion_split]
    decision = promote_model(
        client,
        registered_model_name,
        version.version,
        predictions,
        split_id,
        run_id,
        split=promotion_split,
        split_csv=split_csv,
        img_dir=img_dir,
        min_improvement=min_improvement,
        confidence=promotion_confidence,
    )
    decision = dataclasses.replace(
        decision,
        previous_maps=recorded_maps(
            client,
            registered_model_name,
            decision.previous_version,
            {split: split_id for split, (_, split_id, _) in splits.items()},
        ),
    )
    logger.info("%s version %s: %s", registered_model_name, decision.version, decision.decision)
    client.update_model_version(
        registered_model_name, decision.version, description=version_description(evaluation, run_id, decision)
    )
    return decision


def version_description(evaluation: EvaluationReport, run_id: str, decision: PromotionDecision) -> str:
    """The registered version's description: its test metrics with their intervals, its
    validation mAP and the promotion decision with its split and interval."""
    metrics, intervals = evaluation.metrics, evaluation.intervals
    shown = [
        ("test mAP", "mAP", ".4f"),
        ("test mAP_voc11", "mAP_voc11", ".4f"),
        ("macro F1", "f1_macro", ".4f"),
        ("samples F1", "f1_samples", ".4f"),
        ("valence MAE (1-10)", "mae_valence_1_10", ".3f"),
        ("arousal MAE (1-10)", "mae_arousal_1_10", ".3f"),
    ]
    parts = []
    for label, key, spec in shown:
        if key in metrics:
            interval = intervals.get(key)
            ci = f" {interval.bounds(spec)}" if interval is not None else ""
            parts.append(f"{label} {metrics[key]:{spec}}{ci}")
    confidence = next(iter(intervals.values())).confidence
    validation = (
        f" Validation mAP {evaluation.validation.metrics['mAP']:.4f} on split {evaluation.validation.split_id[:12]}."
        if evaluation.validation is not None
        else ""
    )
    # The reason states the mAP difference and its interval when versions were compared.
    return (
        f"{', '.join(parts)} on test split {evaluation.split_id[:12]} ({100 * confidence:g}% bootstrap intervals; "
        f"MLflow run {run_id}).{validation} "
        f"Promotion on the {decision.split} split {decision.split_id[:12]}: {decision.decision}: {decision.reason}"
    )
