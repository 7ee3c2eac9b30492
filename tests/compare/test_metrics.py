"""The metrics on hand-made arrays with known answers, and the verdict built on them."""
from __future__ import annotations

import math

import numpy as np
import pytest

from compare.metrics import cosine, max_abs_diff, mean_abs_diff, nonfinite_count, relative_error, worst_sample_cosine
from compare.run import compare_outputs
from compare.tolerances import TOLERANCES, tolerance_for


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


def _outputs(scale=1.0, tokens=None):
    rng = np.random.default_rng(0)
    pooled = rng.standard_normal((2, 8))
    tokens = rng.standard_normal((2, 5, 8)) if tokens is None else tokens
    return {"pooled": pooled * scale, "tokens": tokens * scale}


def test_half_percent_error_fails_the_same_host_class_but_passes_the_accelerator_class():
    want, got = _outputs(), _outputs(scale=1.005)
    strict = compare_outputs("ort-cpu", got, want, TOLERANCES["same-host"])
    loose = compare_outputs("torch-npu", got, want, TOLERANCES["accelerator"])
    assert [r.passed for r in strict] == [False, False]
    assert [r.passed for r in loose] == [True, True]
    assert strict[0].rel_error == pytest.approx(0.005)


def test_nan_and_shape_mismatch_fail():
    want = _outputs()
    nan = _outputs()
    nan["tokens"][0, 0, 0] = np.nan
    rows = compare_outputs("x", nan, want, TOLERANCES["accelerator"])
    assert rows[0].passed and not rows[1].passed and rows[1].nonfinite == 1
    wrong = _outputs(tokens=np.zeros((2, 4, 8)))
    rows = compare_outputs("x", wrong, want, TOLERANCES["accelerator"])
    assert not rows[1].shape_match and not rows[1].passed


def test_low_precision_uses_its_own_class_only_for_backends_that_follow_dtype():
    assert tolerance_for("accelerator", "fp16", True).name == "fp16"
    assert tolerance_for("accelerator", "bf16", True).name == "bf16"
    assert tolerance_for("same-host", "fp16", False).name == "same-host fp32"
    overridden = tolerance_for("same-host", "fp32", False, min_cosine=0.5, max_rel=0.2)
    assert (overridden.min_cosine, overridden.max_rel) == (0.5, 0.2)
