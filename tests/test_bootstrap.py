"""Bootstrap intervals: against an explicit resample loop, and the properties promotion relies on."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning

from emonet.metrics import mean_average_precision_score, mean_voc11_average_precision_score
from emonet.metrics.bootstrap import (
    BOOTSTRAP_METRICS,
    BootstrapInterval,
    bootstrap_counts,
    bootstrap_intervals,
    bootstrap_map_difference,
    bootstrap_two_samples,
    paired_bootstrap_map_difference,
)


def emotic_like(n: int, n_labels: int = 8, seed: int = 0, signal: float = 0.3):
    """Multi-hot labels with 3-50% prevalence and probabilities that carry some signal."""
    rng = np.random.default_rng(seed)
    y_true = (rng.random((n, n_labels)) < np.linspace(0.03, 0.5, n_labels)).astype(int)
    y_prob = np.clip(signal * y_true + rng.random((n, n_labels)), 0.0, 1.0)
    return y_true, y_prob


def explicit_resample_maps(y_true, y_prob, n_resamples, seed):
    """Each resample's two mAPs, recomputed from copied rows: the slow, obvious way."""
    draws = np.random.default_rng(seed).integers(0, len(y_true), size=(n_resamples, len(y_true)))
    maps, voc11s = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for rows in draws:
            present = y_true[rows].sum(axis=0) > 0  # labels without a positive are left out
            maps.append(mean_average_precision_score(y_true[rows][:, present], y_prob[rows][:, present]))
            voc11s.append(mean_voc11_average_precision_score(y_true[rows][:, present], y_prob[rows][:, present]))
    return np.array(maps), np.array(voc11s), draws


def test_counts_are_the_drawn_rows():
    counts = bootstrap_counts(50, 7, seed=3)
    draws = np.random.default_rng(3).integers(0, 50, size=(7, 50))
    assert counts.shape == (7, 50)
    for b in range(7):
        np.testing.assert_array_equal(counts[b], np.bincount(draws[b], minlength=50))


def test_intervals_match_an_explicit_resample_loop():
    # One rare label (2 positives) is missing from many resamples: it must be left out there.
    y_true, y_prob = emotic_like(120, seed=1)
    y_true[:, 0] = 0
    y_true[[5, 70], 0] = 1
    maps, voc11s, draws = explicit_resample_maps(y_true, y_prob, 40, seed=7)
    assert (y_true[draws][:, :, 0].sum(axis=1) == 0).any()  # the case is exercised

    affect_true = np.random.default_rng(2).uniform(1, 10, size=(120, 2))
    affect_true[::9] = np.nan  # masked rows count in no affect error
    affect_pred = np.random.default_rng(3).uniform(1, 10, size=(120, 2))
    result = bootstrap_intervals(y_true, y_prob, affect_true, affect_pred, n_resamples=40, seed=7)
    assert set(result) == set(BOOTSTRAP_METRICS)

    for key, values in (("mAP", maps), ("mAP_voc11", voc11s)):
        low, high = np.percentile(values, [2.5, 97.5])
        assert result[key].low == pytest.approx(low, abs=1e-12)
        assert result[key].high == pytest.approx(high, abs=1e-12)
    assert result["mAP"].estimate == mean_average_precision_score(y_true, y_prob)
    assert result["mAP_voc11"].estimate == mean_voc11_average_precision_score(y_true, y_prob)

    used = np.isfinite(affect_true).all(axis=1)
    for column, key in enumerate(("mae_valence_1_10", "mae_arousal_1_10")):
        errors = []
        for rows in draws:
            rows = rows[used[rows]]
            errors.append(np.abs(affect_pred[rows, column] - affect_true[rows, column]).mean())
        low, high = np.percentile(errors, [2.5, 97.5])
        assert result[key].low == pytest.approx(low, abs=1e-12)
        assert result[key].high == pytest.approx(high, abs=1e-12)
        assert result[key].estimate == pytest.approx(
            np.abs(affect_pred[used, column] - affect_true[used, column]).mean()
        )


def test_interval_holds_the_estimate_and_narrows_with_more_rows():
    widths = []
    for n in (300, 3000):
        y_true, y_prob = emotic_like(n, seed=n)
        result = bootstrap_intervals(y_true, y_prob, n_resamples=300, seed=0)
        for key in ("mAP", "mAP_voc11"):
            interval = result[key]
            assert interval.low < interval.estimate < interval.high
        widths.append(result["mAP"].high - result["mAP"].low)
    assert widths[1] < widths[0] / 2  # about 1 / sqrt(10) as wide


def test_same_seed_same_interval_other_seed_other_interval():
    y_true, y_prob = emotic_like(200, seed=4)
    first = bootstrap_intervals(y_true, y_prob, n_resamples=100, seed=11)
    again = bootstrap_intervals(y_true, y_prob, n_resamples=100, seed=11)
    other = bootstrap_intervals(y_true, y_prob, n_resamples=100, seed=12)
    assert first == again
    assert first["mAP"].seed == 11 and first["mAP"].n_resamples == 100 and first["mAP"].confidence == 0.95
    assert (first["mAP"].low, first["mAP"].high) != (other["mAP"].low, other["mAP"].high)
    assert isinstance(first["mAP"], BootstrapInterval)


def test_higher_confidence_gives_a_wider_interval():
    y_true, y_prob = emotic_like(200, seed=6)
    narrow = bootstrap_intervals(y_true, y_prob, n_resamples=200, confidence=0.5)["mAP"]
    wide = bootstrap_intervals(y_true, y_prob, n_resamples=200, confidence=0.99)["mAP"]
    assert wide.low < narrow.low and narrow.high < wide.high


@pytest.mark.parametrize("protocol", ["sklearn", "voc11"])
def test_a_model_against_itself_differs_by_exactly_zero(protocol):
    y_true, y_prob = emotic_like(150, seed=8)
    difference = paired_bootstrap_map_difference(y_true, y_prob, y_prob.copy(), protocol=protocol, n_resamples=200)
    assert (difference.estimate, difference.low, difference.high) == (0.0, 0.0, 0.0)


def test_a_clearly_better_model_has_an_interval_above_zero():
    rng = np.random.default_rng(9)
    y_true, _ = emotic_like(400, seed=9)
    better = np.clip(y_true + rng.normal(0, 0.3, y_true.shape), 0, 1)  # the truth plus small noise
    random = rng.random(y_true.shape)
    difference = paired_bootstrap_map_difference(y_true, better, random, n_resamples=300, seed=1)
    assert difference.low > 0.2
    assert difference.estimate == pytest.approx(
        mean_average_precision_score(y_true, better) - mean_average_precision_score(y_true, random)
    )
    reverse = paired_bootstrap_map_difference(y_true, random, better, n_resamples=300, seed=1)
    assert reverse.high < -0.2


def test_paired_difference_uses_the_same_rows_for_both_models():
    # Two noisy models of equal skill: pairing removes the rows' shared noise, so the
    # difference's interval is narrower than either model's own interval.
    rng = np.random.default_rng(10)
    y_true, _ = emotic_like(300, seed=10)
    signal = y_true * 0.5 + rng.random(y_true.shape)
    model_a = signal + 0.1 * rng.random(y_true.shape)
    model_b = signal + 0.1 * rng.random(y_true.shape)
    difference = paired_bootstrap_map_difference(y_true, model_a, model_b, n_resamples=300)
    alone = bootstrap_intervals(y_true, model_a, n_resamples=300)["mAP"]
    assert difference.high - difference.low < (alone.high - alone.low) / 2
    assert difference.low < 0 < difference.high  # equal skill: no significant difference


def test_voc11_difference_matches_an_explicit_loop():
    y_true, y_prob_a = emotic_like(80, seed=12)
    _, y_prob_b = emotic_like(80, seed=13)
    _, voc_a, _ = explicit_resample_maps(y_true, y_prob_a, 25, seed=2)
    _, voc_b, _ = explicit_resample_maps(y_true, y_prob_b, 25, seed=2)
    difference = paired_bootstrap_map_difference(
        y_true, y_prob_a, y_prob_b, protocol="voc11", n_resamples=25, seed=2, confidence=0.9
    )
    low, high = np.percentile(voc_a - voc_b, [5, 95])
    assert difference.low == pytest.approx(low, abs=1e-12) and difference.high == pytest.approx(high, abs=1e-12)


def test_two_samples_resample_each_side_independently_and_read_everything_off_the_same_draws():
    y_a, p_a = emotic_like(120, seed=14)
    y_b, p_b = emotic_like(90, seed=15, signal=0.1)
    maps_a, voc_a, _ = explicit_resample_maps(y_a, p_a, 40, seed=3)
    maps_b, voc_b, _ = explicit_resample_maps(y_b, p_b, 40, seed=4)  # B's resamples use seed + 1
    both = bootstrap_two_samples(y_a, p_a, y_b, p_b, n_resamples=40, seed=3, confidence=0.9)
    for key, a, b in (("mAP", maps_a, maps_b), ("mAP_voc11", voc_a, voc_b)):
        low, high = np.percentile(a - b, [5, 95])
        assert both.difference[key].low == pytest.approx(low, abs=1e-12)
        assert both.difference[key].high == pytest.approx(high, abs=1e-12)
        assert both.a[key] == bootstrap_intervals(y_a, p_a, n_resamples=40, seed=3, confidence=0.9)[key]
        assert both.b[key] == bootstrap_intervals(y_b, p_b, n_resamples=40, seed=4, confidence=0.9)[key]
    assert both.difference["mAP"].estimate == pytest.approx(both.a["mAP"].estimate - both.b["mAP"].estimate)
    single = bootstrap_map_difference(y_a, p_a, y_b, p_b, protocol="voc11", n_resamples=40, seed=3, confidence=0.9)
    assert single == both.difference["mAP_voc11"]
    with pytest.raises(ValueError, match="A has 8 labels but B has 5"):
        bootstrap_two_samples(y_a, p_a, y_b[:, :5], p_b[:, :5], n_resamples=10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_resamples": 0}, "n_resamples"),
        ({"n_resamples": 2.5}, "n_resamples"),
        ({"confidence": 1.0}, "confidence"),
        ({"confidence": 0.0}, "confidence"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    y_true, y_prob = emotic_like(20)
    with pytest.raises(ValueError, match=match):
        bootstrap_intervals(y_true, y_prob, **kwargs)
    with pytest.raises(ValueError, match=match):
        paired_bootstrap_map_difference(y_true, y_prob, y_prob, **kwargs)


def test_bad_inputs_are_refused():
    y_true, y_prob = emotic_like(20)
    with pytest.raises(ValueError, match="both affect_true and affect_pred"):
        bootstrap_intervals(y_true, y_prob, np.ones((20, 2)))
    with pytest.raises(ValueError, match=r"affect_pred must have shape \(20, 2\)"):
        bootstrap_intervals(y_true, y_prob, np.ones((20, 2)), np.ones((19, 2)))
    with pytest.raises(ValueError, match="y_prob_b"):
        paired_bootstrap_map_difference(y_true, y_prob, y_prob[:10])
    with pytest.raises(ValueError, match="protocol"):
        paired_bootstrap_map_difference(y_true, y_prob, y_prob, protocol="pascal")
