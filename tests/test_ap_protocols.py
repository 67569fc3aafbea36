"""The EMOTIC authors' 11-point AP beside scikit-learn's: hand-computed cases, an independent
loop implementation of the definition, and ``mAP`` left as it was."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import average_precision_score

from emonet.metrics import (
    mean_average_precision_score,
    mean_voc11_average_precision_score,
    resampled_average_precision,
    voc11_average_precision_score,
)


def loop_voc11(y_true, y_score) -> float:
    """The definition read literally: rank (ties: negatives first), precision and recall at
    every rank, mean over t = 0, 0.1, ..., 1 of the best precision at a recall >= t."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=float)
    order = sorted(range(len(y_true)), key=lambda i: (-y_score[i], y_true[i]))
    n_pos = int(sum(y_true))
    points = []
    hits = 0
    for rank, i in enumerate(order, start=1):
        hits += int(y_true[i])
        points.append((hits / rank, hits / n_pos))
    total = 0.0
    for step in range(11):
        reached = [precision for precision, recall in points if recall >= step / 10]
        total += max(reached) if reached else 0.0
    return total / 11


@pytest.mark.parametrize(
    ("y_true", "y_score", "expected"),
    [
        # P/R after each rank: (1, .5) (.5, .5) (2/3, 1) (.5, 1): levels 0-.5 -> 1, .6-1 -> 2/3.
        ([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], (6 * 1 + 5 * 2 / 3) / 11),
        ([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1], 1.0),  # perfect ranking
        ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.5),  # inverted: (1/3, .5) then (.5, 1)
        ([0, 1, 0, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.5], 0.5),  # a single positive at rank 2
        ([0, 0, 0, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.5], 0.2),  # ... at the last rank
        # Ties: the run {.5: one positive, two negatives} is one threshold, read after the
        # whole run: (1, .5) then (2/4, 1).
        ([1, 0, 0, 1], [0.9, 0.5, 0.5, 0.5], (6 * 1 + 5 * 0.5) / 11),
        ([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5], 0.5),  # every score tied: one point (.5, 1)
    ],
)
def test_voc11_hand_computed(y_true, y_score, expected):
    assert voc11_average_precision_score(y_true, y_score) == pytest.approx(expected, abs=1e-12)


def test_voc11_ties_are_the_lowest_ordering_and_do_not_depend_on_row_order():
    y_true = np.array([1, 0, 0, 1, 0, 1])
    y_score = np.array([0.9, 0.5, 0.5, 0.5, 0.2, 0.2])
    ours = voc11_average_precision_score(y_true, y_score)
    # The authors' unstable sort may put the tied rows in any order: every order gives at
    # least ours, and negatives first gives exactly ours.
    by_order = []
    for permutation in itertools.permutations(range(len(y_true))):
        by_order.append(voc11_average_precision_score(y_true[list(permutation)], y_score[list(permutation)]))
    assert np.allclose(by_order, ours)  # the result does not depend on the rows' order
    tied_orders = []
    for first_block in itertools.permutations([1, 2, 3]):
        for second_block in itertools.permutations([4, 5]):
            ranking = [0, *first_block, *second_block]
            y_ranked = y_true[ranking]
            # Distinct scores in that ranking reproduce one tie order of the authors' sort.
            tied_orders.append(voc11_average_precision_score(y_ranked, -np.arange(len(ranking), dtype=float)))
    assert min(tied_orders) == pytest.approx(ours)
    assert max(tied_orders) > ours


def test_voc11_agrees_with_the_loop_definition_on_random_data():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 80))
        y_true = (rng.random(n) < rng.uniform(0.05, 0.7)).astype(int)
        if y_true.sum() == 0:
            y_true[rng.integers(n)] = 1
        # Rounded scores give many ties; unrounded ones none.
        y_score = rng.random(n) if trial % 2 else np.round(rng.random(n), int(rng.integers(1, 3)))
        assert abs(voc11_average_precision_score(y_true, y_score) - loop_voc11(y_true, y_score)) < 1e-9


def test_voc11_without_a_positive_is_nan_and_warns():
    with pytest.warns(UndefinedMetricWarning, match="no positive"):
        assert np.isnan(voc11_average_precision_score([0, 0, 0], [0.2, 0.5, 0.1]))


def test_mean_voc11_leaves_out_labels_without_a_positive():
    y_true = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1], [0, 0, 0]])
    y_prob = np.array([[0.9, 0.1, 0.2], [0.3, 0.4, 0.8], [0.6, 0.2, 0.3], [0.2, 0.3, 0.6]])
    with pytest.warns(UndefinedMetricWarning, match="label_1"):
        score = mean_voc11_average_precision_score(y_true, y_prob)
    expected = np.mean([loop_voc11(y_true[:, 0], y_prob[:, 0]), loop_voc11(y_true[:, 2], y_prob[:, 2])])
    assert score == pytest.approx(expected)
    with pytest.raises(ValueError, match="none of the 2 labels"):
        mean_voc11_average_precision_score([[0, 0], [0, 0]], [[0.1, 0.2], [0.3, 0.4]])


def test_map_is_unchanged_and_differs_from_voc11_on_the_same_predictions():
    rng = np.random.default_rng(3)
    prevalence = np.linspace(0.02, 0.5, 26)
    y_true = (rng.random((500, 26)) < prevalence).astype(int)
    y_prob = np.clip(0.25 * y_true + rng.random((500, 26)), 0, 1)
    sklearn_map = np.mean([average_precision_score(y_true[:, j], y_prob[:, j]) for j in range(26)])
    assert mean_average_precision_score(y_true, y_prob) == sklearn_map  # exactly today's value
    voc11_map = mean_voc11_average_precision_score(y_true, y_prob)
    loop_map = np.mean([loop_voc11(y_true[:, j], y_prob[:, j]) for j in range(26)])
    assert abs(voc11_map - loop_map) < 1e-9
    assert voc11_map > sklearn_map  # at EMOTIC-like mAPs the 11-point AP is higher


def test_the_engine_matches_sklearn_with_weights_and_an_explicit_resample():
    rng = np.random.default_rng(5)
    n = 120
    y_true = (rng.random(n) < 0.2).astype(np.int64)
    y_score = np.round(rng.random(n), 2)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(6)])
    step, voc11 = resampled_average_precision(y_true, y_score, counts)
    for b in range(len(counts)):
        rows = np.repeat(np.arange(n), counts[b])
        if y_true[rows].sum() == 0:
            assert np.isnan(step[b]) and np.isnan(voc11[b])
            continue
        assert step[b] == pytest.approx(average_precision_score(y_true, y_score, sample_weight=counts[b]), abs=1e-12)
        assert step[b] == pytest.approx(average_precision_score(y_true[rows], y_score[rows]), abs=1e-12)
        assert voc11[b] == pytest.approx(loop_voc11(y_true[rows], y_score[rows]), abs=1e-12)


@pytest.mark.parametrize(
    ("y_true", "y_score", "match"),
    [
        ([[1, 0]], [[0.5, 0.2]], "must be 1-D"),
        ([1, 0, 2], [0.1, 0.2, 0.3], "only 0 and 1"),
        ([1, 0], [0.1, np.nan], "NaN or infinite"),
        ([1, 0, 1], [0.1, 0.2], "same shape"),
    ],
)
def test_voc11_rejects_bad_input(y_true, y_score, match):
    with warnings.catch_warnings(), pytest.raises(ValueError, match=match):
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        voc11_average_precision_score(y_true, y_score)
