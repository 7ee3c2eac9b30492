"""Rich tables built from a Report. Building only: the CLI does the printing."""
from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text

from .results import Report

PASS, FAIL = Text("PASS", style="bold green"), Text("FAIL", style="bold red")


def _num(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, fmt)


def header_table(report: Report) -> Table:
    table = Table(title=f"{report.model}: {report.timm_name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    input_ = report.input
    rows = [
        ("artifact", report.artifact),
        ("input", f"{input_['kind']} {input_['source']}, shape {tuple(input_['shape'])}"),
        ("weights", f"{report.weights_source} (sha256 {report.weights_sha256[:12]})"),
        ("reference", f"{report.reference}; accelerator precision {report.dtype}"),
    ]
    rows += [(key, str(value)) for key, value in report.versions.items() if value]
    for key, value in rows:
        table.add_row(key, value)
    for warning in report.warnings:
        table.add_row(Text("warning", style="yellow"), Text(warning, style="yellow"))
    return table


def backends_table(report: Report) -> Table:
    """Where and how each backend that produced outputs ran: device, dtype, precision, switches, node placement."""
    table = Table(title="Backends that ran (as read back from each runtime)", title_justify="left")
    for column in ("backend", "device", "dtype", "precision", "switches and provider options", "placement (nodes by provider)"):
        table.add_column(column)
    for status in report.backends:
        if status.status not in ("ran", "stored"):
            continue
        details = status.details
        table.add_row(
            status.name + (" (stored)" if status.status == "stored" else ""),
            " ".join(filter(None, [str(details.get("device", "-")), f"({details['device_name']})" if details.get("device_name") else ""])),
            str(details.get("dtype", "-")), str(details.get("precision", "fp32")),
            status.switches() or "-",
            status.placement(),
        )
    return table


def accuracy_table(report: Report) -> Table:
    table = Table(title=f"Accuracy against {report.reference}", title_justify="left")
    for column in ("backend", "output", "shape", "cosine", "worst-sample cos", "max abs", "mean abs", "rel err", "NaN/Inf", "thresholds / reason", "verdict"):
        table.add_column(column, justify="left" if column in ("backend", "output", "shape", "thresholds / reason", "verdict") else "right")
    for row in report.accuracy:
        shape = "x".join(map(str, row.shape)) + ("" if row.shape_match else f" != {'x'.join(map(str, row.reference_shape))}")
        table.add_row(
            row.backend, row.label, shape,
            _num(row.cosine, ".7f"), _num(row.worst_sample_cosine, ".7f"),
            _num(row.max_abs, ".2e"), _num(row.mean_abs, ".2e"), _num(row.rel_error, ".2e"),
            str(row.nonfinite),
            f"{row.tolerance}: cos>={row.min_cosine:g}, rel<={row.max_rel:g}",
            PASS if row.passed else FAIL,
        )
    for status in report.backends:
        if status.status in ("skipped", "error"):
            verdict = Text("SKIPPED", style="yellow") if status.status == "skipped" else FAIL
            table.add_row(status.name, "-", "-", *[""] * 6, Text(status.reason, style="yellow"), verdict)
    return table


def latency_table(report: Report) -> Table:
    timed = [f"{s.name}: {s.details['timed']}" for s in report.backends if s.details.get("timed")]
    table = Table(title=f"Latency (ms per call; speed-up against {report.reference})", title_justify="left",
                  caption="Inside the clock: " + "; ".join(timed) if timed else None, caption_justify="left")
    variants = any(row.graph_speedup is not None for row in report.latency)
    columns = ("backend", "batch", "iters", "p50", "p90", "p99", "mean", "std", "min", "images/s", "speed-up") + (
        ("vs fp32 graph",) if variants else ())
    for column in columns:
        table.add_column(column, justify="left" if column == "backend" else "right")
    for row in report.latency:
        table.add_row(
            row.backend, str(row.batch), str(row.iters),
            _num(row.p50_ms, ".2f"), _num(row.p90_ms, ".2f"), _num(row.p99_ms, ".2f"),
            _num(row.mean_ms, ".2f"), _num(row.std_ms, ".2f"), _num(row.min_ms, ".2f"),
            _num(row.images_per_s, ".1f"), "-" if row.speedup is None else f"{row.speedup:.2f}x",
            *(("-" if row.graph_speedup is None else f"{row.graph_speedup:.2f}x",) if variants else ()),
        )
    return table


def layers_table(report: Report) -> Table:
    """Block by backend: cosine, max abs and relative error of every tap; the first failing cell in red."""
    backends = list(dict.fromkeys(row.backend for row in report.layers))
    local = " | with --replay, local: cos / rel err of the block on the reference's input" if any(
        r.local_rel_error is not None for r in report.layers) else ""
    table = Table(title=f"Per-block agreement against {report.reference} (accumulated: cos / max abs / rel err{local})",
                  title_justify="left")
    table.add_column("layer")
    for backend in backends:
        table.add_column(backend, justify="right")
    cells = {(r.backend, r.layer): r for r in report.layers}
    first_bad = {b: next((r.layer for r in report.layers if r.backend == b and not r.passed), None) for b in backends}
    for layer in dict.fromkeys(row.layer for row in report.layers):
        row = [layer]
        for backend in backends:
            cell = cells.get((backend, layer))
            if cell is None:
                row.append("-")
                continue
            text = f"{_num(cell.cosine, '.6f')} / {_num(cell.max_abs, '.1e')} / {_num(cell.rel_error, '.1e')}"
            if cell.local_rel_error is not None:  # --replay: the block's own error, on the reference's input
                text += f" | local {_num(cell.local_cosine, '.6f')} / {_num(cell.local_rel_error, '.1e')}"
            style = "bold red reverse" if first_bad[backend] == layer else ("red" if not cell.passed else "")
            row.append(Text(text, style=style))
        table.add_row(*row)
    return table


def parts_table(report: Report) -> Table:
    """--replay: the parts of the block each backend's own error is largest in, in the order they ran."""
    table = Table(title=f"Inside the block, on {report.reference}'s input to it (timm's module names)", title_justify="left")
    for column in ("backend", "block", "part", "cosine", "rel err", "max abs", "NaN/Inf", "verdict"):
        table.add_column(column, justify="right" if column in ("cosine", "rel err", "max abs", "NaN/Inf") else "left")
    first = {}
    for row in report.parts:
        if not row.passed:
            first.setdefault(row.backend, row.part)
    for row in report.parts:
        verdict = PASS if row.passed else FAIL
        table.add_row(row.backend, row.layer.replace("_", "s.", 1), Text(row.part, style="bold" if first.get(row.backend) == row.part else ""),
                      _num(row.cosine, ".6f"), _num(row.rel_error, ".2e"), _num(row.max_abs, ".1e"), str(row.nonfinite), verdict)
    return table


def overrides_text(overrides: dict) -> str:
    """How the user's thresholds replaced the classes, e.g. "thresholds overridden for every class: --min-cosine 0.9"."""
    if not overrides:
        return ""
    flags = ", ".join(f"--{key.replace('_', '-')} {value:g}" for key, value in overrides.items())
    return f"; thresholds overridden for every class, same-host fp32 included: {flags}"


def images_table(report: Report) -> Table:
    """--images: the distribution of each output's per-image agreement, and the worst image by name."""
    count = report.input.get("count", 0)
    speeds = "; ".join(f"{b.name}: {b.throughput(count)}" for b in report.backends if b.throughput(count))
    table = Table(title=f"Per image ({count} images; the verdict is judged on the worst)", title_justify="left",
                  caption=f"Each backend's own compute over the images: {speeds}" if speeds else None, caption_justify="left")
    for column in ("backend", "output", "worst cos", "p1 cos", "median cos", "median rel err", "worst rel err", "worst image (lowest cosine)"):
        table.add_column(column, justify="left" if column in ("backend", "output") or column.startswith("worst image") else "right")
    for row in report.accuracy:
        found = row.images
        if not found:
            continue
        table.add_row(row.backend, row.label, _num(found["cos_worst"], ".7f"), _num(found["cos_p1"], ".7f"),
                      _num(found["cos_median"], ".7f"), _num(found["rel_median"], ".2e"), _num(found["rel_worst"], ".2e"),
                      found["worst_image"])
    return table


def neighbours_table(report: Report) -> Table:
    """--images: whether each backend's embeddings keep the reference's nearest neighbours."""
    table = Table(title=f"Neighbour agreement of pooled embeddings with {report.reference} (by cosine)", title_justify="left")
    for column in ("backend", "k", "mean overlap@k", "nearest unchanged", "thresholds", "verdict"):
        table.add_column(column, justify="right" if column in ("k", "mean overlap@k", "nearest unchanged") else "left")
    for row in report.shown_neighbours:
        table.add_row(row.backend, str(row.k), _num(row.overlap, ".4f"), _num(row.nearest_unchanged, ".4f"),
                      f"{row.tolerance}: overlap>={row.min_overlap:g}, nearest>={row.min_nearest:g}",
                      row.note if row.passed is None else PASS if row.passed else FAIL)
    return table


def truth_table(report: Report) -> Table:
    """Each backend's error against the fp64 truth, and as a multiple of the reference's own error."""
    table = Table(title=f"Against the {report.truth[0].truth} truth (eager float64 on the CPU): error as a multiple of {report.reference}'s own",
                  title_justify="left")
    for column in ("backend", "output", "rel err vs truth", f"x {report.reference}"):
        table.add_column(column, justify="left" if column in ("backend", "output") else "right")
    for row in report.truth:
        table.add_row(row.backend, row.output, _num(row.rel_error, ".2e"), "-" if row.ratio is None else f"{row.ratio:.2f}x")
    return table


def verdict_text(report: Report) -> Text:
    """The verdict line, read from report.verdict (never judged here)."""
    judged = report.verdict
    skipped = f"; not run here: {', '.join(judged.skipped)}" if judged.skipped else ""
    if judged.status == "NOT COMPARED":
        text, style = f"{report.model}: NOT COMPARED (only the reference {report.reference} ran{skipped})", "bold yellow"
    elif judged.status == "PASS":
        verb = "agrees" if len(judged.compared) == 1 else "agree"
        text, style = f"{report.model}: PASS ({', '.join(judged.compared)} {verb} with {report.reference}{skipped})", "bold green"
    else:
        text, style = f"{report.model}: FAIL ({', '.join(judged.failed)} disagree with {report.reference})", "bold red"
    return Text(text + overrides_text(judged.overrides), style=style)


def render(report: Report) -> list:
    """Every renderable of a report, in the order they are printed."""
    parts = [header_table(report), backends_table(report), accuracy_table(report)]
    # How far every failing output is from passing (Polygraphy's "minimum required tolerance").
    parts += [Text(f"{r.backend} {r.label}: FAIL, {r.how_far()}", style="red") for r in report.accuracy if not r.passed]
    if report.from_folder:
        parts.append(images_table(report))
    if report.shown_neighbours:
        parts.append(neighbours_table(report))
    if report.truth:
        parts.append(truth_table(report))
    if report.layers:
        parts.append(layers_table(report))
        parts += [Text(line, style="bold yellow") for line in report.drift.values()]
    if report.parts:
        parts.append(parts_table(report))
    parts += [Text(f"{backend}: try: {line}", style="bold cyan") for backend, line in report.advice.items()]
    if report.latency:
        parts.append(latency_table(report))
    parts.append(verdict_text(report))
    return parts
