"""Rich tables built from a Report. Building only: the CLI does the printing."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text

from . import tables
from .results import Report

PASS, FAIL = Text("PASS", style="bold green"), Text("FAIL", style="bold red")
MARKS = {tables.FAILS: "red", tables.FIRST: "bold red reverse"}
STATUS = {"skipped": "yellow", "error": "bold red"}  # a backend that did not run, in the backends table


def rich_table(data: tables.Table) -> Table:
    """One of compare/tables.py's tables, drawn for the terminal: numbers right-aligned, verdicts and a backend's
    status in colour, a failing cell red and the first failing one of its backend reversed."""
    table = Table(title=data.title, title_justify="left", caption=data.caption or None, caption_justify="left")
    for index, column in enumerate(data.columns):
        table.add_column(column, justify="right" if data.numeric(index) else "left")
    for index, row in enumerate(data.rows):
        table.add_row(*[_cell(data, index, column, cell) for column, cell in enumerate(row)])
    return table


def _cell(data: tables.Table, row: int, column: int, cell: str):
    name = data.columns[column]
    if name == tables.VERDICT:
        return {"PASS": PASS, "FAIL": FAIL}.get(cell, cell)
    if name == "status" and cell in STATUS:
        return Text(cell, style=STATUS[cell])
    mark = data.marks.get((row, column))
    return Text(cell, style=MARKS[mark]) if mark else cell


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


def overrides_text(overrides: dict) -> str:
    """How the user's thresholds replaced the classes, e.g. "thresholds overridden for every class: --min-cosine 0.9"."""
    if not overrides:
        return ""
    flags = ", ".join(f"--{key.replace('_', '-')} {value:g}" for key, value in overrides.items())
    return f"; thresholds overridden for every class, same-host fp32 included: {flags}"


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
    parts = [header_table(report), rich_table(tables.backends(report)), rich_table(tables.accuracy(report))]
    # How far every failing output is from passing (Polygraphy's "minimum required tolerance").
    parts += [Text(f"{r.backend} {r.label}: FAIL, {r.how_far()}", style="red") for r in report.accuracy if not r.passed]
    if report.from_folder:
        parts.append(rich_table(tables.per_image(report)))
    if report.shown_neighbours:
        parts.append(rich_table(tables.neighbours(report)))
    if report.truth:
        parts.append(rich_table(tables.truth(report)))
    if report.layers:
        parts.append(rich_table(tables.layers(report)))
        parts += [Text(line, style="bold yellow") for line in report.drift.values()]
    if report.parts:
        parts.append(rich_table(tables.parts(report)))
    parts += [Text(f"{backend}: try: {line}", style="bold cyan") for backend, line in report.advice.items()]
    if report.latency:
        parts.append(rich_table(tables.latency(report)))
    parts.append(verdict_text(report))
    return parts
