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


def test_the_variants_table_fits_100_columns_with_every_graph_name_whole_and_marks_what_misses_its_target():
    # The shape bench/variants.py measure() returns, for the longest names a row has (a timm name, int8-fused) and a
    # five-digit batch-8 time; before, a 100-column terminal showed "ort-cpu:…" for two graphs and cropped nothing else.
    from rich.console import Console

    from bench.__main__ import variants_table

    def row(graph, b1, b8, cosine, verified=True):
        return {"graph": graph, "ms": {1: b1, 8: b8}, "vs ort-cpu": {1: 600.0 / b1, 8: 6000.0 / b8},
                "vs torch-cpu": {1: 700.0 / b1, 8: 17000.0 / b8}, "pooled cosine": cosine, "verified": verified}

    rows = [row("torch-cpu", 700.0, 17000.0, None), row("ort-cpu", 600.0, 6000.0, 1.0),
            row("ort-cpu:int8-fused", 480.0, 3000.0, 0.9996), row("ort-cpu:fp16", 650.0, 16543.2, 0.9981, verified=False)]
    found = {"model": "vit_small_patch14_reg4_dinov2.lvd142m", "images": 16, "rows": rows}
    console = Console(record=True, width=100)
    console.print(variants_table(found, {"model": "AMD EPYC 7B13 64-Core Processor", "int8_features": ["avx2", "avx512_vnni"]}))
    text = console.export_text()
    table = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert table and all(line.rstrip()[-1] in "┓┃┩│┘" for line in table), "a column was cut off at 100 columns"
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 100
    cells = {line.split("│")[1].strip(): line for line in table if line.startswith("│")}
    assert set(cells) == {"torch-cpu", "ort-cpu", "ort-cpu:int8-fused", "ort-cpu:fp16"}
    assert "1.25x!" in cells["ort-cpu:int8-fused"] and "0.9981!" in cells["ort-cpu:fp16"] and "NO" in cells["ort-cpu:fp16"]
    assert "16543.2" in cells["ort-cpu:fp16"] and "!" not in cells["ort-cpu"] and "at least 1.5x ort-cpu" in text
