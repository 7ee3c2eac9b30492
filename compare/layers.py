"""Per-block comparison: where along the network the backends start to disagree. Pure: arrays in, rows out."""
from __future__ import annotations

import numpy as np

from exporter import metrics

from .results import LayerComparison


def layer_rows(backend: str, got: dict, want: dict, tolerance) -> list[LayerComparison]:
    """Every tap of `got` against the reference taps `want`, judged by `tolerance`."""
    rows = []
    for layer, reference in want.items():
        a = np.asarray(got[layer])
        cos, rel, bad = metrics.cosine(a, reference), metrics.relative_error(a, reference), metrics.nonfinite_count(a)
        rows.append(LayerComparison(
            backend=backend, layer=layer, cosine=cos, max_abs=metrics.max_abs_diff(a, reference),
            rel_error=rel, nonfinite=bad,
            passed=bool(bad == 0 and cos >= tolerance.min_cosine and rel <= tolerance.max_rel),
        ))
    return rows


def drift_line(backend: str, rows: list[LayerComparison], tolerance) -> str:
    """One sentence naming the first tap that breaks the thresholds, or saying none does."""
    first = next((row for row in rows if not row.passed), None)
    if first is None:
        return f"{backend}: no drift: every block within {tolerance.name} thresholds"
    where = first.layer.replace("_", " ")
    nan = f", {first.nonfinite} NaN/Inf" if first.nonfinite else ""
    return f"{backend}: drift starts at {where} (cos {first.cosine:.4f}, rel err {first.rel_error:.2e}{nan})"


def compare_layers(taps: dict[str, dict], reference: str, tolerances: dict) -> tuple[list[LayerComparison], dict[str, str]]:
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
        backend_rows = layer_rows(name, got, want, tolerances[name])
        rows += backend_rows
        drift[name] = drift_line(name, backend_rows, tolerances[name])
    return rows, drift
