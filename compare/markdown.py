"""The Markdown validation report (`--report FILE`): environment, commands, accuracy, latency, drift, conclusions, charts."""
from __future__ import annotations

import io
import math
import re
import shlex
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np

from vitparity.artifact import write_atomic

from . import tables
from .results import BackendStatus, Report

# How numbers are printed (compare/tables.py): every printed number equals the JSON's rounded to this precision.
COSINE, ERROR, MS, RATE, SPEEDUP = tables.COSINE, tables.ERROR, tables.MS, tables.RATE, tables.SPEEDUP
PRECISION_NOTE = (
    "Cosines have 7 decimals; max abs, mean abs and relative errors have 3 significant digits; "
    "latencies are milliseconds per call (the whole batch) with 2 decimals; images/s has 1 decimal; "
    "speed-up is the reference's mean latency over this backend's at the same batch size, with 2 decimals. "
    "Thresholds are printed in full. Each printed number is the JSON's (`--json`) rounded to that precision."
)
LOG_SPAN = 20  # latency charts switch to a log y axis when the backends differ more than this factor
CHART_FLOOR = 1e-16  # 1 - cosine below float64 resolution is drawn here: a log axis has no zero
PLOT_HINT = "Charts not drawn: matplotlib is not installed (install the plot extra: `pip install -e '.[plot]'`)."
DEFAULT_ARTIFACTS = "artifacts"


def write(path: Path, reports: list[Report], command: str, make_line: str | None = None) -> list[Path]:
    """Write the report to `path` and, with matplotlib, its PNG charts beside it. Returns every path written.

    `command` is the `python -m compare ...` command line of this run, shown verbatim for reproduction;
    `make_line` the `make compare ...` line with the same effect, when there is one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drawn = draw_charts(reports)
    charts = None if drawn is None else {model: {} for model in drawn}
    written = []
    for model, pngs in (drawn or {}).items():
        for kind, data in pngs.items():
            chart = path.with_name(f"{path.stem}-{_slug(model)}-{kind}.png")
            write_atomic(chart, data)
            written.append(chart)
            charts[model][kind] = chart.name
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    # The document goes last, so its links never point at a chart that is not there yet.
    write_atomic(path, document(reports, command, charts, generated, make_line).encode("utf-8", "backslashreplace"))
    return [path, *written]


# ---------------------------------------------------------------------------------------------
# The document: pure functions from Reports to Markdown text.


def document(reports: list[Report], command: str, charts: dict | None = None, generated: str = "",
             make_line: str | None = None) -> str:
    """The whole report as Markdown.

    `charts` maps a model to {"latency" | "blocks": file name relative to the document};
    None means matplotlib was not available, and the document says so.
    """
    title = ", ".join(r.model for r in reports)
    lines = [f"# Validation report: {title}", "", overall_verdict(reports), ""]
    if generated:
        lines += [f"Generated {generated}.", ""]
    lines += ["## Reproduce", "", "```sh", *reproduce_commands(reports, command, make_line), "```", ""]
    for report in reports:
        # With one model the overall verdict above is that model's; no need to say it twice.
        lines += model_section(report, None if charts is None else charts.get(report.model, {}), with_verdict=len(reports) > 1)
    lines += ["## How the numbers are printed", "", PRECISION_NOTE, ""]
    return "\n".join(lines)


def model_section(report: Report, charts: dict | None, with_verdict: bool = True) -> list[str]:
    """One model's part of the report, from its heading to its conclusions."""
    lines = [f"## {report.model} (timm `{report.timm_name}`)", ""] + ([verdict(report), ""] if with_verdict else [])
    lines += ["### Environment", "", *table(("component", "version"), environment_rows(report)), ""]
    lines += [*from_data(tables.backends(report)), ""]
    lines += ["### Input, weights and reference", "", *table(("item", "value"), input_rows(report)), ""]
    lines += [f"- warning: {_inline(w)}" for w in report.warnings]
    lines += [""] if report.warnings else []
    lines += ["### Accuracy", "", f"Each output of each backend against `{report.reference}`.", ""]
    lines += [*(from_data(tables.accuracy(report)) if report.accuracy else ["No backend besides the reference produced outputs."]), ""]
    lines += [f"- {r.backend} {r.label}: {_inline(r.how_far())}" for r in report.accuracy] + [""] if report.accuracy else []
    if report.from_folder:
        lines += ["### Per image", "", f"{report.input.get('count')} images from `{_inline(str(report.input.get('source')))}`; "
                  f"each output is judged on the whole and on its worst image.", ""]
        lines += [*from_data(tables.per_image(report)), ""]
        skipped = report.input.get("skipped", [])
        lines += [f"Skipped {len(skipped)} files that are not readable images:", ""] if skipped else []
        lines += [f"- `{entry['path']}`: {_inline(entry['reason'])}" for entry in skipped] + ([""] if skipped else [])
        lines += _chart(charts, "images", f"{report.model} per-image cosine, CDF by backend")
    if report.shown_neighbours:
        lines += ["### Neighbour agreement", "",
                  f"The k nearest neighbours of each image by cosine of `pooled`, on `{report.reference}` and on each backend.", ""]
        lines += [*from_data(tables.neighbours(report)), ""]
    if report.truth:
        lines += [f"### Against the {report.truth[0].truth} truth", "",
                  f"Relative error of each backend against eager float64 on the CPU, and that error as a multiple of "
                  f"`{report.reference}`'s own (over 1x: less accurate than the fp32 CPU reference).", ""]
        lines += [*from_data(tables.truth(report)), ""]
    lines += ["### Latency and throughput", ""]
    if report.latency:
        lines += [*from_data(tables.latency(report)), ""]
        lines += _chart(charts, "latency", f"{report.model} latency and throughput by batch size")
    else:
        lines += ["Not measured (`--no-latency`).", ""]
    if report.layers:
        lines += ["### Per-block drift", ""]
        lines += [f"- {_inline(sentence)}" for sentence in report.drift.values()] + [""]
        lines += ["Bold: the figures of a block that fails its thresholds.", "", *from_data(tables.layers(report)), ""]
        lines += _chart(charts, "blocks", f"{report.model} cosine by block")
    if report.parts:
        lines += ["### Inside the block", "",
                  f"The block each backend's own error is largest in, run on `{report.reference}`'s input to it, part by "
                  f"part (timm's module names, in the order they ran), each judged by the backend's class.", ""]
        lines += [*from_data(tables.parts(report)), ""]
    if report.advice:
        lines += ["### What to try", ""] + [f"- {backend}: {_inline(line)}" for backend, line in report.advice.items()] + [""]
    lines += ["### Conclusions", ""] + [f"- {_inline(conclusion(report, s))}" for s in report.backends] + [""]
    return lines


def _chart(charts: dict | None, kind: str, alt: str) -> list[str]:
    if charts is None:
        return [PLOT_HINT, ""]
    if kind not in charts:
        return []
    return [f"![{alt}]({quote(charts[kind])})", ""]


def overall_verdict(reports: list[Report]) -> str:
    """One line for the whole document: the model's verdict, or how many models pass."""
    if len(reports) == 1:
        return verdict(reports[0])
    failed = [r.model for r in reports if r.verdict.status != "PASS"]
    passed = len(reports) - len(failed)
    summary = f"{passed} of {len(reports)} models pass"
    return f"**{'FAIL' if failed else 'PASS'}**: {summary}" + (f"; not passing: {', '.join(failed)}." if failed else ".")


def verdict(report: Report) -> str:
    """One line: PASS/FAIL/NOT COMPARED, read from report.verdict, what was compared and what was not."""
    from .render import overrides_text

    judged = report.verdict
    if judged.status == "FAIL":
        text = f"**FAIL**: {', '.join(judged.failed)} {_verb(judged.failed, 'disagree')} with {report.reference}"
    elif judged.status == "PASS":
        text = f"**PASS**: {', '.join(judged.compared)} {_verb(judged.compared, 'agree')} with {report.reference} within the thresholds"
    else:
        text = f"**NOT COMPARED**: only the reference {report.reference} ran"
    text += overrides_text(judged.overrides)
    # A PASS that skipped the NPU says nothing about the NPU; the verdict line must say so.
    return text + (f"; not run here: {', '.join(judged.skipped)}." if judged.skipped else ".")


def _verb(names: list, verb: str) -> str:
    return verb if len(names) > 1 else verb + "s"


def environment_rows(report: Report) -> list[tuple[str, str]]:
    """Library versions and devices. torch-npu and CANN always get a row, "not installed" or "-" when absent."""
    versions = report.versions
    # run._environment adds per-backend facts as "<backend> <fact>" keys (device_name, cann, cuda).
    per_backend = {key: value for key, value in versions.items() if " " in key}
    cann = sorted({str(value) for key, value in per_backend.items() if key.endswith(" cann") and value})
    rows = [
        ("python", versions.get("python")),
        ("torch", versions.get("torch")),
        ("torch-npu", versions.get("torch_npu") or "not installed"),
        ("CANN", ", ".join(cann)),
        ("timm", versions.get("timm")),
        ("onnx", versions.get("onnx")),
        ("onnxruntime", versions.get("onnxruntime")),
    ]
    shown = {"python", "torch", "torch_npu", "timm", "onnx", "onnxruntime"}
    rows += [(key, value) for key, value in versions.items() if key not in shown and key not in per_backend]
    rows += [(key.replace("device_name", "device"), value) for key, value in per_backend.items() if not key.endswith(" cann")]
    return [(label, str(value) if value else "-") for label, value in rows]


def input_rows(report: Report) -> list[tuple[str, str]]:
    """What went in (input, weights, artifact) and what it was compared against."""
    input_ = report.input
    return [
        ("input", f"{input_['kind']}: {input_['source']}"),
        ("input shape", f"{'x'.join(map(str, input_['shape']))} {input_.get('dtype', '')}".strip()),
        ("input sha256", f"`{input_.get('sha256', '-')}`"),
        ("weights", report.weights_source),
        ("weights sha256", f"`{report.weights_sha256}`"),
        ("artifact", f"`{report.artifact}`"),
        ("reference", f"{report.reference} (accelerators in {report.dtype})"),
    ]


def conclusion(report: Report, status: BackendStatus) -> str:
    """One line for one backend, e.g. "ort-cpu: PASS, max rel err 3.20e-07, min cosine 1.0000000, 1.08x the reference at batch 1"."""
    name = status.name
    if status.status in ("skipped", "error"):
        return f"{name}: {status.status} ({status.reason})"
    speed = _speed_summary(report, name)
    if name == report.reference and status.status == "ran":
        return f"{name}: the reference" + (f", {speed}" if speed else "")
    rows = [r for r in report.accuracy if r.backend == name]
    if not rows:
        return f"{name}: ran, but produced no compared output"
    failing = [r.label for r in rows if not r.passed]
    # The verdict is the one judge: a backend it failed on neighbour agreement alone is FAIL here too.
    failing += ["neighbour agreement" for r in report.neighbours if r.backend == name and r.passed is False]
    parts = [f"{name}: " + (f"FAIL ({', '.join(failing)})" if failing else "PASS")]
    parts.append(f"max rel err {tables.num(_worst(r.rel_error for r in rows), ERROR)}")
    parts.append(f"min cosine {tables.num(_worst((r.worst_sample_cosine for r in rows), lowest=True), COSINE)}")
    parts += [speed] if speed else []
    first_bad = next((r.layer for r in report.layers if r.backend == name and not r.passed), None)
    parts += [f"first failing layer {first_bad}"] if first_bad else []
    parts += ["stored results from another host"] if status.status == "stored" else []
    return ", ".join(parts)


def _speed_summary(report: Report, backend: str) -> str:
    """Speed-up (or, for the reference, p50 latency) at the smallest and the largest batch size."""
    rows = sorted((r for r in report.latency if r.backend == backend), key=lambda r: r.batch)
    if not rows:
        return ""
    ends = rows if len(rows) <= 2 else [rows[0], rows[-1]]
    if backend == report.reference:
        return ", ".join(f"p50 {tables.num(r.p50_ms, MS)} ms ({tables.num(r.images_per_s, RATE)} images/s) at batch {r.batch}" for r in ends)
    first, *rest = ends
    return ", ".join([f"{tables.ratio(first.speedup)} the reference at batch {first.batch}",
                      *(f"{tables.ratio(r.speedup)} at batch {r.batch}" for r in rest)])


def _worst(values, lowest: bool = False) -> float:
    """The largest (or lowest) value; NaN when any value is NaN, since a NaN metric is the worst there is."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan
    return min(values) if lowest else max(values)


# ---------------------------------------------------------------------------------------------
# Reproduction commands.


def reproduce_commands(reports: list[Report], command: str, make: str | None) -> list[str]:
    """The exact command of this run, then `make export` lines and `make` (the make compare line), when given."""
    lines = ["# this run", command]
    if make is None:  # not a command line the Makefile can express; the exact one is enough
        return lines
    lines += ["# the same with make: export the artifacts, then compare"]
    for report in reports:
        root = str(Path(report.artifact).parent)
        variables = [f"MODEL={shlex.quote(report.model)}"]
        variables += [] if root == DEFAULT_ARTIFACTS else [make_variable("ARTIFACTS", root)]
        args = export_args(report.weights_source)
        variables += [make_variable("ARGS", *args)] if args else []
        lines.append(" ".join(["make export", *variables]))
    return lines + [make]


def export_args(weights_source: str) -> list[str]:
    """Exporter flags that rebuild the weights named by a manifest's weights_source (see exporter/weights.py)."""
    kind, _, rest = weights_source.partition(" ")
    if kind == "random-init":
        seed = re.search(r"seed (\d+)", rest)
        return ["--weights", "random"] + (["--seed", seed.group(1)] if seed and seed.group(1) != "0" else [])
    if kind == "file":
        return ["--weights", rest]
    return []  # hf-cache or hub: the exporter's default ("auto") finds the same weights


def make_variable(name: str, *words: str) -> str:
    """`NAME=value` for a make command line, quoted for the shell that runs make. ARGS is quoted twice: the
    recipe's shell reads it as shell text. The path variables reach the recipe as data (the Makefile's
    PATH_VARIABLES), so they are quoted once, whatever they hold."""
    if name == "ARGS":
        return f"{name}={shlex.quote(shlex.join(words))}"
    return f"{name}={shlex.quote(' '.join(words))}"


# ---------------------------------------------------------------------------------------------
# Markdown helpers.


def from_data(data: tables.Table) -> list[str]:
    """One of compare/tables.py's tables as Markdown: a failing verdict and every marked cell in bold, numbers
    right-aligned, the caption under it."""
    def cell(row: int, column: int, text: str) -> str:
        if data.columns[column] == tables.VERDICT:
            return _passfail(text == "PASS") if text in ("PASS", "FAIL") else text
        return f"**{text}**" if (row, column) in data.marks else text

    rows = [[cell(r, c, text) for c, text in enumerate(row)] for r, row in enumerate(data.rows)]
    align = ["---:" if data.numeric(column) else "---" for column in range(len(data.columns))]
    return table(data.columns, rows, align) + (["", _inline(data.caption)] if data.caption else [])


def table(header, rows, align: list[str] | None = None) -> list[str]:
    """A GitHub-flavoured Markdown table; numeric-looking columns are right-aligned unless `align` says."""
    rows = [[_cell(c) for c in row] for row in rows]
    if align is None:
        shown = tables.Table("", tuple(header), [tuple(row) for row in rows])
        align = ["---:" if shown.numeric(column) else "---" for column in range(len(header))]
    return [_row(header), _row(align)] + [_row(row) for row in rows]


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(value) -> str:
    return _inline(str(value)).replace("|", "\\|")


def _inline(text: str) -> str:
    return " ".join(str(text).split())  # a newline would end the table row or the list item


def _passfail(passed: bool) -> str:
    return "PASS" if passed else "**FAIL**"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# ---------------------------------------------------------------------------------------------
# Charts (the optional `plot` extra).


def draw_charts(reports: list[Report]) -> dict[str, dict[str, bytes]] | None:
    """PNG bytes by model and kind ("latency", and "blocks" with --layers); None without matplotlib."""
    try:
        import matplotlib  # noqa: F401 - optional: the plot extra
    except ImportError:
        return None
    charts = {}
    for report in reports:
        pngs = {}
        if report.latency:
            pngs["latency"] = latency_chart(report)
        if report.layers:
            pngs["blocks"] = blocks_chart(report)
        if report.from_folder and report.per_image:
            pngs["images"] = images_chart(report)
        charts[report.model] = pngs
    return charts


def images_chart(report: Report) -> bytes:
    """The CDF of per-image 1 - cosine of `pooled` and `tokens`, one line per backend (log x: lower is closer)."""
    figure = _figure(9, 3.6)
    axes = figure.subplots(1, 2, sharey=True)
    for axis, output in zip(axes, ("pooled", "tokens")):
        for backend, found in report.per_image.items():
            values = np.sort(np.maximum(1.0 - np.asarray(found.get(output, {}).get("cosine", []), dtype=float), CHART_FLOOR))
            if values.size:
                axis.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=backend)
        axis.set_xscale("log")
        axis.set(xlabel=f"1 - cosine of {output} (log; floor {CHART_FLOOR:g})", title=f"{output}: share of images at or below")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("share of images")
    axes[0].legend(fontsize="small")
    return _png(figure)


def _figure(width: float, height: float):
    # A Figure on its own Agg canvas: no pyplot, so no global backend switch and no GUI in a headless run.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _name(report: Report) -> str:
    return report.model if report.model == report.timm_name else f"{report.model} ({report.timm_name})"


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def latency_chart(report: Report) -> bytes:
    """p50 latency (with a bar up to p90) and throughput against batch size, one line per backend."""
    figure = _figure(11, 4.2)
    ms_axis, rate_axis = figure.subplots(1, 2)
    for backend in dict.fromkeys(r.backend for r in report.latency):
        rows = sorted((r for r in report.latency if r.backend == backend), key=lambda r: r.batch)
        batches = [r.batch for r in rows]
        upper = [r.p90_ms - r.p50_ms for r in rows]
        ms_axis.errorbar(batches, [r.p50_ms for r in rows], yerr=[[0] * len(rows), upper], marker="o", capsize=3, label=backend)
        rate_axis.plot(batches, [r.images_per_s for r in rows], marker="o", label=backend)
    batches = sorted({r.batch for r in report.latency})
    for axis, label, title in (
        (ms_axis, "ms per call (whole batch)", "latency: p50, bar up to p90"),
        (rate_axis, "images/s", "throughput"),
    ):
        if len(batches) > 1:
            axis.set_xscale("log", base=2)  # batch sizes usually double
        axis.set_xticks(batches, [str(b) for b in batches])
        lows, highs = axis.dataLim.intervaly
        if lows > 0 and highs / lows > LOG_SPAN:
            axis.set_yscale("log")  # an NPU 30x faster than the CPU would be a flat line at zero otherwise
        else:
            axis.set_ylim(0, highs * 1.1)  # from zero, with room above the highest marker
        axis.minorticks_off()
        axis.set(xlabel="batch size", ylabel=label, title=title)
        axis.grid(True, alpha=0.3)
    ms_axis.legend()
    figure.suptitle(f"{_name(report)}: latency and throughput by batch size")
    return _png(figure)


def blocks_chart(report: Report) -> bytes:
    """Cosine by block for each backend, drawn as 1 - cosine on a log axis; failing blocks marked."""
    layers = list(dict.fromkeys(r.layer for r in report.layers))
    position = {layer: i for i, layer in enumerate(layers)}
    figure = _figure(max(6.0, 0.45 * len(layers) + 2.5), 4.5)
    axis = figure.subplots()
    failing_labelled = False
    for backend in dict.fromkeys(r.backend for r in report.layers):
        rows = [r for r in report.layers if r.backend == backend]
        # Cosines sit within 1e-6 of 1, where a linear axis shows one flat line; 1 - cosine on a log axis shows the drift.
        xs = [position[r.layer] for r in rows]
        ys = [max(1.0 - r.cosine, CHART_FLOOR) for r in rows]
        axis.plot(xs, ys, marker="o", markersize=4, label=backend)
        bad = [(x, y) for x, y, r in zip(xs, ys, rows) if not r.passed]
        if bad:
            axis.scatter(*zip(*bad), marker="x", s=80, color="red", zorder=3, label=None if failing_labelled else "fails its thresholds")
            failing_labelled = True
    # The thresholds anchor the log axis: without them a drift from 2e-13 to 3e-13 fills the chart.
    thresholds = {(r.tolerance, r.min_cosine) for r in report.accuracy if r.backend in {row.backend for row in report.layers}}
    for (name, min_cosine), style in zip(sorted(thresholds), ("--", ":", "-.")):
        axis.axhline(1.0 - min_cosine, color="gray", linestyle=style, label=f"threshold: {name}, cos >= {min_cosine!r}")
    axis.set_yscale("log")
    axis.set_xticks(range(len(layers)), layers, rotation=60, ha="right")
    axis.set(ylabel=f"1 - cosine (log; floor {CHART_FLOOR:g})", title=f"{report.model}: 1 - cosine by block against {report.reference} (lower is closer)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    return _png(figure)
