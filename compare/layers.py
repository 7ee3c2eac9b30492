"""Per-block comparison: where along the network the backends start to disagree."""
from __future__ import annotations

import numpy as np

from . import metrics
from .backends import BackendUnavailable
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


def compare_layers(art, loaded, batch, options, run, stored, step):
    """Taps of every loaded (and stored) backend against the reference's. Returns (rows, drift lines)."""
    from .run import judged_by

    for name, backend in loaded.items():
        step(f"{art.key}: per-block outputs of {name}")
        try:
            run.taps[name] = backend.layers(art, batch)
        except BackendUnavailable:
            continue
    if stored is not None:
        run.taps.update(stored.taps)
    want = run.taps[options.reference]
    rows, drift = [], {}
    for name, taps in run.taps.items():
        if name == options.reference:
            continue
        tolerance = judged_by(name, loaded, stored, options)
        backend_rows = layer_rows(name, taps, want, tolerance)
        rows += backend_rows
        drift[name] = drift_line(name, backend_rows, tolerance)
    return rows, drift
