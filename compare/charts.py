"""The Markdown report's PNG charts (the optional `plot` extra): latency and throughput by batch size, 1 - cosine by
block, and the per-image cosine's distribution. Pure functions from a Report to PNG bytes, drawn without pyplot."""
from __future__ import annotations

import io

import numpy as np

from .results import Report

LOG_SPAN = 20  # latency charts switch to a log y axis when the backends differ more than this factor
CHART_FLOOR = 1e-16  # 1 - cosine below float64 resolution is drawn here: a log axis has no zero


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
