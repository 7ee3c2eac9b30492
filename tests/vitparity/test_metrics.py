"""The metrics on hand-made arrays with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vitparity.metrics import (
    cosine,
    max_abs_diff,
    mean_abs_diff,
    nonfinite_count,
    relative_error,
    worst_sample_cosine,
)


def test_orthogonal_vectors_have_cosine_zero():
    assert cosine([1.0, 0.0], [0.0, 3.0]) == 0.0


def test_scaled_vectors_have_cosine_one_and_relative_error_of_the_scale():
    a = np.array([1.0, -2.0, 3.0])
    assert cosine(2 * a, a) == pytest.approx(1.0)
    assert relative_error(1.01 * a, a) == pytest.approx(0.01)
    assert cosine(-a, a) == pytest.approx(-1.0)


def test_abs_diffs():
    assert max_abs_diff(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == 0.5
    assert mean_abs_diff(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == 0.25


def test_nan_poisons_the_metrics_and_is_counted():
    a = np.array([1.0, np.nan, np.inf, 2.0])
    assert nonfinite_count(a) == 2
    assert math.isnan(cosine(a, np.ones(4)))
    assert math.isnan(max_abs_diff(a, np.ones(4)))
    assert nonfinite_count(np.array([True, False])) == 0
    assert nonfinite_count(np.arange(3)) == 0


def test_edge_cases_empty_and_zero():
    assert cosine(np.array([]), np.array([])) == 1.0
    assert max_abs_diff(np.array([]), np.array([])) == 0.0
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine(np.zeros(3), np.ones(3)) == 0.0
    assert relative_error(np.zeros(2), np.zeros(2)) == 0.0
    assert relative_error(np.ones(2), np.zeros(2)) == math.inf


def test_worst_sample_cosine_finds_the_bad_sample_that_the_flat_cosine_hides():
    want = np.ones((4, 100))
    got = want.copy()
    got[3, :50] = -1.0  # one sample orthogonal to its reference
    assert worst_sample_cosine(got, want) == pytest.approx(0.0)
    assert cosine(got, want) > 0.7


def test_error_quantiles_are_over_every_element_with_the_max_last():
    from vitparity.metrics import error_quantiles

    a, b = np.zeros(101), np.arange(101.0)
    assert error_quantiles(a, b) == [50.0, 99.0, 100.0]
    assert error_quantiles(np.array([]), np.array([])) == [0.0, 0.0, 0.0]
    assert all(np.isnan(error_quantiles(np.array([np.nan]), np.array([1.0]))))


def test_loosest_passing_thresholds_round_towards_passing():
    from vitparity.metrics import loosest_passing

    cos, rel = loosest_passing(0.99713, 3.07e-3)
    assert cos == pytest.approx(0.9971) and rel == pytest.approx(3.1e-3)
    assert cos <= 0.99713 and rel >= 3.07e-3
    assert loosest_passing(1.0, 0.0) == (None, None)  # every threshold passes
    assert loosest_passing(float("nan"), float("nan")) == (None, None)


def test_per_sample_agrees_with_the_scalar_metrics_sample_by_sample_edge_cases_included():
    from vitparity.metrics import per_sample

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 4, 5)), rng.standard_normal((6, 4, 5))
    a[1], b[1] = 0.0, 0.0  # both zero: they agree
    a[2] = 0.0  # one zero
    b[3] = 0.0
    a[4, 0, 0] = np.nan
    found = per_sample(a, b)
    for i in range(6):
        for name, scalar in (("cosine", cosine), ("rel_error", relative_error), ("max_abs", max_abs_diff), ("mean_abs", mean_abs_diff)):
            want, got = scalar(a[i], b[i]), found[name][i]
            assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, rel=1e-12, abs=1e-15), (name, i)
        assert found["nonfinite"][i] == nonfinite_count(a[i])
    assert np.isnan(found["p50"][4]) and found["p99"][0] == pytest.approx(np.quantile(np.abs(a[0] - b[0]), 0.99))


def test_neighbour_agreement_counts_exact_ties_as_kept_and_sees_a_swap():
    from vitparity.metrics import neighbours

    rng = np.random.default_rng(1)
    base = rng.standard_normal((30, 8))
    assert neighbours(base, base.copy(), 5) == {"k": 5, "overlap": 1.0, "nearest_unchanged": 1.0}
    tied = np.concatenate([base, base[:1]])  # rows 0 and 30 are the same: each is the other's nearest, exactly
    assert neighbours(tied, tied[::1].copy(), 5)["overlap"] == 1.0
    shuffled = base.copy()
    shuffled[0], shuffled[1] = base[1], base[0]  # two rows swap embeddings: their neighbours change
    found = neighbours(base, shuffled, 5)
    assert found["overlap"] < 1.0 and found["nearest_unchanged"] < 1.0
    assert neighbours(base[:1], base[:1], 5)["k"] == 0
