"""What one run of the training flow did, as a typed value: the flow returns it, the summary
artifact (:mod:`tasks.report`) and the printed report (``flows.training_pipeline.run_report``)
are written from it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emonet.reports.evaluation import EvaluationReport
from emonet.tracking.registry import PromotionDecision

__all__ = ["RunSummary", "promotion_explanation"]


def promotion_explanation(decision: PromotionDecision) -> str | None:
    """The decision's own explanation (``PromotionDecision.explain()``) where the registry
    has one, else None (the callers then show the decision and its reason)."""
    explain = getattr(decision, "explain", None)
    return str(explain()) if callable(explain) else None


@dataclass(frozen=True)
class RunSummary:
    """One run of ``emonet-training-pipeline``: its MLflow run, where its outputs are, and
    either why it skipped training or the trained version's metrics and promotion.

    ``summary["test_mAP"]`` (the dict the flow returned before) still reads the same keys,
    with a ``DeprecationWarning``; read the attributes instead.
    """

    mlflow_run_id: str
    registered_model: str  # the registered model that receives (or kept) the version
    out_dir: Path
    tracking_uri: str
    mlflow_run_link: str | None = None  # the run's page, where the store is an HTTP server
    skip_reason: str | None = None  # why training was skipped; None when it trained
    # Below: None (or empty) when training was skipped.
    test_metrics: dict[str, float] = field(default_factory=dict)
    test_mAP_ci: tuple[float, float] | None = None  # the test mAP's bootstrap interval
    ci_confidence: float | None = None  # its confidence, e.g. 0.95
    val_mAP: float | None = None
    registration: PromotionDecision | None = None  # the version, its alias and the promotion decision
    review: Path | None = None  # the prediction review's index.html

    @classmethod
    def of_training(
        cls,
        *,
        evaluation: EvaluationReport,
        registration: PromotionDecision,
        review: Path,
        **run: Any,
    ) -> RunSummary:
        """The summary of a run that trained, evaluated and registered a version; ``run``:
        the fields of the run itself (``mlflow_run_id``, ``registered_model``, ...)."""
        interval = evaluation.intervals["mAP"]
        validation = evaluation.validation
        return cls(
            **run,
            test_metrics=dict(evaluation.metrics),
            test_mAP_ci=(interval.low, interval.high),
            ci_confidence=interval.confidence,
            val_mAP=validation.metrics["mAP"] if validation is not None else None,
            registration=registration,
            review=Path(review),
        )

    @property
    def skipped(self) -> bool:
        return self.skip_reason is not None

    @property
    def test_mAP(self) -> float | None:
        return self.test_metrics.get("mAP")

    @property
    def test_mAP_voc11(self) -> float | None:
        return self.test_metrics.get("mAP_voc11")

    @property
    def version(self) -> str | None:
        return self.registration.version if self.registration is not None else None

    @property
    def alias(self) -> str | None:
        return self.registration.alias if self.registration is not None else None

    @property
    def decision(self) -> str | None:
        """The promotion decision's name (``first_version``, ``not_significantly_better``, ...)."""
        return self.registration.decision if self.registration is not None else None

    def as_dict(self) -> dict[str, Any]:
        """The dict the flow returned before it returned this (plain values, paths as strings)."""
        summary: dict[str, Any] = {
            "mlflow_run_id": self.mlflow_run_id,
            "registered_model": self.registered_model,
            "out_dir": str(self.out_dir),
            "tracking_uri": self.tracking_uri,
            "mlflow_run_link": self.mlflow_run_link,
            "skipped": self.skipped,
            "skip_reason": self.skip_reason,
        }
        if self.registration is not None:
            summary.update(
                test_mAP=self.test_mAP,
                test_mAP_ci=self.test_mAP_ci,
                test_mAP_voc11=self.test_mAP_voc11,
                test_metrics=self.test_metrics,
                val_mAP=self.val_mAP,
                version=self.version,
                alias=self.alias,
                decision=self.decision,
                review=str(self.review),
            )
        return summary

    def __getitem__(self, key: str) -> Any:
        warnings.warn(
            f"summary[{key!r}] is deprecated: the training flow returns a RunSummary; read summary.{key}",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.as_dict()[key]
