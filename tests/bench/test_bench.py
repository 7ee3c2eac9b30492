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
