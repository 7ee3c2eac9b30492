"""Tables of a report built once, as data: a title, columns and rows of cells formatted by one formatter.

The terminal (compare/render.py) and the Markdown report (compare/markdown.py) draw these same tables with the
core's toolkit (vitparity/tables.py), as the sweep's coverage matrix (zoo/render.py) is drawn, so their columns and
numbers cannot drift apart. A cell of a
verdict column is "PASS", "FAIL" or a note ("not judged: ..."); a marked cell fails its thresholds (FAILS) or is
the first of its backend to (FIRST). Each renderer styles them its own way.
"""
from __future__ import annotations

from pathlib import Path

from vitparity.tables import (  # noqa: F401  # the toolkit is the core's; these names are compare's tables' vocabulary
    COSINE,
    ERROR,
    FAILS,
    FIRST,
    MS,
    NUMBER,
    RATE,
    SPEEDUP,
    VERDICT,
    Table,
    inline,
    markdown,
    markdown_table,
    num,
    ratio,
    rich_table,
    verdict,
)

from .results import Report


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


def layer_groups(report: Report) -> list[list[str]]:
    """The backends of the per-block table, a few to a table, so that each fits 100 columns: two (three figures each,
    about 33 columns), or one with --replay's two more."""
    backends = list(dict.fromkeys(r.backend for r in report.layers))
    size = 1 if any(r.local_rel_error is not None for r in report.layers) else 2
    return [backends[i:i + size] for i in range(0, len(backends), size)]


def layers(report: Report, backends: list[str] | None = None) -> Table:
    """--layers: block by backend (`backends`, default all), the cosine, max abs and relative error of every tap
    against the reference, and with --replay the block's own (local) error; the cells of a failing block marked,
    the first one of each backend apart."""
    backends = backends or list(dict.fromkeys(r.backend for r in report.layers))
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
                 "layers_placement_summary", "layers_graph", "traceback", "bugs", "log", "peak_rss_mb",
                 "peak_rss_mb_since_fork", "started"}


def backends(report: Report) -> Table:
    """Every backend: whether it ran, and where and how as read back from its runtime (device, dtype, precision,
    switches, node placement), then its other settings, or a note pointing to why it did not run: each reason is
    written once, in the caption below the table ("(1) torch_npu is not installed..."), however many rows share it."""
    columns = ("backend", "status", "device", "dtype", "precision", "switches and provider options",
               "placement (nodes by provider)", "other settings or reason")
    rows, reasons = [], {}
    for status in report.backends:
        details = status.details
        device = " ".join(filter(None, [str(details.get("device", "-")),
                                        f"({details['device_name']})" if details.get("device_name") else ""]))
        if status.reason:
            note = f"({reasons.setdefault(status.reason, len(reasons) + 1)})"
        else:
            note = settings(details) or "-"
        rows.append((status.name, status.status, device, str(details.get("dtype", "-")), str(details.get("precision", "-")),
                     status.switches() or "-", status.placement(), note))
    caption = "\n".join(f"({index}) {reason}" for reason, index in reasons.items())
    return Table("Backends (as read back from each runtime)", columns, rows, caption)


def settings(details: dict) -> str:
    """A backend's other settings as "key=value; ...": plain values only. A mapping or a list of mappings (a
    recipe, the replay figures) is data with its own table or the JSON, never a cell."""
    shown = []
    for key, value in details.items():
        if key in SHOWN_DETAILS:
            continue
        text = _setting(value)
        if text is not None:
            shown.append(f"{key}={text}")
    return "; ".join(shown)


SETTING_WIDTH = 60  # a longer value (a path, a log) is the JSON's, not a cell's


def _setting(value) -> str | None:
    if isinstance(value, dict):
        return value.get("call") if isinstance(value.get("call"), str) else None  # a recipe: the library call that made it
    if isinstance(value, (list, tuple)):
        if not all(isinstance(item, (str, int, float, bool)) for item in value):
            return None
        value = ", ".join(map(str, value))
    text = str(value)
    return text if len(text) <= SETTING_WIDTH and "\n" not in text else None


def compact_backends(report: Report) -> Table:
    """The default terminal view of the backends that ran (or were read, or broke): where and in what precision."""
    columns = ("backend", "status", "precision", "placement (nodes by provider)")
    rows = [(s.name, s.status, str(s.details.get("precision", "-")), s.details.get("placement_summary", "-"))
            for s in report.backends if s.status != "skipped"]
    return Table("Backends", columns, rows)


def not_run_lines(report: Report) -> list[str]:
    """One line per reason a backend did not run here ("not run: ...") or broke ("error: ..."), naming every backend
    it kept out: the reasons the compact backends table leaves out."""
    found: dict[tuple[str, str], list[str]] = {}
    for status in report.backends:
        if status.status in ("skipped", "error"):
            found.setdefault((status.status, status.reason), []).append(status.name)
    return [f"{'not run' if kind == 'skipped' else 'error'}: {', '.join(names)}: {reason}" for (kind, reason), names in found.items()]


def compact_accuracy(report: Report) -> Table:
    """The default terminal view of the accuracy rows: backend, output, cosine, rel err and verdict (-v: the rest)."""
    columns = ("backend", "output", "cosine", "rel err", VERDICT)
    rows = [(r.backend, r.label, num(r.cosine, COSINE), num(r.rel_error, ERROR), verdict(r.passed)) for r in report.accuracy]
    return Table(f"Accuracy against {report.reference}", columns, rows)


def compact_latency(report: Report) -> Table:
    """The default terminal view of the latency rows: median and mean ms per call, throughput and speed-ups."""
    variants = any(row.graph_speedup is not None for row in report.latency)
    columns = ("backend", "batch", "p50 ms", "mean ms", "images/s", "speed-up") + (("vs fp32 graph",) if variants else ())
    rows = [(r.backend, str(r.batch), num(r.p50_ms, MS), num(r.mean_ms, MS), num(r.images_per_s, RATE), ratio(r.speedup),
             *((ratio(r.graph_speedup),) if variants else ()))
            for r in sorted(report.latency, key=lambda r: r.batch)]
    return Table(f"Latency (ms per call; speed-up against {report.reference})", columns, rows)


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
    columns = ("backend", "k", "recall@k", "nearest same", "can flip", "closest gap / error", "needs", VERDICT)
    count = report.input.get("count") or len(report.input.get("images", [])) or ""
    rows = [(r.backend, str(r.k), num(r.overlap, ".4f"), num(r.nearest_unchanged, ".4f"),
             f"{r.flippable}/{count}" if r.k else "-",
             f"{r.min_margin:.1e} / {r.min_margin_error:.1e}" if r.min_margin is not None else "-",
             f">={r.min_overlap:g}, >={r.min_nearest:g}", verdict(r.passed, r.note))
            for r in report.shown_neighbours]
    return Table(f"Neighbour agreement of pooled embeddings with {report.reference} (k nearest by cosine); can flip: "
                 f"queries whose gap between the k-th and (k+1)-th neighbour is at most twice the backend's similarity "
                 f"error on them", columns, rows)


def stability(report: Report) -> Table:
    """--stability: each backend against itself, judged by its class: run twice, and alone against among others."""
    columns = ("backend", "check", "bit-identical", "worst row", "cosine", "rel err", "max abs", VERDICT)
    checks = {"repeat": "run twice", "batch": "alone vs batch"}
    rows = [(r.backend, checks[r.check] + (f" (at {r.position})" if r.position is not None and not r.identical else ""),
             "yes" if r.identical else "no", r.label, num(r.cosine, COSINE), num(r.rel_error, ERROR), num(r.max_abs, ERROR),
             verdict(r.passed, "")) for r in report.stability]
    return Table("Against itself: the batch run twice, and its first item alone against the same item among 3 others "
                 "(at the position that changed it most, of 4)", columns, rows)


def stability_lines(report: Report) -> list[str]:
    """A line for each backend whose outputs are not bit-identical when run twice, or that depend on the other inputs
    of their batch: the size of the effect, said in words, next to what its class allows."""
    lines = []
    for r in report.stability:
        if r.identical:
            continue
        if r.check == "repeat":
            what = "is not deterministic: the same batch run twice differs"
        elif r.companions_max_abs:
            what = (f"depends on the other inputs of its batch (by max abs {r.companions_max_abs:.2e} against a batch of "
                    f"its own copies): alone against at position {r.position} of 4 its first item changes")
        else:
            what = ("changes with the batch size only (the same with any companions: kernel rounding): alone against "
                    f"at position {r.position} of 4 its first item changes")
        lines.append(f"{r.backend} {what} by max abs {r.max_abs:.2e} ({r.label}, cosine {r.cosine:.7f}, rel err "
                     f"{r.rel_error:.2e}; {'within' if r.passed else 'OUTSIDE'} its {r.tolerance} class)")
    return lines


def hunt(report: Report) -> Table:
    """--hunt: each backend's worst input among the folder's images and their variations."""
    columns = ("backend", "made from", "variation", "worst row", "cosine", "rel err", VERDICT)
    rows = [(w.backend, Path(w.source).name, w.variation, w.label, num(w.cosine, COSINE), num(w.rel_error, ERROR),
             verdict(w.passed, "")) for w in report.hunt]
    count = report.input.get("count", "")
    return Table(f"The worst input of each backend, of {count} (--hunt: every image and its variations), written to "
                 f"{Path(report.hunt[0].path).parent if report.hunt else '-'}", columns, rows)


def resample_line(report: Report) -> str:
    """A graph for every size: its position-embedding Resize run alone against eager's resample (vitparity/resample.py)."""
    found = report.resample
    where = "; Resize ran on " + ", ".join(f"{name} {'+'.join(on)}" for name, on in found["resize_ran_on"].items()) \
        if found.get("resize_ran_on") else ""
    if found["passed"]:
        return (f"position-embedding resample at {report.size or 'the native size'}: Resize ({found['attributes']}) as "
                f"eager's, max abs {found['max_abs']:.1e}{where}")
    return f"position-embedding resample: FAIL, {found['reason']}{where}"


def truth(report: Report) -> Table:
    """Each backend's error against the fp64 truth, and as a multiple of the reference's own error."""
    columns = ("backend", "output", "rel err vs truth", f"x {report.reference}")
    rows = [(r.backend, r.output, num(r.rel_error, ERROR), ratio(r.ratio)) for r in report.truth]
    return Table(f"Against the {report.truth[0].truth if report.truth else 'fp64'} truth (eager float64 on the CPU): "
                 f"error as a multiple of {report.reference}'s own", columns, rows)
