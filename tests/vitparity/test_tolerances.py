"""The verdict: outputs against the reference, judged by the tolerance class of what really ran."""
from __future__ import annotations

import numpy as np
import pytest

from compare.judge import compare_outputs
from vitparity.tolerances import TOLERANCES, tolerance_for


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


def test_a_backend_is_judged_by_the_precision_it_really_ran_in():
    assert tolerance_for("accelerator", "fp16").name == "fp16"
    assert tolerance_for("accelerator", "bf16").name == "bf16"
    assert tolerance_for("accelerator", "fast-math").name == "fast-math fp32"
    assert tolerance_for("accelerator", "fp32").name == "accelerator fp32"
    assert tolerance_for("same-host", "fp32").name == "same-host fp32"
    overridden = tolerance_for("same-host", "fp32", min_cosine=0.5, max_rel=0.2)
    assert (overridden.min_cosine, overridden.max_rel) == (0.5, 0.2)


def test_the_judge_names_every_limit_that_failed_and_by_how_much():
    from vitparity.tolerances import TOLERANCES, verify_tolerance

    same = TOLERANCES["same-host"]
    assert same.judge(1.0, 0.0).passed and same.judge(0.99999, 1e-4).passed  # the limits themselves pass
    failed = same.judge(0.9999, 2e-4, nonfinite=3)
    assert not failed.passed and failed.failures == (
        "3 NaN/Inf values", "cosine 0.9999000 < 0.99999 (short by 9e-05)", "rel err 0.0002 > 0.0001 (2x the limit)")
    assert not same.judge(float("nan"), 0.0).passed and not same.judge(1.0, float("nan")).passed
    assert same.judge(1.0, 0.0, shape_match=False).reason == "the shapes differ"
    neighbours = TOLERANCES["int8"].judge_neighbours(0.85, 0.9)
    assert not neighbours.passed and neighbours.reason == "overlap@k 0.8500 < 0.9"
    verify = verify_tolerance(0.99999, 1e-4)
    assert verify.judge(1.0, max_abs=0.009, peak=90).passed
    assert verify.judge(1.0, max_abs=0.02, peak=90).reason == "max abs diff 0.02 > 0.009 = 0.0001 x peak 90"
