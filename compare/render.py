"""Rich tables built from a Report. Building only: the CLI does the printing."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text

from . import tables
from .results import Report

PASS, FAIL = Text("PASS", style="bold green"), Text("FAIL", style="bold red")


def rich_table(data: tables.Table) -> Table:
    """One of compare/tables.py's tables, drawn for the terminal: numbers right-aligned, verdicts in colour."""
    table = Table(title=data.title, title_justify="left", caption=data.caption or None, caption_justify="left")
    for index, column in enumerate(data.columns):
        table.add_column(column, justify="right" if data.numeric(index) else "left")
    verdicts = [i for i, column in enumerate(data.columns) if column == tables.VERDICT]
    for row in data.rows:
        table.add_row(*[{"PASS": PASS, "FAIL": FAIL}.get(cell, cell) if i in verdicts else cell for i, cell in enumerate(row)])
    return table


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
    """The accuracy table, and in the terminal a row under it for each backend that was skipped or broke."""
    table = rich_table(tables.accuracy(report))
    for status in report.backends:
        if status.status in ("skipped", "error"):
            verdict = Text("SKIPPED", style="yellow") if status.status == "skipped" else FAIL
            table.add_row(status.name, "-", "-", *[""] * 6, Text(status.reason, style="yellow"), "", "", verdict)
    return table

def latency_table(report: Report) -> Table:
    return rich_table(tables.latency(report))

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
            text = f"{tables.num(cell.cosine, '.6f')} / {tables.num(cell.max_abs, '.1e')} / {tables.num(cell.rel_error, '.1e')}"
            if cell.local_rel_error is not None:  # --replay: the block's own error, on the reference's input
                text += f" | local {tables.num(cell.local_cosine, '.6f')} / {tables.num(cell.local_rel_error, '.1e')}"
            style = "bold red reverse" if first_bad[backend] == layer else ("red" if not cell.passed else "")
            row.append(Text(text, style=style))
        table.add_row(*row)
    return table


def parts_table(report: Report) -> Table:
    """--replay: the opened block's parts; the first failing part of each backend in bold."""
    data = tables.parts(report)
    first = {}
    for index, row in enumerate(report.parts):
        if not row.passed:
            first.setdefault(row.backend, index)
    table = rich_table(data)
    for index in first.values():
        table.rows[index].style = "bold"
    return table

def overrides_text(overrides: dict) -> str:
    """How the user's thresholds replaced the classes, e.g. "thresholds overridden for every class: --min-cosine 0.9"."""
    if not overrides:
        return ""
    flags = ", ".join(f"--{key.replace('_', '-')} {value:g}" for key, value in overrides.items())
    return f"; thresholds overridden for every class, same-host fp32 included: {flags}"


def images_table(report: Report) -> Table:
    return rich_table(tables.per_image(report))

def neighbours_table(report: Report) -> Table:
    return rich_table(tables.neighbours(report))

def truth_table(report: Report) -> Table:
    return rich_table(tables.truth(report))

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
