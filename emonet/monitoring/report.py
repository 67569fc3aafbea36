"""What a monitoring run shows: Evidently's HTML report of the column tests, and a markdown table.

The HTML report runs, through Evidently, the decision's own column tests at the
decision's threshold (Kolmogorov-Smirnov for numeric signals, EmoNet's chi-square test
of homogeneity registered as an Evidently test for categorical ones), with Evidently's
distribution plots beside each. Evidently's usage telemetry is switched off
(``DO_NOT_TRACK``) before it is imported; it is imported only when a report is built
(about 7 s).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from emonet.monitoring.drift import DriftReport, PerformanceCheck, chi2_homogeneity_test
from emonet.monitoring.signals import SIGNALS
from emonet.utils.io import atomic_path

__all__ = ["CHI2_TEST_NAME", "evidently_drift_values", "markdown_summary", "write_html_report"]

CHI2_TEST_NAME = "emonet_chi2_homogeneity"


@functools.cache
def _evidently() -> Any:
    """Evidently, imported with its telemetry off and EmoNet's chi-square test registered."""
    os.environ.setdefault("DO_NOT_TRACK", "1")  # evidently.telemetry's opt-out
    os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")  # its legacy UI's
    with warnings.catch_warnings():
        # Evidently imports its UI server's framework (litestar), which warns about its own API.
        warnings.simplefilter("ignore", DeprecationWarning)
        import evidently
        from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
        from evidently.legacy.core import ColumnType

    def chi2(reference: pd.Series, current: pd.Series, feature_type: Any, threshold: float) -> tuple[float, bool]:
        _, p_value = chi2_homogeneity_test(reference.to_numpy(), current.to_numpy())
        return p_value, p_value < threshold

    test = StatTest(
        name=CHI2_TEST_NAME,
        display_name="chi-square test of homogeneity p_value",
        allowed_feature_types=[ColumnType.Categorical],
    )
    register_stattest(test, default_impl=chi2)
    return evidently


def _run(reference: pd.DataFrame, batch: pd.DataFrame, threshold: float) -> Any:
    evidently = _evidently()
    from evidently.metrics import ValueDrift

    numeric = [s.name for s in SIGNALS if s.kind == "numeric"]
    categorical = [s.name for s in SIGNALS if s.kind == "categorical"]
    definition = evidently.DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    metrics = [
        ValueDrift(column=s.name, method="ks" if s.kind == "numeric" else CHI2_TEST_NAME, threshold=threshold)
        for s in SIGNALS
    ]
    columns = numeric + categorical
    # Categories as strings on both sides: a 0/1 column must not be read as numbers.
    sides = [frame[columns].astype({name: str for name in categorical}) for frame in (batch, reference)]
    current, ref = (evidently.Dataset.from_pandas(side, data_definition=definition) for side in sides)
    return evidently.Report(metrics).run(current, ref)


def evidently_drift_values(reference: pd.DataFrame, batch: pd.DataFrame, threshold: float) -> dict[str, float]:
    """Each column's p-value as Evidently computes it (the report's numbers), by signal name."""
    snapshot = _run(reference, batch, threshold)
    return {metric["config"]["column"]: float(metric["value"]) for metric in snapshot.dict()["metrics"]}


def write_html_report(reference: pd.DataFrame, batch: pd.DataFrame, threshold: float, path: str | Path) -> Path:
    """Evidently's HTML report of every column test at ``threshold``, written atomically to ``path``."""
    snapshot = _run(reference, batch, threshold)
    path = Path(path)
    with atomic_path(path) as tmp:
        snapshot.save_html(str(tmp))
    return path


def _interval(value: Any) -> str:
    return f"{value.estimate:.4f} [{value.low:.4f}, {value.high:.4f}]"


def markdown_summary(
    title: str, drift: DriftReport, performance: PerformanceCheck | None, counts: dict[str, int], links: list[str]
) -> str:
    """The decision and the per-signal table, as markdown (the Prefect artifact, the CLI's summary)."""
    decision = "**drift detected**" if drift.drift_detected else "no drift"
    lines = [
        f"## {title}",
        "",
        f"Decision: {decision}: {len(drift.drifted)} of {len(drift.signals)} signals moved "
        f"(family-wise false-alarm rate {drift.false_alarm_rate:g}: each test at p < {drift.threshold:.2e}).",
        f"Crops: {counts['crops']} scored, {counts['skipped']} skipped.",
    ]
    if performance is not None:
        verdict = "**degraded**" if performance.degraded else "not degraded"
        lines += [
            "",
            f"Performance ({verdict}): mAP {_interval(performance.batch['mAP'])} against the reference's "
            f"{_interval(performance.reference['mAP'])}; difference {_interval(performance.difference['mAP'])} "
            f"(scikit-learn AP). mAP_voc11 {_interval(performance.batch['mAP_voc11'])} against "
            f"{_interval(performance.reference['mAP_voc11'])}.",
        ]
    lines += ["", "| signal | group | test | statistic | p-value | reference | batch | drifted |", "|---" * 8 + "|"]
    for signal in sorted(drift.signals, key=lambda s: s.p_value):
        lines.append(
            f"| {signal.name} | {signal.group} | {signal.test} | {signal.statistic:.4g} | {signal.p_value:.2e} | "
            f"{signal.reference:.4g} | {signal.batch:.4g} | {'yes' if signal.drifted else ''} |"
        )
    lines += ["", *links]
    return "\n".join(lines) + "\n"
