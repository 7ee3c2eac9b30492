"""make bench: bad arguments are one line before any work, and a part that fails makes the exit code say so."""
from __future__ import annotations

import pytest

from bench.__main__ import main
from tests.helpers import call, one_line_error


@pytest.mark.parametrize("args,message", [
    (["nonexistent", "--only", "latency"], "model 'nonexistent' is not known"),
    (["--only", ""], "--only '': names no part"),
    (["--only", "speed"], "unknown part 'speed'"),
    (["--only", "floor", "--pairs", "0"], "--pairs must be at least 1"),
])
def test_bad_bench_arguments_are_one_line_and_exit_2(capsys, args, message):
    code, _, err = call(main, capsys, *args)
    assert code == 2 and message in one_line_error(err)


def test_a_variant_that_cannot_be_made_is_a_reason_and_exit_1(capsys, tmp_path):
    # No artifact under this root and no hub: the exporter step fails, and the bench says so in a line.
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out, err = call(main, capsys, "test_vit", "--only", "variants", "--artifacts", str(blocker / "artifacts"))
    assert code == 1 and "error: variants of test_vit:" in err and "Traceback" not in err


def test_the_sizes_part_fits_latency_against_tokens_and_refuses_a_fixed_size_artifact(artifacts_root):
    from bench import sizes
    from vitparity.errors import UserError

    rows = [{"backend": "a", "tokens": t, "p50_ms": 3.0 * t ** 2} for t in (100, 400, 1600)]
    rows += [{"backend": "b", "tokens": t, "p50_ms": 5.0 * t} for t in (100, 400, 1600)]
    assert abs(sizes.slope(rows, "a") - 2.0) < 1e-9 and abs(sizes.slope(rows, "b") - 1.0) < 1e-9
    assert sizes.slope(rows[:1], "a") is None
    with pytest.raises(UserError, match="takes 160x160 only; export it with python -m exporter test_vit --dynamic-size"):
        sizes.measure("test_vit", str(artifacts_root))
