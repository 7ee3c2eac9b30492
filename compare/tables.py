"""Tables of a report built once, as data: a title, columns and rows of cells formatted by one formatter.

The terminal (compare/render.py) and the Markdown report (compare/markdown.py) draw these same tables, and the
sweep's coverage matrix (zoo/render.py) is one too, so their columns and numbers cannot drift apart. A cell of a
verdict column is "PASS", "FAIL" or a note ("not judged: ..."); a marked cell fails its thresholds (FAILS) or is
the first of its backend to (FIRST). Each renderer styles them its own way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .results import Report

# How numbers are printed. Every printed number equals the JSON's number rounded to this precision.
COSINE = ".7f"  # 7 decimals: the thresholds go down to 0.99999, so two spare digits
ERROR = ".2e"  # max abs, mean abs, relative error: 3 significant digits
MS = ".2f"  # milliseconds per call: 10 µs steps
RATE = ".1f"  # images per second
SPEEDUP = ".2f"  # reference mean / this mean, shown as "1.08x"
VERDICT = "verdict"
FAILS, FIRST = "fails", "first"  # the marks of a cell: it fails its thresholds; it is the first of its backend to
NUMBER = re.compile(r"[-+]?(\d[\d.]*(e[-+]?\d+)?|nan|inf)x?|-")  # a cell right-aligned by both renderers


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    caption: str = ""
    marks: dict[tuple[int, int], str] = field(default_factory=dict)  # (row, column) -> FAILS or FIRST

    def numeric(self, column: int) -> bool:
        """Whether every cell of a column is a number or "-", and one at least a number: right-aligned by both renderers."""
        cells = [row[column] for row in self.rows]
        return any(cell != "-" for cell in cells) and all(NUMBER.fullmatch(cell) for cell in cells)


def num(value, spec: str) -> str:
    """A number at its documented precision; "-" for none. format prints NaN and Inf as nan and inf."""
    return "-" if value is None else format(value, spec)


def ratio(value) -> str:
    return "-" if value is None else f"{num(value, SPEEDUP)}x"


def verdict(passed: bool | None, note: str = "") -> str:
    return note if passed is None else "PASS" if passed else "FAIL"


def accuracy(report: Report) -> Table:
    """Every (backend, output) row with its figures, the class that judged it and its thresholds in full."""
    columns = ("backend", "output", "shape", "cosine", "worst-sample cosine", "max abs", "mean abs", "rel err", "NaN/Inf",
               "tolerance", "min cosine", "max rel", VERDICT)
    rows = [(r.backend, r.label, shape(r.shape) + ("" if r.shape_match else f" (reference {shape(r.reference_shape)})"),
             num(r.cosine, COSINE), num(r.worst_sample_cosine, COSINE), num(r.max_abs, ERROR), num(r.mean_abs, ERROR),
             num(r.rel_error, ERROR), str(r.nonfinite), r.tolerance, repr(r.min_cosine), repr(r.max_rel), verdict(r.passed))
            for r in report.accuracy]
    return Table(f"Accuracy against {report.reference}", columns, rows)


def parts(report: Report) -> Table:
    """--replay: the parts of the block each backend's own error is largest in, in the order they ran; the first
    failing part of each backend marked."""
    columns = ("backend", "block", "part", "cosine", "rel err", "max abs", "NaN/Inf", VERDICT)
    rows = [(r.backend, r.layer.replace("_", "s.", 1), r.part, num(r.cosine, COSINE), num(r.rel_error, ERROR),
             num(r.max_abs, ERROR), str(r.nonfinite), verdict(r.passed)) for r in report.parts]
    first = {}
    for index, row in enumerate(report.parts):
        if not row.passed:
            first.setdefault(row.backend, index)
    marks = {(index, column): FIRST for index in first.values() for column in range(len(columns) - 1)}
    return Table(f"Inside the block, on {report.reference}'s input to it (timm's module names, in the order they ran)",
                 columns, rows, marks=marks)


def layers(report: Report) -> Table:
    """--layers: block by backend, the cosine, max abs and relative error of every tap against the reference, and
    with --replay the block's own (local) error; the cells of a failing block marked, the first one of each backend
    apart."""
    backends = list(dict.fromkeys(r.backend for r in report.layers))
    local = any(r.local_rel_error is not None for r in report.layers)
    figures = ("cosine", "max abs", "rel err") + (("local cosine", "local rel err") if local else ())
    columns = ("layer", *(f"{backend} {figure}" for backend in backends for figure in figures))
    cells = {(r.backend, r.layer): r for r in report.layers}
    first_bad = {b: next((r.layer for r in report.layers if r.backend == b and not r.passed), None) for b in backends}
    rows, marks = [], {}
    for index, layer in enumerate(dict.fromkeys(r.layer for r in report.layers)):
        row = [layer]
        for backend in backends:
            cell, start = cells.get((backend, layer)), len(row)
            if cell is None:
                row += ["-"] * len(figures)
                continue
            row += [num(cell.cosine, COSINE), num(cell.max_abs, ERROR), num(cell.rel_error, ERROR)]
            if local:
                row += ["-", "-"] if cell.local_rel_error is None else [num(cell.local_cosine, COSINE),
                                                                        num(cell.local_rel_error, ERROR)]
            if not cell.passed:  # the accumulated figures are the ones judged
                marks |= {(index, column): FIRST if first_bad[backend] == layer else FAILS for column in range(start, start + 3)}
        rows.append(tuple(row))
    caption = "Accumulated: each block's output against the reference's, with the error of the blocks before it."
    if local:
        caption += " Local (--replay): the block run on the reference's input to it, its own error apart from what it was given."
    return Table(f"Per-block agreement against {report.reference}", columns, rows, caption, marks)


# Details shown in columns of their own, or kept out of the backends table (timings, logs, tracebacks).
SHOWN_DETAILS = {"device", "dtype", "device_name", "torch", "torch_npu", "onnxruntime", "cann", "cuda", "precision", "switches",
                 "provider_options", "placement", "placement_summary", "timed", "kernel_time_share", "layers_placement",
                 "layers_placement_summary", "layers_graph", "traceback", "bugs", "log", "peak_rss_mb"}


def backends(report: Report) -> Table:
    """Every backend: whether it ran, and where and how as read back from its runtime (device, dtype, precision,
    switches, node placement), then either its other settings or why it did not run."""
    columns = ("backend", "status", "device", "dtype", "precision", "switches and provider options",
               "placement (nodes by provider)", "other settings or reason")
    rows = []
    for status in report.backends:
        details = status.details
        device = " ".join(filter(None, [str(details.get("device", "-")),
                                        f"({details['device_name']})" if details.get("device_name") else ""]))
        settings = "; ".join(f"{key}={_setting(value)}" for key, value in details.items() if key not in SHOWN_DETAILS)
        rows.append((status.name, status.status, device, str(details.get("dtype", "-")), str(details.get("precision", "-")),
                     status.switches() or "-", status.placement(), status.reason or settings or "-"))
    return Table("Backends (as read back from each runtime)", columns, rows)


def _setting(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def shape(dims) -> str:
    return "x".join(map(str, dims))


def latency(report: Report) -> Table:
    """One row per (backend, batch size), in batch order: percentiles, mean, std and min in ms, throughput, the
    speed-up against the reference, and for a variant row against its own fp32 graph."""
    timed = [f"{s.name}: {s.details['timed']}" for s in report.backends if s.details.get("timed")]
    variants = any(row.graph_speedup is not None for row in report.latency)
    columns = ("backend", "batch", "warm-up", "iters", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "min ms",
               "images/s", "speed-up") + (("vs fp32 graph",) if variants else ())
    rows = [(r.backend, str(r.batch), str(r.warmup), str(r.iters), num(r.p50_ms, MS), num(r.p90_ms, MS), num(r.p99_ms, MS),
             num(r.mean_ms, MS), num(r.std_ms, MS), num(r.min_ms, MS), num(r.images_per_s, RATE), ratio(r.speedup),
             *((ratio(r.graph_speedup),) if variants else ()))
            for r in sorted(report.latency, key=lambda r: r.batch)]  # stable: backends keep their order within a batch
    return Table(f"Latency (ms per call; speed-up against {report.reference})", columns, rows,
                 "Inside the clock: " + "; ".join(timed) if timed else "")


def per_image(report: Report) -> Table:
    """--images: the distribution of each output's per-image agreement, and the worst images by name."""
    count = report.input.get("count", 0)
    speeds = "; ".join(f"{b.name}: {b.throughput(count)}" for b in report.backends if b.throughput(count))
    columns = ("backend", "output", "worst cos", "p1 cos", "median cos", "median rel err", "worst rel err",
               "worst image (lowest cosine)")  # the largest rel err's image is the JSON's images.worst_rel_image
    rows = [(r.backend, r.label, num(r.images["cos_worst"], COSINE), num(r.images["cos_p1"], COSINE),
             num(r.images["cos_median"], COSINE), num(r.images["rel_median"], ERROR), num(r.images["rel_worst"], ERROR),
             r.images["worst_image"])
            for r in report.accuracy if r.images]
    return Table(f"Per image ({count} images; the verdict is judged on the whole and the worst)", columns, rows,
                 f"Each backend's own compute over the images: {speeds}" if speeds else "")


def neighbours(report: Report) -> Table:
    """Whether each backend's pooled embeddings keep the reference's nearest neighbours."""
    columns = ("backend", "k", "mean overlap@k", "nearest unchanged", "thresholds", VERDICT)
    rows = [(r.backend, str(r.k), num(r.overlap, ".4f"), num(r.nearest_unchanged, ".4f"),
             f"{r.tolerance}: overlap>={r.min_overlap:g}, nearest>={r.min_nearest:g}", verdict(r.passed, r.note))
            for r in report.shown_neighbours]
    return Table(f"Neighbour agreement of pooled embeddings with {report.reference} (k nearest by cosine)", columns, rows)


def truth(report: Report) -> Table:
    """Each backend's error against the fp64 truth, and as a multiple of the reference's own error."""
    columns = ("backend", "output", "rel err vs truth", f"x {report.reference}")
    rows = [(r.backend, r.output, num(r.rel_error, ERROR), ratio(r.ratio)) for r in report.truth]
    return Table(f"Against the {report.truth[0].truth if report.truth else 'fp64'} truth (eager float64 on the CPU): "
                 f"error as a multiple of {report.reference}'s own", columns, rows)
