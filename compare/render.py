"""Rich tables built from a Report. Building only: the CLI does the printing."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text

from vitparity import registry

from . import tables
from .results import Report

PASS, FAIL = Text("PASS", style="bold green"), Text("FAIL", style="bold red")
rich_table = tables.rich_table  # the core's drawing (vitparity/tables.py)


def title(report: Report) -> str:
    """What was compared: "dinov3: vit_small_patch16_dinov3.lvd1689m", with the --model-kwargs it was built with."""
    kwargs = f" ({registry.kwargs_label(report.model_kwargs)})" if report.model_kwargs else ""
    return f"{report.name}: {report.timm_name}{kwargs}"


def header_table(report: Report) -> Table:
    table = Table(title=title(report), show_header=False, title_justify="left")
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
    if report.devices_not_run and not judged.failed:
        text, style = f"{report.name}: NOT COMPARED: " + " ".join(report.devices_not_run.values()), "bold yellow"
    elif judged.status == "NOT COMPARED":
        text, style = f"{report.name}: NOT COMPARED (only the reference {report.reference} ran{skipped})", "bold yellow"
    elif judged.status == "PASS":
        verb = "agrees" if len(judged.compared) == 1 else "agree"
        text, style = f"{report.name}: PASS ({', '.join(judged.compared)} {verb} with {report.reference}{skipped})", "bold green"
    else:
        text, style = f"{report.name}: FAIL ({', '.join(judged.failed)} disagree with {report.reference})", "bold red"
    return Text(text + overrides_text(judged.overrides) + random_text(report), style=style)


def random_text(report: Report) -> str:
    """Said in the verdict line, not only in a warning, when `--weights auto` found no weights and fell back to random
    ones: they check the port, not the model."""
    if "auto fell back" not in report.weights_source:  # exporter/weights.py AUTO_FELL_BACK: random nobody asked for
        return ""
    return (f"; random weights: {report.weights_source}; export with --weights FILE (make compare WEIGHTS=FILE) for "
            f"the model's own")


def resample_text(report: Report) -> Text:
    """The position-embedding resample of a graph for every size, on its own: its Resize against eager's."""
    return Text(tables.resample_line(report), style="green" if report.resample["passed"] else "bold red")


def compact_header(report: Report) -> Table:
    """The default view's header: what was compared, on what input, with which weights; warnings in full."""
    table = Table(title=title(report), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    input_ = report.input
    table.add_row("input", f"{input_['kind']} {input_['source']}, shape {tuple(input_['shape'])}")
    table.add_row("weights", report.weights_source)
    for warning in report.warnings:
        table.add_row(Text("warning", style="yellow"), Text(warning, style="yellow"))
    return table


def render(report: Report, verbose: bool = False) -> list:
    """Every renderable of a report, in the order they are printed. The default view fits a 100-column terminal
    without cutting a number: a short header, the backends that ran, one line per reason others did not, the
    accuracy rows' cosine, rel err and verdict, the latency's medians and speed-ups, the verdict. `verbose`
    (-v): every table in full, as the Markdown report has them."""
    if verbose:
        parts = [header_table(report), rich_table(tables.backends(report)), rich_table(tables.accuracy(report))]
    else:
        parts = [compact_header(report), rich_table(tables.compact_backends(report))]
        parts += [Text(line, style="bold red" if line.startswith("error") else "yellow") for line in tables.not_run_lines(report)]
        parts.append(rich_table(tables.compact_accuracy(report)))
    # How far every failing output is from passing (Polygraphy's "minimum required tolerance").
    parts += [Text(f"{r.backend} {r.label}: FAIL, {r.how_far()}", style="red") for r in report.accuracy if not r.passed]
    if report.from_folder:
        parts.append(rich_table(tables.per_image(report)))
    if report.shown_neighbours:
        parts.append(rich_table(tables.neighbours(report)))
    if report.stability:
        parts.append(rich_table(tables.stability(report)))
        parts += [Text(line, style="yellow") for line in tables.stability_lines(report)]
    if report.hunt:
        parts.append(rich_table(tables.hunt(report)))
        # One line each, never wrapped: a command to copy.
        parts += [Text(f"reproduce {w.backend}'s: {w.command}", style="cyan", no_wrap=True, overflow="ignore")
                  for w in report.hunt]
    if report.truth:
        parts.append(rich_table(tables.truth(report)))
    if report.layers:
        parts += [rich_table(tables.layers(report, group)) for group in tables.layer_groups(report)]
        parts += [Text(line, style="bold yellow") for line in report.drift.values()]
    if report.parts:
        parts.append(rich_table(tables.parts(report)))
    parts += [Text(f"{backend}: try: {line}", style="bold cyan") for backend, line in report.advice.items()]
    if report.resample:
        parts.append(resample_text(report))
    if report.latency:
        parts.append(rich_table(tables.latency(report) if verbose else tables.compact_latency(report)))
    parts.append(verdict_text(report))
    return parts
