"""Per-block comparison: where along the network the backends start to disagree. Pure: arrays in, rows out."""
from __future__ import annotations

import numpy as np

from vitparity import metrics, registry

from .results import LayerComparison


def _figures(a: np.ndarray, b: np.ndarray) -> dict:
    return {"cosine": metrics.cosine(a, b), "max_abs": metrics.max_abs_diff(a, b),
            "rel_error": metrics.relative_error(a, b), "nonfinite": metrics.nonfinite_count(a)}


def _passes(figures: dict, tolerance) -> bool:
    return tolerance.judge(figures["cosine"], figures["rel_error"], figures["nonfinite"]).passed


def layer_rows(backend: str, got: dict, want: dict, tolerance, layout: dict | None = None) -> list[LayerComparison]:
    """Every tap of `got` against the reference taps `want`, judged by `tolerance`; per token group too where
    a tap is the [prefix tokens, patches] stream that `layout` describes."""
    rows = []
    groups = registry.token_groups(layout)
    tokens = sum(part.stop - part.start for part in groups.values())
    for layer, reference in want.items():
        a = np.asarray(got[layer])
        whole = _figures(a, reference)
        per_group = {}
        if groups and a.ndim == 3 and a.shape[1] == tokens:
            per_group = {name: _figures(a[:, part], reference[:, part]) for name, part in groups.items()}
            for figures in per_group.values():
                figures["passed"] = _passes(figures, tolerance)
        rows.append(LayerComparison(backend=backend, layer=layer, passed=_passes(whole, tolerance), groups=per_group, **whole))
    return rows


def first_drifting_group(rows: list[LayerComparison]) -> tuple[str, LayerComparison] | None:
    """(group, row) of the token group that breaks its thresholds at the earliest tap (the larger relative
    error breaks a tie), or None when no group does."""
    for row in rows:
        failing = [(figures["rel_error"], name) for name, figures in row.groups.items() if not figures["passed"]]
        if failing:
            return max(failing)[1], row
    return None


def largest_step(rows: list[LayerComparison]) -> tuple[str, float] | None:
    """(block, increase) of the block that adds the most relative error to the stream it receives: the
    block a quantization or a kernel hurts most. None with fewer than two finite block taps."""
    blocks = [row for row in rows if row.layer.startswith("block_") and np.isfinite(row.rel_error)]
    if len(blocks) < 2:
        return None
    steps = [(row.rel_error - (blocks[i - 1].rel_error if i else 0.0), row.layer) for i, row in enumerate(blocks)]
    increase, layer = max(steps)
    return layer, increase


def drift_line(backend: str, rows: list[LayerComparison], tolerance) -> str:
    """One sentence naming the first tap that breaks the thresholds, or saying none does, and which token
    group drifts first; for a drifting backend or a variant graph ("ort-cpu:int8"), the block that adds the
    most error too (the block quantization or fp16 hurts most)."""
    first = next((row for row in rows if not row.passed), None)
    group = first_drifting_group(rows)
    where_group = ""
    if group:
        name, row = group
        where_group = (f"; first token group to drift: {name} at {row.layer.replace('_', ' ')} "
                       f"(rel err {row.groups[name]['rel_error']:.2e})")
    step = largest_step(rows) if first is not None or ":" in backend else None
    if step and step[1] > 0:
        where_group += f"; largest step: {step[0].replace('_', ' ')} adds {step[1]:.1e} rel err"
    if first is None:
        return f"{backend}: no drift: every block within {tolerance.name} thresholds" + where_group
    where = first.layer.replace("_", " ")
    nan = f", {first.nonfinite} NaN/Inf" if first.nonfinite else ""
    return f"{backend}: drift starts at {where} (cos {first.cosine:.4f}, rel err {first.rel_error:.2e}{nan})" + where_group


def compare_layers(taps: dict[str, dict], reference: str, tolerances: dict, layout: dict | None = None
                   ) -> tuple[list[LayerComparison], dict[str, str]]:
    """Every backend's taps against the reference's, each judged by its own tolerance. Returns (rows, drift lines)."""
    want = taps[reference]
    rows, drift = [], {}
    for name, got in taps.items():
        if name == reference:
            continue
        mismatch = [layer for layer in want if layer not in got or np.shape(got[layer]) != np.shape(want[layer])]
        if mismatch or len(got) != len(want):
            # e.g. a reference saved from another export of the model: say so, never crash the comparison.
            drift[name] = (f"{name}: per-block outputs not comparable: {len(got)} taps against {len(want)}"
                           + (f", first differing: {mismatch[0]}" if mismatch else ""))
            continue
        backend_rows = layer_rows(name, got, want, tolerances[name], layout)
        rows += backend_rows
        drift[name] = drift_line(name, backend_rows, tolerances[name])
    return rows, drift
