"""The Markdown validation report: its sections, numbers equal to the JSON's, commands, charts and drift."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import shlex
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest

from compare import markdown
from compare.cli import main, parse
from compare.plan import CompareOptions
from compare.results import LayerComparison
from compare.run import compare
from tests.helpers import TINY, SecondOrtCpu, has_row, make_argv, runnable, shared

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = (
    "## Reproduce", "### Environment", "### Input, weights and reference", "### Accuracy",
    "### Latency and throughput", "### Conclusions", "## How the numbers are printed",
)
# Markdown column -> JSON field, for every number the tables print.
ACCURACY_NUMBERS = {
    "cosine": "cosine", "worst-sample cosine": "worst_sample_cosine", "max abs": "max_abs",
    "mean abs": "mean_abs", "rel err": "rel_error",
}
LATENCY_NUMBERS = {
    "p50 ms": "p50_ms", "p90 ms": "p90_ms", "p99 ms": "p99_ms", "mean ms": "mean_ms", "std ms": "std_ms",
    "images/s": "images_per_s", "speed-up": "speedup",
}
# The documented formats: cosine with 7 decimals, errors with 3 significant digits, ms with 2 decimals.
COSINE_TEXT, ERROR_TEXT, MS_TEXT = r"\d\.\d{7}|nan", r"\d\.\d\de[-+]\d+|nan|inf", r"\d+\.\d\d"
FORMATS = {
    "cosine": COSINE_TEXT, "worst-sample cosine": COSINE_TEXT,
    **dict.fromkeys(("max abs", "mean abs", "rel err"), ERROR_TEXT),
    **dict.fromkeys(("p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms"), MS_TEXT),
    "images/s": r"\d+\.\d", "speed-up": r"\d+\.\d\dx",
}


# ---------------------------------------------------------------------------------------------
# Helpers: run the CLI, read the Markdown back.


def run_cli(artifacts_root: Path, out: Path, *extra: str, models=(TINY,)) -> tuple[list[str], str, dict]:
    """`python -m compare` in-process with --json and --report; returns (argv, markdown, json)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "report.md"
    argv = [
        *models, "--artifacts", str(artifacts_root), "--iters", "2", "--warmup", "0",
        "--json", str(json_path), "--report", str(md_path), *extra,
    ]
    code = main(argv)
    results = json.loads(json_path.read_text())
    assert code == max(r["exit_code"] for r in results["reports"])
    return argv, md_path.read_text(), results


def section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = len(heading.split(" ", 1)[0])
    lines = text.splitlines()
    start = lines.index(heading) + 1
    in_code = False
    for end in range(start, len(lines)):
        in_code ^= lines[end].startswith("```")  # a "# comment" in a shell block is no heading
        if not in_code and re.match(rf"#{{1,{level}}} ", lines[end]):
            return "\n".join(lines[start:end])
    return "\n".join(lines[start:])


def table(text: str, index: int = 0) -> list[dict[str, str]]:
    """The `index`-th Markdown table in `text`, as rows of {column: cell}."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
        elif current:
            blocks.append(current)
            current = []
    header, _separator, *rows = blocks[index]
    return [dict(zip(header, row)) for row in rows]


def conclusions(text: str) -> dict[str, str]:
    lines = section(text, "### Conclusions").splitlines()
    return {line[2:].split(":", 1)[0]: line[2:] for line in lines if line.startswith("- ")}


def assert_printed(text: str, value) -> None:
    """`text` is `value` rounded to the precision `text` shows (half a unit in its last digit)."""
    text = text.strip("*").removesuffix("x")
    if value is None:
        assert text == "-"
        return
    if math.isnan(value):
        assert text == "nan"
        return
    mantissa, _, exponent = text.lower().partition("e")
    half_unit = 0.5 * 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))
    assert abs(float(text) - value) <= half_unit * (1 + 1e-9), f"{text} is not {value} at its printed precision"


def assert_documented_format(row: dict[str, str]) -> None:
    for column, pattern in FORMATS.items():
        if column in row:
            assert re.fullmatch(pattern, row[column].strip("*")), f"{column} {row[column]!r} is not in the documented format"


def links(text: str, folder: Path) -> list[Path]:
    """The files the Markdown's images point at."""
    return [folder / unquote(target) for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)]


def assert_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100


def dry_run(target: str, make_line: str, module: str, tmp_path: Path) -> list[str]:
    """What the recipe of `make_line` gives `python -m module`, as the shell really passes it (make_argv)."""
    words = shlex.split(make_line)
    assert words[:2] == ["make", target]
    return next(argv[2:] for argv in make_argv(tmp_path, target, *words[2:]) if argv[:2] == ["-m", module])


# ---------------------------------------------------------------------------------------------
# Fixtures: one real comparison through the CLI, and one Report object for the pure functions.


@pytest.fixture(scope="module")
def tiny_run(artifacts_root, tmp_path_factory, worker_id):
    """The tiny ViT on torch-cpu, ort-cpu and torch-npu (skipped where torch_npu is absent), batches 1 and 2; run once
    for both xdist workers. `out` holds only what the CLI wrote."""
    def make(folder):
        argv, _, _ = run_cli(artifacts_root, folder / "out", "--backends", "torch-cpu,ort-cpu,torch-npu", "--batch-sizes", "1,2")
        (folder / "argv.json").write_text(json.dumps(argv))

    folder = shared(tmp_path_factory, worker_id, "report", make)
    out = folder / "out"
    return json.loads((folder / "argv.json").read_text()), (out / "report.md").read_text(), \
        json.loads((out / "results.json").read_text())["reports"][0], out


@pytest.fixture(scope="module")
def tiny_report(artifacts_root):
    """A Report object for the pure functions: ort-cpu-2 against ort-cpu on a seeded batch (no torch process)."""
    from compare.backends import BACKENDS

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BACKENDS, SecondOrtCpu.name, SecondOrtCpu)
        report, _ = compare(TINY, CompareOptions(
            artifacts=str(artifacts_root), backends=("ort-cpu", SecondOrtCpu.name), reference="ort-cpu", input="random",
            warmup=0, iters=2, batch_sizes=(1, 2),
        ))
    return report


# ---------------------------------------------------------------------------------------------
# 1. Sections, and numbers equal to the JSON's.


def test_report_has_every_section_in_order(tiny_run):
    _, text, _, _ = tiny_run
    lines = text.splitlines()
    assert lines[0] == f"# Validation report: {TINY}"
    assert re.match(r"\*\*(PASS|FAIL)\*\*", lines[2]), "the verdict is the first line under the title"
    positions = [lines.index(heading) for heading in SECTIONS]
    assert positions == sorted(positions)
    assert "### Per-block drift" not in lines, "no drift section without --layers"


def test_reproduce_section_holds_the_exact_command(tiny_run):
    argv, text, _, _ = tiny_run
    commands = section(text, "## Reproduce").splitlines()
    assert shlex.join(["python", "-m", "compare", *argv]) in commands


def test_make_compare_line_runs_the_same_comparison_as_the_command(tiny_run, tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    argv, text, _, _ = tiny_run
    make_line = next(line for line in section(text, "## Reproduce").splitlines() if line.startswith("make compare"))
    # the same options, and the target's own --if-missing (make compare exports a missing artifact first)
    assert vars(parse(dry_run("compare", make_line, "compare", tmp_path))) == vars(parse([*argv, "--if-missing"]))


def test_make_export_line_rebuilds_the_artifact_with_the_same_weights(tiny_run, artifacts_root, tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    from exporter.cli import parse as export_parse

    _, text, _, _ = tiny_run
    make_line = next(line for line in section(text, "## Reproduce").splitlines() if line.startswith("make export"))
    args = export_parse(dry_run("export", make_line, "exporter", tmp_path))
    assert (args.models, args.artifacts, args.weights, args.seed) == ([TINY], str(artifacts_root), "random", 0)


def test_environment_table_shows_the_json_versions_and_always_torch_npu_and_cann(tiny_run):
    _, text, report, _ = tiny_run
    rows = {row["component"]: row["version"] for row in table(section(text, "### Environment"))}
    versions = report["versions"]
    for key in ("python", "torch", "timm", "onnx", "onnxruntime"):
        assert rows[key] == versions[key]
    assert rows["torch-npu"] == (versions["torch_npu"] or "not installed")
    cann = [value for key, value in versions.items() if key.endswith(" cann") and value]
    assert rows["CANN"] == (", ".join(sorted(cann)) or "-")
    assert rows["torch-cpu device"] == versions["torch-cpu device_name"]


def test_input_section_names_the_input_weights_and_reference(tiny_run):
    _, text, report, _ = tiny_run
    rows = {row["item"]: row["value"] for row in table(section(text, "### Input, weights and reference"))}
    assert rows["input"] == f"{report['input']['kind']}: {report['input']['source']}"
    assert rows["input shape"].startswith("x".join(map(str, report["input"]["shape"])))
    assert rows["weights"] == report["weights_source"]
    assert rows["weights sha256"] == f"`{report['weights_sha256']}`"
    assert rows["reference"].startswith(report["reference"])


def _label(row: dict) -> str:
    """The output as the tables name it: pooled, tokens, tokens[cls]."""
    return row["output"] + (f"[{row['group']}]" if row["group"] else "")


def test_accuracy_table_numbers_equal_the_json_at_the_printed_precision(tiny_run):
    _, text, report, _ = tiny_run
    rows = {(row["backend"], row["output"]): row for row in table(section(text, "### Accuracy"))}
    assert set(rows) == {(r["backend"], _label(r)) for r in report["accuracy"]}
    for want in report["accuracy"]:
        got = rows[(want["backend"], _label(want))]
        assert_documented_format(got)
        for column, field in ACCURACY_NUMBERS.items():
            assert_printed(got[column], want[field])
        # Thresholds are printed in full, so they are exactly the JSON's.
        assert (float(got["min cosine"]), float(got["max rel"])) == (want["min_cosine"], want["max_rel"])
        assert got["tolerance"] == want["tolerance"]
        assert got["NaN/Inf"] == str(want["nonfinite"])
        assert got["verdict"].strip("*") == ("PASS" if want["passed"] else "FAIL")


def test_the_backends_table_gives_every_backend_its_status_and_a_skipped_ones_reason(tiny_run):
    _, text, report, _ = tiny_run
    rows = {row["backend"]: row for row in table(section(text, "### Environment"), 1)}
    assert list(rows) == [b["name"] for b in report["backends"]]
    for backend in report["backends"]:
        assert rows[backend["name"]]["status"] == backend["status"]
        if backend["status"] in ("skipped", "error"):  # a note in the cell, the reason once below the table
            note = rows[backend["name"]]["other settings or reason"]
            assert note.startswith("(") and f"{note} {' '.join(backend['reason'].split())}" in text, note
        else:  # plain settings only: never a dict, a list or a repr in a cell
            assert not set("{}[]'") & set(rows[backend["name"]]["other settings or reason"])
    assert any(b["status"] == "skipped" for b in report["backends"]) == ("torch-npu" not in runnable("torch-npu"))


def test_latency_table_numbers_equal_the_json_for_every_backend_and_batch(tiny_run):
    _, text, report, _ = tiny_run
    rows = {(row["backend"], int(row["batch"])): row for row in table(section(text, "### Latency and throughput"))}
    assert set(rows) == {(r["backend"], r["batch"]) for r in report["latency"]}
    assert {batch for _, batch in rows} == {1, 2}
    for want in report["latency"]:
        got = rows[(want["backend"], want["batch"])]
        assert_documented_format(got)
        for column, field in LATENCY_NUMBERS.items():
            assert_printed(got[column], want[field])
        assert (int(got["iters"]), int(got["warm-up"])) == (want["iters"], want["warmup"])


def test_conclusions_give_each_backend_one_line_with_numbers_from_the_json(tiny_run):
    _, text, report, _ = tiny_run
    lines = conclusions(text)
    assert list(lines) == [b["name"] for b in report["backends"]]
    for status in report["backends"]:
        if status["status"] == "skipped":
            assert lines[status["name"]] == f"{status['name']}: skipped ({status['reason']})"
    ort = lines["ort-cpu"]
    rows = [r for r in report["accuracy"] if r["backend"] == "ort-cpu"]
    assert ort.startswith("ort-cpu: PASS" if all(r["passed"] for r in rows) else "ort-cpu: FAIL")
    assert_printed(re.search(r"max rel err (\S+),", ort).group(1), max(r["rel_error"] for r in rows))
    batch_1 = next(r for r in report["latency"] if r["backend"] == "ort-cpu" and r["batch"] == 1)
    assert_printed(re.search(r"(\S+) the reference at batch 1", ort).group(1), batch_1["speedup"])
    assert lines["torch-cpu"].startswith("torch-cpu: the reference")


def test_a_failing_output_shows_fail_in_verdict_table_and_conclusion(artifacts_root, tmp_path):
    _, text, results = run_cli(artifacts_root, tmp_path, "--backends", "torch-cpu,ort-cpu", "--no-latency", "--max-rel", "1e-12")
    assert results["reports"][0]["exit_code"] == 1
    assert text.splitlines()[2] == ("**FAIL**: ort-cpu disagrees with torch-cpu; thresholds overridden for every class, "
                                    "same-host fp32 included: --max-rel 1e-12.")
    assert {row["verdict"] for row in table(section(text, "### Accuracy"))} == {"**FAIL**"}
    assert conclusions(text)["ort-cpu"].startswith("ort-cpu: FAIL (pooled, tokens, tokens[cls], tokens[patches])")
    assert "Not measured (`--no-latency`)." in section(text, "### Latency and throughput")


def test_one_document_holds_a_section_per_model(tiny_report, tmp_path):
    """Two models' reports (the tiny run's, and the same under another model name that fails) in one document:
    one section each, with its own accuracy numbers and chart, and an overall verdict that counts them."""
    failing = dataclasses.replace(tiny_report, model="other", timm_name="other_vit",
                                  accuracy=[dataclasses.replace(row, rel_error=row.rel_error * 3, passed=False)
                                            for row in tiny_report.accuracy])
    [path, *charts] = markdown.write(tmp_path / "report.md", [failing, tiny_report], "python -m compare other test_vit")
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == f"# Validation report: other, {TINY}"
    assert lines[2].startswith("**FAIL**: 1 of 2 models pass")
    for report in (failing, tiny_report):
        model_text = section(text, f"## {report.model} (timm `{report.timm_name}`)")
        assert model_text.splitlines()[1].startswith("**PASS**" if report.passed else "**FAIL**")
        rows = {(r["backend"], r["output"]): r for r in table(section(model_text, "### Accuracy"))}
        for want in report.accuracy:
            assert_printed(rows[(want.backend, want.label)]["rel err"], want.rel_error)
    if importlib.util.find_spec("matplotlib"):
        assert {chart.name for chart in charts} == {"report-other-latency.png", f"report-{TINY}-latency.png"}
        assert {path.name for path in links(text, tmp_path)} == {chart.name for chart in charts}


# ---------------------------------------------------------------------------------------------
# 2. Charts.


def test_charts_are_valid_pngs_linked_from_the_report(tiny_run):
    pytest.importorskip("matplotlib")
    _, text, _, out = tiny_run
    charts = links(text, out)
    assert [path.name for path in charts] == [f"report-{TINY}-latency.png"]
    for path in charts:
        assert path.stat().st_size > 0
        assert_png(path)
    # Atomic writes leave nothing else behind: no temporary files.
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", "results.json", *(p.name for p in charts)])


def test_write_returns_every_file_it_wrote(tiny_report, tmp_path):
    pytest.importorskip("matplotlib")
    written = markdown.write(tmp_path / "v.md", [tiny_report], "python -m compare test_vit")
    assert written == [tmp_path / "v.md", tmp_path / f"v-{TINY}-latency.png"]
    assert sorted(tmp_path.iterdir()) == sorted(written)


def test_without_matplotlib_the_document_says_how_to_get_charts(tiny_report):
    text = markdown.document([tiny_report], "python -m compare test_vit", charts=None)
    assert markdown.PLOT_HINT in section(text, "### Latency and throughput")
    assert "![" not in text


def test_a_nan_metric_prints_as_nan_and_makes_the_conclusion_worst(tiny_report):
    row = dataclasses.replace(tiny_report.accuracy[0], rel_error=math.nan, cosine=math.nan, passed=False)
    report = dataclasses.replace(tiny_report, accuracy=[row, *tiny_report.accuracy[1:]])
    text = markdown.document([report], "python -m compare test_vit", charts={})
    got = table(section(text, "### Accuracy"))[0]
    assert (got["cosine"], got["rel err"], got["verdict"]) == ("nan", "nan", "**FAIL**")
    assert f"{row.backend}: FAIL ({row.output}), max rel err nan" in conclusions(text)[row.backend]


# ---------------------------------------------------------------------------------------------
# 3. Per-block drift.


def with_layers(report):
    """`report` with hand-made layer rows: ort-cpu-2 drifts from block_1 on, the norm fails."""
    cosines = {"block_0": 0.99999999, "block_1": 0.9999123, "norm": 0.9981}
    rows = [
        LayerComparison(backend="ort-cpu-2", layer=layer, cosine=cos, max_abs=1e-3 * i, rel_error=(1 - cos) * 10,
                        nonfinite=0, passed=cos > 0.999)
        for i, (layer, cos) in enumerate(cosines.items())
    ]
    drift = {"ort-cpu-2": "ort-cpu-2: drift starts at norm (cos 0.9981, rel err 1.90e-02)"}
    return dataclasses.replace(report, layers=rows, drift=drift)


def test_layer_rows_give_a_drift_section_and_a_block_chart(tiny_report, tmp_path):
    report = with_layers(tiny_report)
    written = markdown.write(tmp_path / "r.md", [report], "python -m compare test_vit --layers")
    text = written[0].read_text()
    drift = section(text, "### Per-block drift")
    assert f"- {report.drift['ort-cpu-2']}" in drift.splitlines()
    rows = {row["layer"]: row for row in table(drift)}
    assert list(rows) == [r.layer for r in report.layers]
    for want in report.layers:
        got = rows[want.layer]
        assert_printed(got["ort-cpu-2 cosine"], want.cosine)
        assert_printed(got["ort-cpu-2 rel err"], want.rel_error)
        assert got["ort-cpu-2 cosine"].startswith("**") == (not want.passed), "failing blocks are bold"
    assert "first failing layer norm" in conclusions(text)["ort-cpu-2"]
    if importlib.util.find_spec("matplotlib"):
        charts = links(drift, tmp_path)
        assert [path.name for path in charts] == [f"r-{TINY}-blocks.png"]
        assert_png(charts[0])
        assert charts[0] in written


def test_the_terminal_and_the_report_draw_one_layers_table_with_the_first_failing_block_marked(tiny_report):
    from rich.console import Console

    from compare import render, tables

    report = with_layers(tiny_report)
    data = tables.layers(report)
    assert data.columns == ("layer", "ort-cpu-2 cosine", "ort-cpu-2 max abs", "ort-cpu-2 rel err")
    # norm is the only failing block, so the first: its three figures are marked FIRST, nothing else is marked.
    assert data.marks == {(2, column): tables.FIRST for column in (1, 2, 3)}
    console = Console(record=True, width=200)
    console.print(render.rich_table(data))
    terminal = console.export_text()
    markdown_rows = table("\n".join(markdown.from_data(data)))
    for row, printed in zip(data.rows, markdown_rows):
        assert has_row(terminal, *row)
        assert [cell.strip("*") for cell in printed.values()] == list(row)
        assert printed["ort-cpu-2 cosine"].startswith("**") == (row[0] == "norm")


def test_layers_flag_puts_the_json_drift_and_block_numbers_in_the_report(artifacts_root, tmp_path, ort_only):
    _, text, results = run_cli(artifacts_root, tmp_path, *ort_only, "--no-latency", "--layers")
    report = results["reports"][0]
    assert report["layers"], "--layers gave no layer rows"
    drift = section(text, "### Per-block drift")
    for sentence in report["drift"].values():
        assert f"- {sentence}" in drift.splitlines()
    rows = {row["layer"]: row for row in table(drift)}
    for want in report["layers"]:
        assert_printed(rows[want["layer"]][f"{want['backend']} cosine"], want["cosine"])
        assert_printed(rows[want["layer"]][f"{want['backend']} rel err"], want["rel_error"])
    if importlib.util.find_spec("matplotlib"):
        charts = links(drift, tmp_path)
        assert [path.name for path in charts] == [f"report-{TINY}-blocks.png"]
        assert_png(charts[0])


def test_a_backend_failing_only_on_neighbours_is_fail_in_every_line_of_the_report(tiny_report):
    """The verdict is the one judge: a neighbour row that fails makes the verdict, the JSON, the report's
    verdict line and its per-backend conclusion all say FAIL (the conclusion once said PASS from accuracy alone)."""
    from compare.results import NeighbourComparison

    assert all(row.passed for row in tiny_report.accuracy if row.backend == "ort-cpu-2")
    failing = NeighbourComparison(backend="ort-cpu-2", k=3, overlap=0.5, nearest_unchanged=0.5, tolerance="same-host fp32",
                                  min_overlap=1.0, min_nearest=1.0, passed=False)
    report = dataclasses.replace(tiny_report, neighbours=[failing])
    assert report.verdict.status == "FAIL" and report.to_dict()["verdict"] == "FAIL" and report.exit_code == 1
    text = markdown.document([report], "python -m compare test_vit")
    assert text.splitlines()[2].startswith("**FAIL**")
    [status] = [b for b in report.backends if b.name == "ort-cpu-2"]
    assert markdown.conclusion(report, status).startswith("ort-cpu-2: FAIL (neighbour agreement)")
    not_judged = dataclasses.replace(failing, passed=None, note="not judged: 1 image, neighbours need at least 2")
    assert dataclasses.replace(tiny_report, neighbours=[not_judged]).verdict.status == tiny_report.verdict.status


@pytest.mark.parametrize("replay", [False, True])
def test_many_backends_per_block_fit_100_columns_whole_in_the_terminal_and_one_table_in_the_report(tiny_report, replay):
    """Five backends' blocks (the fused graphs can be tapped too): tables of two backends (one with --replay), each
    within 100 columns with no figure cut short; the Markdown report keeps them in one table."""
    from rich.console import Console

    from compare import render, tables

    base = with_layers(tiny_report).layers
    names = ["ort-cpu", "ort-cpu:fused", "ort-cpu:int8", "ort-cpu:fp16", "ort-cpu:int8-fused"]
    rows = [dataclasses.replace(row, backend=name, **({"local_cosine": row.cosine, "local_rel_error": row.rel_error}
                                                      if replay else {}))
            for name in names for row in base]
    report = dataclasses.replace(tiny_report, layers=rows, drift={})
    groups = tables.layer_groups(report)
    assert [name for group in groups for name in group] == names and max(map(len, groups)) == (1 if replay else 2)
    console = Console(record=True, width=100)
    for part in render.render(report):
        console.print(part)
    terminal = console.export_text()
    assert max(len(line) for line in terminal.splitlines()) <= 100
    assert "…" not in terminal  # a header too long for its column folds (vitparity.tables.rich_table)
    for group in groups:
        data = tables.layers(report, group)
        for row in data.rows:
            assert has_row(terminal, *row)  # every figure whole, none cut to "…"
    assert len(table("\n".join(markdown.from_data(tables.layers(report))))[0]) == 1 + len(names) * (5 if replay else 3)
