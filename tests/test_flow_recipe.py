"""The training flow's pieces that need no flow run: the deprecated ``output_dir`` alias, the
typed run summary and how it shows the promotion decision, and the retraining decision."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from emonet.metrics.bootstrap import BootstrapInterval
from emonet.tracking.recipe import (
    CODE_VERSION_TAG,
    SKIP_REASON_TAG,
    TRAINING_SKIPPED_TAG,
    RetrainingDecision,
    decide_retraining,
)
from emonet.tracking.registry import PromotionDecision
from flows.training_pipeline import emonet_training_pipeline, resolve_out_dir, run_report
from tasks.report import skip_markdown, summary_markdown
from tasks.summary import RunSummary

REPO = Path(__file__).resolve().parents[1]
DECISION = {
    "version": "4",
    "alias": "challenger",
    "decision": "not_significantly_better",
    "reason": "the interval of the mAP difference includes 0",
    "new_map": 0.41,
    "previous_map": 0.42,
    "previous_version": "3",
    "split": "val",
    "split_id": "abc123",
}


@dataclasses.dataclass(frozen=True)
class ExplainedDecision(PromotionDecision):
    """A decision as the registry will give it, with ``explain()``."""

    def explain(self) -> str:
        return "Version 4 stays challenger.\nPromote it by hand: set the champion alias to version 4."


@dataclasses.dataclass(frozen=True)
class UnexplainedDecision(PromotionDecision):
    """A decision as the registry gave it before ``explain()``."""

    explain = None


def _summary(registration: PromotionDecision) -> RunSummary:
    return RunSummary(
        mlflow_run_id="run123",
        registered_model="emonet-demo",
        out_dir=Path("outputs"),
        tracking_uri="sqlite:///m.db",
        test_metrics={
            "mAP": 0.4123,
            "mAP_voc11": 0.44,
            "f1_macro": 0.5,
            "mae_valence_1_10": 1.0,
            "mae_arousal_1_10": 1.5,
        },
        test_mAP_ci=(0.39, 0.43),
        ci_confidence=0.95,
        val_mAP=0.41,
        registration=registration,
        review=Path("outputs/review/index.html"),
    )


def _evaluation() -> SimpleNamespace:
    """What the summary markdown reads of an EvaluationReport."""
    interval = BootstrapInterval(estimate=0.4123, low=0.39, high=0.43, confidence=0.95, n_resamples=100, seed=0)
    benchmark = SimpleNamespace(model="emonet-demo, MLflow run run123")
    per_emotion = SimpleNamespace(iterrows=lambda: iter(()))
    return SimpleNamespace(
        metrics={"mAP": 0.4123, "mAP_voc11": 0.44},
        intervals={"mAP": interval, "mAP_voc11": interval},
        validation=SimpleNamespace(metrics={"mAP": 0.41}),
        benchmark=benchmark,
        per_emotion=per_emotion,
    )


# --------------------------------------------------------------------------- output_dir


def test_out_dir_or_its_deprecated_alias_output_dir():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_out_dir(None, None) == Path("outputs")
        assert resolve_out_dir(Path("mine"), None) == Path("mine")
    with pytest.warns(FutureWarning, match="output_dir is deprecated: pass out_dir"):
        assert resolve_out_dir(None, Path("old")) == Path("old")
    with pytest.raises(TypeError, match="both out_dir='a' and its deprecated alias output_dir='a'"):
        resolve_out_dir(Path("a"), Path("a"))


def test_deployment_parameters_bind_output_dir():
    """A deployment's parameters are validated against the flow's signature before it runs:
    ``output_dir`` binds (the flow then warns), and every prefect.yaml deployment still does."""
    validated = emonet_training_pipeline.validate_parameters({"output_dir": "outputs/old", "demo_dir": "data/demo"})
    assert validated["output_dir"] == Path("outputs/old") and validated["out_dir"] is None
    both = emonet_training_pipeline.validate_parameters({"output_dir": "a", "out_dir": "b"})
    with pytest.raises(TypeError, match="pass out_dir only"):
        resolve_out_dir(both["out_dir"], both["output_dir"])


# --------------------------------------------------------------------------- the run summary


def test_the_summary_shows_the_registrys_explanation_when_it_has_one():
    plain = _summary(UnexplainedDecision(**DECISION))
    markdown = summary_markdown(plain, _evaluation())
    assert "on the **val** split: the interval of the mAP difference includes 0" in markdown
    assert "alias 'challenger' (not_significantly_better)\nPrediction review" in run_report(plain)

    explained = _summary(ExplainedDecision(**DECISION))
    markdown = summary_markdown(explained, _evaluation())
    assert "on the **val** split:\n\n> Version 4 stays challenger.\n>\n> Promote it by hand" in markdown
    report = run_report(explained)
    assert "(not_significantly_better)\n    Version 4 stays challenger.\n    Promote it by hand" in report


def test_the_summary_reads_as_the_flows_old_dict():
    summary = _summary(PromotionDecision(**DECISION))
    assert (summary.version, summary.alias, summary.decision, summary.test_mAP) == (
        "4",
        "challenger",
        "not_significantly_better",
        0.4123,
    )
    with pytest.warns(DeprecationWarning, match=r"read summary\.test_mAP_voc11"):
        assert summary["test_mAP_voc11"] == 0.44
    old = summary.as_dict()
    assert old["out_dir"] == "outputs" and old["skipped"] is False and old["test_mAP_ci"] == (0.39, 0.43)
    skipped = RunSummary(
        mlflow_run_id="run9", registered_model="emonet", out_dir=Path("o"), tracking_uri="u", skip_reason="same recipe"
    )
    assert skipped.skipped and skipped.version is None and "version" not in skipped.as_dict()
    assert "**Training skipped**: same recipe." in skip_markdown(skipped) and "`run9`" in skip_markdown(skipped)


# --------------------------------------------------------------------------- whether to retrain


def test_the_retraining_decision_and_its_tags():
    recipe = {CODE_VERSION_TAG: "abc"}
    skip = RetrainingDecision(recipe=recipe, unneeded="the champion's recipe")
    assert skip.skip_reason == "the champion's recipe" and not skip.trains
    assert skip.run_tags() == {**recipe, TRAINING_SKIPPED_TAG: "true", SKIP_REASON_TAG: "the champion's recipe"}
    forced = dataclasses.replace(skip, forced=True)
    assert forced.trains and forced.unneeded == "the champion's recipe"
    assert forced.run_tags() == {**recipe, TRAINING_SKIPPED_TAG: "false"}
    # A dirty checkout never skips, and asks the store nothing (no client needed).
    dirty = decide_retraining(None, "emonet", {CODE_VERSION_TAG: "abc+dirty"})
    assert dirty.trains and dirty.unneeded is None
