"""The drift decision: one test per signal, a family-wise false-alarm rate, and the performance check.

Every column of :data:`~emonet.monitoring.signals.SIGNALS` is tested against the
reference (two-sample Kolmogorov-Smirnov for numeric columns, the chi-square test of
homogeneity for categorical ones), and the model's penultimate features by an MMD
permutation test. A batch is flagged when any signal's p-value is below
``false_alarm_rate / m`` for ``m`` tests (Bonferroni): whatever the tests' dependence,
a batch drawn like the reference is flagged with probability at most
``false_alarm_rate`` (0.05 by default), where 61 tests at 0.05 each would flag most
such batches.

The tests are scipy's and numpy's, run here, not Evidently's: the decision needs every
p-value (Evidently's embedding drift has none: a fixed threshold or a bootstrap
quantile), its chi-square test takes the reference's shares as exact, which raises
false alarms with a reference of a few hundred rows, and the tests run in milliseconds.
The HTML report (:mod:`emonet.monitoring.report`) runs these same two column tests
through Evidently, at the same threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from emonet.metrics.bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    BootstrapInterval,
    bootstrap_two_samples,
)
from emonet.monitoring.signals import SIGNALS, Signal

__all__ = [
    "DEFAULT_FALSE_ALARM_RATE",
    "EMBEDDING_SIGNAL",
    "DriftReport",
    "PerformanceCheck",
    "SignalResult",
    "check_performance",
    "chi2_homogeneity_test",
    "detect_drift",
    "embedding_drift",
    "ks_test",
]

DEFAULT_FALSE_ALARM_RATE = 0.05
EMBEDDING_SIGNAL = "features"
# Rows of each side the MMD test uses (a seeded subsample beyond), and its permutations:
# 1,999 let a p-value reach 1/2000, below the Bonferroni threshold 0.05 / 61.
_MMD_ROWS = 400
_MMD_PERMUTATIONS = 1999
_MMD_COMPONENTS = 32


@dataclass(frozen=True)
class SignalResult:
    """One signal's test: its statistic, p-value, threshold and the two sides' summaries.

    ``reference`` and ``batch`` are the mean (numeric), the positive rate (``positive_*``),
    the share of crops without a face (``face_class``) or the features' mean distance to the
    reference centroid.
    """

    name: str
    group: str
    test: str
    statistic: float
    p_value: float
    threshold: float
    reference: float
    batch: float

    @property
    def drifted(self) -> bool:
        return self.p_value < self.threshold


@dataclass(frozen=True)
class DriftReport:
    """Every signal's test and the decision, at a family-wise ``false_alarm_rate``."""

    signals: list[SignalResult]
    false_alarm_rate: float
    threshold: float  # per test: false_alarm_rate / len(signals)

    @property
    def drifted(self) -> list[SignalResult]:
        return [signal for signal in self.signals if signal.drifted]

    @property
    def drift_detected(self) -> bool:
        return bool(self.drifted)

    @property
    def drifted_share(self) -> float:
        return len(self.drifted) / len(self.signals)

    def most_moved(self, k: int = 3) -> list[SignalResult]:
        """The ``k`` signals with the smallest p-values (the largest statistic breaks ties)."""
        return sorted(self.signals, key=lambda signal: (signal.p_value, -signal.statistic))[:k]

    def frame(self) -> pd.DataFrame:
        """One row per signal: the per-signal CSV of a monitoring run."""
        rows = [{**signal.__dict__, "drifted": signal.drifted} for signal in self.signals]
        return pd.DataFrame(rows)


def ks_test(reference: np.ndarray, batch: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov ``(D, p-value)``; ``(0, 1)`` when both are one constant."""
    reference, batch = np.asarray(reference, dtype=np.float64), np.asarray(batch, dtype=np.float64)
    if np.ptp(np.concatenate([reference, batch])) == 0:
        return 0.0, 1.0
    result = stats.ks_2samp(reference, batch)
    return float(result.statistic), float(result.pvalue)


def chi2_homogeneity_test(reference: np.ndarray, batch: np.ndarray) -> tuple[float, float]:
    """Chi-square test that both samples share one categorical distribution: ``(chi2, p-value)``.

    A 2 x k contingency table of counts over the categories either side has (Yates'
    correction for 2 x 2); ``(0, 1)`` when there is one category only.
    """
    categories = sorted(set(pd.unique(reference)) | set(pd.unique(batch)), key=str)
    if len(categories) < 2:
        return 0.0, 1.0
    table = np.array(
        [[int(np.sum(sample == category)) for category in categories] for sample in (reference, batch)]
    )  # (2, k)
    result = stats.chi2_contingency(table)
    return float(result.statistic), float(result.pvalue)


def _standardized_components(
    reference: np.ndarray, batch: np.ndarray, components: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both sides standardized and projected on the first principal components of the
    pooled rows. Fitted on the pooled rows, the map does not depend on which row is whose,
    so the permutation test stays exact; fitted on the reference alone, it would spread the
    reference's own rows more than new rows and flag every batch."""
    pooled = np.vstack([reference, batch])
    mean, std = pooled.mean(axis=0), pooled.std(axis=0) + 1e-6
    pooled = (pooled - mean) / std
    k = max(1, min(components, pooled.shape[1], pooled.shape[0] - 1))
    _, _, vt = np.linalg.svd(pooled, full_matrices=False)
    projected = pooled @ vt[:k].T
    return projected[: len(reference)], projected[len(reference) :]


def embedding_drift(
    reference: np.ndarray,
    batch: np.ndarray,
    *,
    n_permutations: int = _MMD_PERMUTATIONS,
    max_rows: int = _MMD_ROWS,
    components: int = _MMD_COMPONENTS,
    seed: int = 0,
) -> tuple[float, float, float, float]:
    """MMD permutation test on the penultimate features: ``(MMD^2, p-value, reference, batch)``.

    Features are standardized and projected on the first ``components`` principal
    components of both sides pooled; the kernel is Gaussian with the median
    heuristic's bandwidth. The p-value is ``(1 + #{permuted >= observed}) / (1 +
    n_permutations)``: exact when the two sides are exchangeable. ``reference``/``batch`` are
    each side's mean distance to the reference centroid in that space (what moved, in words).
    """
    rng = np.random.default_rng(seed)
    reference = np.asarray(reference, dtype=np.float64)
    batch = np.asarray(batch, dtype=np.float64)
    if len(reference) > max_rows:
        reference = reference[rng.choice(len(reference), max_rows, replace=False)]
    if len(batch) > max_rows:
        batch = batch[rng.choice(len(batch), max_rows, replace=False)]
    ref, cur = _standardized_components(reference, batch, components)
    pooled = np.vstack([ref, cur])  # (m + n, k)
    squared = np.sum(pooled**2, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * pooled @ pooled.T, 0.0)
    bandwidth = np.median(distances[np.triu_indices(len(pooled), k=1)]) or 1.0
    kernel = np.exp(-distances / bandwidth)
    m, n = len(ref), len(cur)
    weights = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)])
    observed = float(weights @ kernel @ weights)
    permuted = np.stack([weights[rng.permutation(m + n)] for _ in range(n_permutations)])  # (B, m + n)
    null = np.einsum("bi,bi->b", permuted @ kernel, permuted)
    p_value = (1.0 + np.count_nonzero(null >= observed - 1e-12)) / (1.0 + n_permutations)
    centre = ref.mean(axis=0)
    spread = (float(np.linalg.norm(ref - centre, axis=1).mean()), float(np.linalg.norm(cur - centre, axis=1).mean()))
    return observed, float(p_value), *spread


def _summary(signal: Signal, values: pd.Series) -> float:
    if signal.name == "face_class":
        return float(np.mean(values == "none"))
    return float(np.mean(values))


def detect_drift(
    reference: pd.DataFrame,
    batch: pd.DataFrame,
    reference_features: np.ndarray | None = None,
    batch_features: np.ndarray | None = None,
    *,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    signals: tuple[Signal, ...] = SIGNALS,
    seed: int = 0,
) -> DriftReport:
    """Test every signal of ``batch`` against ``reference`` (tables of :func:`~emonet.monitoring.signals.signal_table`).

    The features test joins the family when both feature arrays are given.

    Raises
    ------
    ValueError
        ``false_alarm_rate`` outside (0, 1), or a table without a signal's column.
    """
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be strictly between 0 and 1, got {false_alarm_rate!r}")
    missing = [signal.name for signal in signals if signal.name not in reference or signal.name not in batch]
    if missing:
        raise ValueError(f"the signal tables lack the columns {missing}")
    with_features = reference_features is not None and batch_features is not None
    threshold = false_alarm_rate / (len(signals) + (1 if with_features else 0))
    results = []
    for signal in signals:
        ref, cur = reference[signal.name].to_numpy(), batch[signal.name].to_numpy()
        test = ks_test if signal.kind == "numeric" else chi2_homogeneity_test
        statistic, p_value = test(ref, cur)
        results.append(
            SignalResult(
                signal.name,
                signal.group,
                "ks" if signal.kind == "numeric" else "chi2",
                statistic,
                p_value,
                threshold,
                _summary(signal, reference[signal.name]),
                _summary(signal, batch[signal.name]),
            )
        )
    if with_features:
        statistic, p_value, ref_spread, cur_spread = embedding_drift(reference_features, batch_features, seed=seed)
        results.append(
            SignalResult(EMBEDDING_SIGNAL, "model", "mmd", statistic, p_value, threshold, ref_spread, cur_spread)
        )
    return DriftReport(results, false_alarm_rate, threshold)


@dataclass(frozen=True)
class PerformanceCheck:
    """A labelled batch's mAP (both APs) with intervals, the reference's, and their difference.

    ``degraded`` when the upper end of the batch-minus-reference interval of scikit-learn's
    mAP is below zero: the batch is worse beyond the noise of both samples.
    """

    batch: dict[str, BootstrapInterval]
    reference: dict[str, BootstrapInterval]
    difference: dict[str, BootstrapInterval] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return self.difference["mAP"].high < 0.0


def check_performance(
    reference_true: np.ndarray,
    reference_prob: np.ndarray,
    batch_true: np.ndarray,
    batch_prob: np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PerformanceCheck:
    """Both mAPs of the batch and of the reference, and batch minus reference, with intervals."""
    settings = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    both = bootstrap_two_samples(batch_true, batch_prob, reference_true, reference_prob, **settings)
    return PerformanceCheck(both.a, both.b, both.difference)
