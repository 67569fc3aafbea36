"""Metrics against hand-computed values, scikit-learn, and their input checks."""

from __future__ import annotations

import doctest
import importlib
import logging
import pkgutil
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import average_precision_score, f1_score

from emonet import metrics
from emonet.data.normalize import AffectNormalizer
from emonet.metrics import (
    EVALUATION_KEYS,
    REPORT_COLUMNS,
    affect_errors,
    binarize,
    check_multilabel,
    cooccurrence_matrix,
    evaluate_predictions,
    face_visibility_groups,
    mean_average_precision_score,
    metrics_by_visibility,
    multilabel_scores,
    per_emotion_report,
    true_vs_predicted_matrix,
    tune_thresholds,
)
from emonet.schema import EMOTIONS, NUM_EMOTIONS


def random_multilabel(n: int = 60, n_labels: int = NUM_EMOTIONS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels with at least one positive per column and informative probabilities."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_labels)) < 0.3).astype(int)
    y[np.arange(n_labels) % n, np.arange(n_labels)] = 1
    prob = np.clip(0.35 * y + 0.65 * rng.random((n, n_labels)), 0.0, 1.0)
    return y, prob


@pytest.mark.parametrize("module", [info.name for info in pkgutil.iter_modules(metrics.__path__)])
def test_docstring_examples_hold(module: str) -> None:
    submodule = importlib.import_module(f"emonet.metrics.{module}")
    result = doctest.testmod(submodule, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 1
    assert result.failed == 0


# --- check_multilabel ----------------------------------------------------------------


def test_check_multilabel_returns_int_targets_and_float_scores() -> None:
    y_true, y_score = check_multilabel([[1.0, 0.0], [False, True]], [[1, 0], [2, 3]])
    assert y_true.dtype == np.int64 and y_score.dtype == np.float64
    np.testing.assert_array_equal(y_true, [[1, 0], [0, 1]])


@pytest.mark.parametrize(
    ("y_true", "y_score", "kwargs", "match"),
    [
        ([1, 0, 1], [0.2, 0.1, 0.9], {}, r"y_true must be 2-D .* got shape \(3,\)"),
        ([[1, 0]], [0.2, 0.1], {}, r"y_score must be 2-D"),
        (np.zeros((0, 3)), np.zeros((0, 3)), {}, "no samples"),
        ([[1, 0], [0, 1]], [[0.1, 0.2, 0.3]] * 2, {}, r"same shape, got \(2, 2\) and \(2, 3\)"),
        ([[1, 2], [0, 1]], [[0.1, 0.2]] * 2, {}, r"y_true must hold only 0 and 1, found \[2\]"),
        ([[1, 0.5]], [[0.1, 0.2]], {}, r"found \[0.5\]"),
        ([[1, 0]], [[0.1, np.nan]], {}, "y_score holds 1 NaN or infinite"),
        ([[1, 0]], [[np.inf, 0.2]], {"name": "y_prob"}, "y_prob holds 1 NaN or infinite"),
        ([[1, 0]], [["a", "b"]], {}, "must be numeric"),
        ([[1, 0]], [[0.1, 0.2]], {"n_labels": 26}, r"expected 26 label columns, got 2"),
        ([[1, 0]], [[0.1, 0.2]], {"name": "y_pred", "binary": True}, r"y_pred must hold only 0 and 1"),
    ],
)
def test_check_multilabel_rejects_bad_input(y_true, y_score, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_multilabel(y_true, y_score, **kwargs)


# --- average precision -------------------------------------------------------------


def test_average_precision_hand_computed() -> None:
    # Label 0 is perfectly ranked: AP 1. Label 1 ranks pos, neg, pos, neg: AP = (1 + 2/3) / 2.
    y_true = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    y_prob = np.array([[0.9, 0.9], [0.8, 0.8], [0.3, 0.7], [0.1, 0.1]])
    report = per_emotion_report(y_true, y_prob, labels=["a", "b"])
    np.testing.assert_allclose(report["average_precision"], [1.0, 5 / 6])
    assert mean_average_precision_score(y_true, y_prob) == pytest.approx((1.0 + 5 / 6) / 2)


def test_mean_average_precision_matches_sklearn() -> None:
    y, prob = random_multilabel()
    expected = average_precision_score(y, prob, average="macro")
    assert mean_average_precision_score(y, prob) == pytest.approx(expected)


def test_label_without_positives_is_nan_left_out_and_warned() -> None:
    y, prob = random_multilabel()
    y[:, 3] = 0
    with pytest.warns(UndefinedMetricWarning, match=EMOTIONS[3]):
        report = per_emotion_report(y, prob)
    assert np.isnan(report.loc[EMOTIONS[3], "average_precision"])
    assert report["average_precision"].drop(EMOTIONS[3]).notna().all()

    kept = np.arange(NUM_EMOTIONS) != 3
    expected = average_precision_score(y[:, kept], prob[:, kept], average="macro")
    with pytest.warns(UndefinedMetricWarning, match=r"1 label\(s\) .*Anticipation"):
        assert mean_average_precision_score(y, prob) == pytest.approx(expected)
    assert report["average_precision"].mean() == pytest.approx(expected)  # pandas skips the NaN


def test_mean_average_precision_without_any_positive_raises() -> None:
    with pytest.warns(UndefinedMetricWarning), pytest.raises(ValueError, match="none of the 2 labels"):
        mean_average_precision_score([[0, 0], [0, 0]], [[0.1, 0.2], [0.3, 0.4]])


def test_no_warning_when_every_label_has_positives() -> None:
    y, prob = random_multilabel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_emotion_report(y, prob)
        mean_average_precision_score(y, prob)


# --- per-emotion report ------------------------------------------------------------


def test_per_emotion_report_layout_and_values() -> None:
    y, prob = random_multilabel()
    thresholds = np.linspace(0.3, 0.7, NUM_EMOTIONS)
    report = per_emotion_report(y, prob, thresholds=thresholds)
    assert report.shape == (NUM_EMOTIONS, len(REPORT_COLUMNS))
    assert tuple(report.columns) == REPORT_COLUMNS
    assert tuple(report.index) == EMOTIONS
    np.testing.assert_array_equal(report["support"], y.sum(axis=0))
    np.testing.assert_allclose(report["threshold"], thresholds)
    y_pred = (prob >= thresholds).astype(int)
    np.testing.assert_allclose(report["f1"], f1_score(y, y_pred, average=None, zero_division=0))
    assert report[["precision", "recall", "f1", "average_precision"]].stack().between(0, 1).all()


def test_per_emotion_report_hand_computed_f1() -> None:
    # Predictions at 0.5: [1, 0, 1, 0] against [1, 1, 0, 0]: precision = recall = F1 = 1/2.
    report = per_emotion_report([[1], [1], [0], [0]], [[0.9], [0.2], [0.6], [0.1]], labels=["x"])
    assert report.loc["x", ["precision", "recall", "f1"]].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert report.loc["x", "support"] == 2


def test_per_emotion_report_rejects_bad_labels_and_thresholds() -> None:
    y, prob = random_multilabel(n_labels=3)
    with pytest.raises(ValueError, match="got 26 label names for 3 label columns"):
        per_emotion_report(y, prob)
    with pytest.raises(ValueError, match="unique"):
        per_emotion_report(y, prob, labels=["a", "a", "b"])
    with pytest.raises(ValueError, match=r"thresholds must be a scalar or have shape \(3,\), got shape \(2,\)"):
        per_emotion_report(y, prob, thresholds=[0.5, 0.5], labels=["a", "b", "c"])


# --- thresholds ----------------------------------------------------------------------


def test_binarize_uses_greater_or_equal_per_label() -> None:
    np.testing.assert_array_equal(binarize([[0.5, 0.5], [0.49, 0.9]], [0.5, 0.95]), [[1, 0], [0, 0]])
    assert binarize([[0.2, 0.7]]).dtype == np.int64
    with pytest.raises(ValueError, match="thresholds must be finite"):
        binarize([[0.2, 0.7]], [0.5, np.nan])


def test_tune_thresholds_fixes_a_bad_default() -> None:
    # Every probability is below 0.5 but each label is perfectly ranked.
    rng = np.random.default_rng(1)
    y = np.zeros((40, 3), dtype=int)
    y[:12, 0] = y[10:30, 1] = y[35:, 2] = 1
    prob = np.where(y == 1, rng.uniform(0.3, 0.4, y.shape), rng.uniform(0.1, 0.25, y.shape))

    f1_default = multilabel_scores(y, binarize(prob, 0.5))["f1_macro"]
    thresholds = tune_thresholds(y, prob)
    f1_tuned = multilabel_scores(y, binarize(prob, thresholds))["f1_macro"]
    assert f1_default == 0.0
    assert f1_tuned == pytest.approx(1.0)
    assert ((thresholds >= 0.3) & (thresholds <= 0.4)).all()


def test_tune_thresholds_hand_case_and_default_for_empty_label(caplog) -> None:
    # Label 0 ranks P, P, N, P, N: the best F1 (6/7) keeps the top four scores, down to 0.3.
    y = np.array([[1, 0], [0, 0], [1, 0], [1, 0], [0, 0]])
    prob = np.array([[0.9, 0.2], [0.2, 0.1], [0.8, 0.7], [0.3, 0.3], [0.35, 0.9]])
    with caplog.at_level(logging.WARNING, logger="emonet.metrics"):
        thresholds = tune_thresholds(y, prob, default=0.42)
    np.testing.assert_allclose(thresholds, [0.3, 0.42])
    assert f1_score(y[:, 0], binarize(prob, thresholds)[:, 0]) == pytest.approx(6 / 7)
    assert "no positive sample" in caplog.text
    with pytest.raises(ValueError, match="default threshold must be finite"):
        tune_thresholds(y, prob, default=float("nan"))


# --- multi-label scores ------------------------------------------------------------


def test_multilabel_scores_hand_computed() -> None:
    scores = multilabel_scores([[1, 0], [0, 1]], [[1, 1], [0, 1]])
    # TP 2, FP 1, FN 0; label F1 (1, 2/3); sample F1 (2/3, 1).
    assert scores == pytest.approx(
        {"f1_micro": 0.8, "f1_macro": 5 / 6, "f1_samples": 5 / 6, "subset_accuracy": 0.5, "hamming_loss": 0.25}
    )
    assert all(type(value) is float for value in scores.values())


def test_multilabel_scores_matches_sklearn_and_rejects_probabilities() -> None:
    y, prob = random_multilabel()
    y_pred = binarize(prob, 0.5)
    scores = multilabel_scores(y, y_pred)
    for average in ("micro", "macro", "samples"):
        assert scores[f"f1_{average}"] == pytest.approx(f1_score(y, y_pred, average=average, zero_division=0))
    with pytest.raises(ValueError, match="y_pred must hold only 0 and 1"):
        multilabel_scores(y, prob)


# --- affect ----------------------------------------------------------------------------


def test_affect_errors_on_both_scales() -> None:
    errors = affect_errors([[0.0, 0.0], [0.5, -1.0]], [[0.5, 0.0], [0.0, -0.5]])
    # Valence errors 0.5 and 0.5; arousal errors 0 and 0.5. On 1..10: times 9 / 2.
    assert errors == pytest.approx(
        {"mae_valence": 0.5, "mae_arousal": 0.25, "mae_valence_1_10": 2.25, "mae_arousal_1_10": 1.125, "n_affect": 2}
    )


def test_affect_errors_undo_the_normalization_with_fitted_bounds() -> None:
    low, high = np.array([2.0, 3.0]), np.array([8.0, 7.0])
    raw_true = np.array([[2.0, 7.0], [5.0, 5.0]])
    raw_pred = np.array([[3.5, 6.0], [5.0, 3.0]])

    def normalize(x: np.ndarray) -> np.ndarray:
        return 2 * (x - low) / (high - low) - 1

    errors = affect_errors(normalize(raw_true), normalize(raw_pred), low=low, high=high)
    assert errors["mae_valence_1_10"] == pytest.approx(np.abs(raw_pred - raw_true)[:, 0].mean())  # 0.75
    assert errors["mae_arousal_1_10"] == pytest.approx(1.5)
    assert errors["mae_valence"] == pytest.approx(0.75 * 2 / 6)


def test_affect_errors_skip_rows_with_nan_targets() -> None:
    true = [[0.0, 0.0], [np.nan, np.nan], [0.5, -1.0], [np.nan, 0.2]]
    pred = [[0.5, 0.0], [0.9, 0.9], [0.0, -0.5], [0.0, 0.0]]
    errors = affect_errors(true, pred)
    # Rows 0 and 2 only: as in test_affect_errors_on_both_scales.
    assert errors == pytest.approx(
        {"mae_valence": 0.5, "mae_arousal": 0.25, "mae_valence_1_10": 2.25, "mae_arousal_1_10": 1.125, "n_affect": 2}
    )


def test_affect_errors_with_no_target_are_nan_not_an_error(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        errors = affect_errors([[np.nan, np.nan]], [[0.0, 0.0]])
    assert errors["n_affect"] == 0
    assert all(np.isnan(errors[key]) for key in ("mae_valence", "mae_arousal", "mae_valence_1_10", "mae_arousal_1_10"))
    assert "no row has a valence/arousal target" in caplog.text


def test_1_10_errors_use_the_raw_values_not_the_clipped_targets() -> None:
    # Bounds fitted on a train split whose valence spans 2..8; a test row annotated
    # 9.5 lies outside, so its normalized target is clipped to 1 (i.e. 8 on the scale).
    train = pd.DataFrame({"Valence": [2.0, 5.0, 8.0], "Arousal": [3.0, 5.0, 7.0]})
    normalizer = AffectNormalizer.fit(train)
    raw_test = np.array([[9.5, 5.0], [5.0, 6.0]])
    affect_true, clipped = normalizer.transform(raw_test)
    assert clipped == 1 and affect_true[0, 0] == 1.0
    raw_pred = np.array([[8.0, 5.0], [5.0, 5.0]])  # predicts the train maximum for row 0
    affect_pred, _ = normalizer.transform(raw_pred)
    bounds = {"low": normalizer.low, "high": normalizer.high}

    errors = affect_errors(affect_true, affect_pred, raw_true=raw_test, **bounds)
    assert errors["mae_valence_1_10"] == pytest.approx((1.5 + 0.0) / 2)  # |8 - 9.5| and |5 - 5|
    assert errors["mae_arousal_1_10"] == pytest.approx((0.0 + 1.0) / 2)
    # Without the raw values the clipped target hides row 0's error of 1.5.
    assert affect_errors(affect_true, affect_pred, **bounds)["mae_valence_1_10"] == pytest.approx(0.0)
    # The [-1, 1] errors stay against the (clipped) training targets.
    assert errors["mae_valence"] == pytest.approx(0.0)
    through_evaluation = evaluate_predictions(
        [[1, 0], [0, 1]], [[0.9, 0.1], [0.2, 0.8]], affect_true, affect_pred, raw_true=raw_test, **bounds
    )
    assert through_evaluation["mae_valence_1_10"] == pytest.approx(0.75)
    # A raw NaN (a masked annotation) masks the row as well.
    raw_masked = raw_test.copy()
    raw_masked[1, 1] = np.nan
    masked = affect_errors(affect_true, affect_pred, raw_true=raw_masked, **bounds)
    assert masked["n_affect"] == 1 and masked["mae_valence_1_10"] == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("true", "pred", "kwargs", "match"),
    [
        ([[0.0, 0.1, 0.2]], [[0.0, 0.1, 0.2]], {}, r"affect_true must have shape \(n_samples, 2\)"),
        ([[0.0, 0.1]], [[0.0, 0.1], [0.2, 0.3]], {}, r"same shape, got \(1, 2\) and \(2, 2\)"),
        ([[0.0, 0.1]], [[np.nan, 0.1]], {}, "affect_pred holds 1 NaN"),
        ([[np.inf, 0.1]], [[0.0, 0.1]], {}, "affect_true holds 1 infinite"),
        ([[0.0, 0.1]], [[0.0, 0.1]], {"raw_true": [[5.0, 5.0], [5.0, 5.0]]}, "raw_true has 2 samples, expected 1"),
        ([[0.0, 0.1]], [[0.0, 0.1]], {"low": (5.0, 1.0), "high": (5.0, 10.0)}, "high must exceed low"),
        ([[0.0, 0.1]], [[0.0, 0.1]], {"low": (1.0, 2.0, 3.0)}, "low must be a finite"),
    ],
)
def test_affect_errors_rejects_bad_input(true, pred, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        affect_errors(true, pred, **kwargs)


# --- matrices ----------------------------------------------------------------------


def test_cooccurrence_matrix_hand_case() -> None:
    y = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]
    expected = [[3, 2, 1], [2, 2, 1], [1, 1, 1]]
    np.testing.assert_array_equal(cooccurrence_matrix(y), expected)
    with pytest.raises(ValueError, match="y must hold only 0 and 1"):
        cooccurrence_matrix([[0.2, 1.0]])


def test_true_vs_predicted_matrix_hand_case() -> None:
    y_true = [[1, 0, 0], [1, 1, 0], [0, 1, 0]]
    y_pred = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    counts = true_vs_predicted_matrix(y_true, y_pred)
    # Row "true 0" (samples 0, 1): predicted 0 once, 1 twice, 2 once.
    np.testing.assert_array_equal(counts, [[1, 2, 1], [1, 2, 1], [0, 0, 0]])
    rates = true_vs_predicted_matrix(y_true, y_pred, normalize=True)
    np.testing.assert_allclose(rates[:2], [[0.5, 1.0, 0.5], [0.5, 1.0, 0.5]])
    assert np.isnan(rates[2]).all()  # label 2 is never true
    # The diagonal of the rates is the per-label recall.
    report = per_emotion_report(np.array(y_true)[:, :2], np.array(y_pred, float)[:, :2], labels=["a", "b"])
    np.testing.assert_allclose(np.diag(rates)[:2], report["recall"])


# --- evaluate_predictions ------------------------------------------------------------


def test_evaluate_predictions_keys_types_and_consistency() -> None:
    y, prob = random_multilabel()
    rng = np.random.default_rng(3)
    affect_true = rng.uniform(-1, 1, (len(y), 2))
    affect_pred = np.clip(affect_true + rng.normal(0, 0.1, affect_true.shape), -1, 1)
    thresholds = tune_thresholds(y, prob)

    result = evaluate_predictions(y, prob, affect_true, affect_pred, thresholds=thresholds)
    assert tuple(result) == EVALUATION_KEYS
    assert all(type(value) is float for value in result.values())
    assert result["mAP"] == pytest.approx(mean_average_precision_score(y, prob))
    assert result["f1_macro"] == pytest.approx(multilabel_scores(y, binarize(prob, thresholds))["f1_macro"])
    assert result["mae_valence_1_10"] == pytest.approx(4.5 * result["mae_valence"])


def test_evaluate_predictions_rejects_mismatched_sample_counts() -> None:
    y, prob = random_multilabel(n=10)
    with pytest.raises(ValueError, match="affect_true has 9 samples but y_true has 10"):
        evaluate_predictions(y, prob, np.zeros((9, 2)), np.zeros((9, 2)))


def test_evaluate_predictions_keeps_masked_rows_in_the_emotion_metrics() -> None:
    y, prob = random_multilabel(n=40)
    rng = np.random.default_rng(5)
    affect_true = rng.uniform(-1, 1, (40, 2))
    affect_pred = np.clip(affect_true + rng.normal(0, 0.2, affect_true.shape), -1, 1)
    masked = affect_true.copy()
    masked[::4] = np.nan  # 10 rows with an invalid affect annotation

    result = evaluate_predictions(y, prob, masked, affect_pred)
    assert result["n_emotion"] == 40 and result["n_affect"] == 30
    assert result["mAP"] == pytest.approx(mean_average_precision_score(y, prob))
    keep = np.isfinite(masked).all(axis=1)
    assert result["mae_valence"] == pytest.approx(np.abs(affect_pred - affect_true)[keep, 0].mean())


# --- metrics by face visibility --------------------------------------------------------


def test_face_visibility_groups_and_their_checks() -> None:
    groups = face_visibility_groups([0.0, 0.4, 99.8, 100.0, np.nan])
    assert groups.tolist() == ["none", "partial", "partial", "whole", "unreadable"]
    with pytest.raises(ValueError, match=r"\[0, 100\] or be NaN, found \[-1.0, 150.0\]"):
        face_visibility_groups([-1.0, 50.0, 150.0])
    with pytest.raises(ValueError, match="1-D"):
        face_visibility_groups([[0.0, 100.0]])


def test_metrics_by_visibility_hand_computed() -> None:
    visibility = [100, 100, 100, 0, 0, 50, np.nan]
    y_true = [[1, 0], [0, 1], [1, 1], [1, 0], [0, 1], [0, 1], [1, 0]]
    y_prob = [[0.9, 0.2], [0.3, 0.8], [0.4, 0.6], [0.2, 0.7], [0.6, 0.4], [0.1, 0.9], [0.7, 0.3]]
    affect_true = [[0.0, 0.0], [0.2, 0.2], [np.nan, np.nan], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    affect_pred = [[0.2, 0.0], [0.2, 0.6], [0.9, 0.9], [-0.4, 0.0], [0.0, 0.2], [1.0, 1.0], [0.0, 0.0]]
    result = metrics_by_visibility(y_true, y_prob, affect_true, affect_pred, visibility, thresholds=0.5)

    assert set(result) == {f"{m}_face_{g}" for m in metrics.VISIBILITY_METRICS for g in metrics.VISIBILITY_GROUPS}
    assert [result[f"n_face_{g}"] for g in ("none", "partial", "whole", "unreadable")] == [2, 1, 3, 1]
    # Whole face (rows 0-2). Label 0: positives 0.9, 0.4, negative 0.3 -> AP 1. Label 1:
    # positives 0.8, 0.6, negative 0.2 -> AP 1. Predictions at 0.5: [1,0], [0,1], [0,1]:
    # label 0 F1 2/3 (TP 1, FN 1), label 1 F1 1.
    assert result["mAP_face_whole"] == pytest.approx(1.0)
    assert result["f1_macro_face_whole"] == pytest.approx((2 / 3 + 1) / 2)
    # Row 2 is masked: valence errors 0.2 and 0 on [-1, 1], times 4.5 on 1..10.
    assert result["mae_valence_1_10_face_whole"] == pytest.approx(4.5 * 0.1)
    assert result["mae_arousal_1_10_face_whole"] == pytest.approx(4.5 * 0.2)
    # No face (rows 3, 4): each label's positive scores below its negative -> AP 0.5;
    # predictions [0,1], [1,0] are both wrong -> F1 0.
    assert result["mAP_face_none"] == pytest.approx(0.5)
    assert result["f1_macro_face_none"] == 0.0
    assert result["mae_valence_1_10_face_none"] == pytest.approx(4.5 * 0.2)
    # Partial (row 5): only label 1 has a positive, so it alone is averaged.
    assert result["mAP_face_partial"] == pytest.approx(1.0)
    assert result["f1_macro_face_partial"] == pytest.approx(1.0)
    assert result["mae_valence_1_10_face_partial"] == pytest.approx(4.5)
    assert result["mAP_face_unreadable"] == pytest.approx(1.0)
    assert result["mae_valence_1_10_face_unreadable"] == 0.0


def test_metrics_by_visibility_empty_and_affect_less_groups_are_nan() -> None:
    result = metrics_by_visibility(
        [[1, 0], [0, 1]], [[0.9, 0.1], [0.2, 0.8]], [[np.nan, np.nan], [np.nan, np.nan]], [[0.0, 0.0]] * 2, [0.0, 0.0]
    )
    assert result["n_face_none"] == 2 and result["mAP_face_none"] == 1.0
    assert np.isnan(result["mae_valence_1_10_face_none"])
    for group in ("partial", "whole", "unreadable"):
        assert result[f"n_face_{group}"] == 0
        assert all(np.isnan(result[f"{m}_face_{group}"]) for m in metrics.VISIBILITY_METRICS if m != "n")


def test_metrics_by_visibility_uses_raw_values_and_checks_lengths() -> None:
    y_true, y_prob = [[1, 0], [0, 1]], [[0.9, 0.1], [0.2, 0.8]]
    low, high = (2.0, 2.0), (8.0, 8.0)
    # Target clipped to 1 (= 8 on the scale) but annotated 9: the raw error is 1.
    result = metrics_by_visibility(
        y_true,
        y_prob,
        [[1.0, 0.0], [0.0, 0.0]],
        [[1.0, 0.0], [0.0, 0.0]],
        [100.0, 100.0],
        low=low,
        high=high,
        raw_true=[[9.0, 5.0], [5.0, 5.0]],
    )
    assert result["mae_valence_1_10_face_whole"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="visibility has 3 samples but y_true has 2"):
        metrics_by_visibility(y_true, y_prob, [[0.0, 0.0]] * 2, [[0.0, 0.0]] * 2, [0.0, 50.0, 100.0])
