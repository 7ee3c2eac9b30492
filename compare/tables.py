"""Tables of a report built once, as data: a title, columns and rows of cells formatted by one formatter.

The terminal (compare/render.py) and the Markdown report (compare/markdown.py) draw these same tables,
so their columns and numbers cannot drift apart. A cell of a verdict column is "PASS", "FAIL" or a note
("not judged: ..."); each renderer styles it its own way.
"""
from __future__ import annotations

from dataclasses import dataclass

from .results import Report

# How numbers are printed. Every printed number equals the JSON's number rounded to this precision.
COSINE = ".7f"  # 7 decimals: the thresholds go down to 0.99999, so two spare digits
ERROR = ".2e"  # max abs, mean abs, relative error: 3 significant digits
MS = ".2f"  # milliseconds per call: 10 µs steps
RATE = ".1f"  # images per second
SPEEDUP = ".2f"  # reference mean / this mean, shown as "1.08x"
VERDICT = "verdict"


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    caption: str = ""

    def numeric(self, column: int) -> bool:
        """Whether a column holds numbers (right-aligned by both renderers)."""
        return self.columns[column] not in TEXT_COLUMNS


TEXT_COLUMNS = {"backend", "block", "part", "output", "shape", "tolerance", "thresholds", VERDICT, "worst image (lowest cosine)"}


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
    """--replay: the parts of the block each backend's own error is largest in, in the order they ran."""
    columns = ("backend", "block", "part", "cosine", "rel err", "max abs", "NaN/Inf", VERDICT)
    rows = [(r.backend, r.layer.replace("_", "s.", 1), r.part, num(r.cosine, COSINE), num(r.rel_error, ERROR),
             num(r.max_abs, ERROR), str(r.nonfinite), verdict(r.passed)) for r in report.parts]
    return Table(f"Inside the block, on {report.reference}'s input to it (timm's module names, in the order they ran)",
                 columns, rows)


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
