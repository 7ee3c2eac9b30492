"""The Markdown validation report (`--report FILE`): environment, commands, accuracy, latency, drift, conclusions, charts."""
from __future__ import annotations

import math
import re
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from vitparity import registry
from vitparity.artifact import write_atomic

from . import tables
from .charts import draw_charts
from .reproduce import reproduce_commands
from .results import BackendStatus, Report

# How numbers are printed (compare/tables.py): every printed number equals the JSON's rounded to this precision.
COSINE, ERROR, MS, RATE = tables.COSINE, tables.ERROR, tables.MS, tables.RATE
PRECISION_NOTE = (
    "Cosines have 7 decimals; max abs, mean abs and relative errors have 3 significant digits; "
    "latencies are milliseconds per call (the whole batch) with 2 decimals; images/s has 1 decimal; "
    "speed-up is the reference's mean latency over this backend's at the same batch size, with 2 decimals. "
    "Thresholds are printed in full. Each printed number is the JSON's (`--json`) rounded to that precision."
)
PLOT_HINT = "Charts not drawn: matplotlib is not installed (install the plot extra: `pip install -e '.[plot]'`)."


def write(path: Path, reports: list[Report], command: str, make_line: str | None = None,
          errors: dict[str, str] | None = None) -> list[Path]:
    """Write the report to `path` and, with matplotlib, its PNG charts beside it. Returns every path written.

    `command` is the `python -m compare ...` command line of this run, shown verbatim for reproduction;
    `make_line` the `make compare ...` line with the same effect, when there is one; `errors` the models that
    could not be compared, with why.
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
    write_atomic(path, document(reports, command, charts, generated, make_line, errors).encode("utf-8", "backslashreplace"))
    return [path, *written]


# ---------------------------------------------------------------------------------------------
# The document: pure functions from Reports to Markdown text.


def document(reports: list[Report], command: str, charts: dict | None = None, generated: str = "",
             make_line: str | None = None, errors: dict[str, str] | None = None) -> str:
    """The whole report as Markdown.

    `charts` maps a model to {"latency" | "blocks": file name relative to the document};
    None means matplotlib was not available, and the document says so.
    """
    errors = errors or {}
    title = ", ".join([*(r.model for r in reports), *errors])
    lines = [f"# Validation report: {title}", "", overall_verdict(reports, errors), ""]
    lines += [f"- **NOT COMPARED** {model}: {_inline(why)}" for model, why in errors.items()] + ([""] if errors else [])
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
    kwargs = f", `{registry.kwargs_label(report.model_kwargs)}`" if report.model_kwargs else ""
    lines = [f"## {report.model} (timm `{report.timm_name}`{kwargs})", ""] + ([verdict(report), ""] if with_verdict else [])
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
    if report.stability:
        lines += ["### Against itself", "", "Each backend's batch run twice, and its first item alone against the same "
                  "item among 3 other inputs at each position and among its own copies (`--stability`).", ""]
        lines += [*from_data(tables.stability(report)), ""]
        lines += [f"- {_inline(line)}" for line in tables.stability_lines(report)] + [""]
    if report.hunt:
        lines += ["### The worst input", "", "Each backend's worst input among the folder's images and their seeded "
                  "variations (`--hunt`), and the command that reproduces it.", ""]
        lines += [*from_data(tables.hunt(report)), ""]
        lines += [f"- {w.backend}: `{w.command}`" for w in report.hunt] + [""]
    if report.resample:
        lines += ["### Position-embedding resample", "", f"- {_inline(tables.resample_line(report))}", ""]
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


def overall_verdict(reports: list[Report], errors: dict | None = None) -> str:
    """One line for the whole document: the model's verdict, or how many models pass."""
    if len(reports) == 1 and not errors:
        return verdict(reports[0])
    failed = [r.model for r in reports if r.verdict.status != "PASS"] + list(errors or {})
    passed = len(reports) + len(errors or {}) - len(failed)
    summary = f"{passed} of {len(reports) + len(errors or {})} models pass"
    return f"**{'FAIL' if failed else 'PASS'}**: {summary}" + (f"; not passing: {', '.join(failed)}." if failed else ".")


def verdict(report: Report) -> str:
    """One line: PASS/FAIL/NOT COMPARED, read from report.verdict, what was compared and what was not."""
    from .render import overrides_text, random_text

    judged = report.verdict
    if judged.status == "FAIL":
        text = f"**FAIL**: {', '.join(judged.failed)} {_verb(judged.failed, 'disagree')} with {report.reference}"
    elif judged.status == "PASS":
        text = f"**PASS**: {', '.join(judged.compared)} {_verb(judged.compared, 'agree')} with {report.reference} within the thresholds"
    elif report.devices_not_run:
        text = "**NOT COMPARED**: " + " ".join(report.devices_not_run.values())
    else:
        text = f"**NOT COMPARED**: only the reference {report.reference} ran"
    text += overrides_text(judged.overrides) + random_text(report)
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
# Markdown helpers.


from_data = tables.markdown_table  # the core's drawing (vitparity/tables.py)
table = tables.markdown
_inline = tables.inline


def _passfail(passed: bool) -> str:
    return "PASS" if passed else "**FAIL**"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
