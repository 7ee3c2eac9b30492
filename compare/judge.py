"""Judging: every row of a report, built from per-item figures, every verdict from `Tolerance.judge`.

One data path. Whatever the input (a seeded batch, one image, a folder of images), each backend's outputs
become the same per-item figures (`item_figures`: one value per image or sample, against the reference and
against the truth), and the same functions turn them into rows: accuracy, per-image, neighbours, truth.
For a folder the workers compute the figures batch by batch (compare/dataset.py); for one batch the
parent computes them from the arrays it holds. The figures cross the process boundary as flat arrays
under "<against>|<output>|<group>|<figure>" keys: `wire` writes them and `from_wire` reads them, the
only two places that know the spelling.

Field meanings are the same in every mode: `cosine` and `rel_error` are those of the whole output
(all items flattened, exact from the per-item sums); the worst item's are `worst_sample_cosine` and
`images["rel_worst"]`. A row passes when both the whole and the worst item pass its class.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from vitparity import judging, metrics, registry
from vitparity.artifact import OUTPUT_NAMES
from vitparity.tolerances import Tolerance, tolerance_for

from .backends import split
from .results import (
    BackendStatus,
    NeighbourComparison,
    OutputComparison,
    StabilityComparison,
    TruthComparison,
)

OUTPUTS = OUTPUT_NAMES  # every artifact's graph: pixel_values -> pooled, tokens
NEIGHBOURS_K = 10  # k of overlap@k, or fewer when there are fewer images
# The rows, their per-item figures and their judgement are the core's (vitparity/judging.py): the exporter judges
# its graphs with the same functions.
parts, item_figures, concatenate = judging.parts, judging.item_figures, judging.concatenate
SHAPE, REFERENCE_SHAPE = judging.SHAPE, judging.REFERENCE_SHAPE


def wire(against: str, figures: dict[tuple[str, str], dict]) -> dict[str, np.ndarray]:
    """Per-item figures as the flat arrays a worker returns (and the parent keeps in Run.images)."""
    return {f"{against}|{output}|{group}|{name}": np.asarray(value)
            for (output, group), found in figures.items() for name, value in found.items()}


def from_wire(arrays: dict[str, np.ndarray], against: str) -> dict[tuple[str, str], dict]:
    """The inverse of `wire` for one `against` (reference or truth), in output and token-group order."""
    found: dict[tuple[str, str], dict] = {}
    for key, value in arrays.items():
        fields = key.split("|")
        if len(fields) == 4 and fields[0] == against:
            found.setdefault((fields[1], fields[2]), {})[fields[3]] = np.asarray(value)
    order = {group: index for index, group in enumerate(("", *registry.GROUPS))}
    return dict(sorted(found.items(), key=lambda item: (OUTPUTS.index(item[0][0]), order.get(item[0][1], len(order)))))


def accuracy_rows(backend: str, figures: dict[tuple[str, str], dict], tolerance: Tolerance, items: list[str]
                  ) -> list[OutputComparison]:
    """One row per output and token group, judged on the whole and on the worst item. `items` names the
    items (image paths, or "sample 0"...) for the worst-item fields."""
    return [_row(backend, output, group, found, tolerance, items) for (output, group), found in figures.items()]


def _row(backend: str, output: str, group: str, found: dict, tolerance: Tolerance, items: list[str]) -> OutputComparison:
    shape, reference_shape = [int(n) for n in found[SHAPE]], [int(n) for n in found[REFERENCE_SHAPE]]
    nan = float("nan")
    judged = judging.judge_row(output, group, found, tolerance)  # the one judgement, the exporter's too
    if not judged.shape_match:  # the shapes differ: nothing to measure
        count = int(found.get("count", 0))
        return OutputComparison(
            backend=backend, output=output, shape=[count, *shape], reference_shape=[count, *reference_shape],
            shape_match=False, cosine=nan, worst_sample_cosine=nan, max_abs=nan, mean_abs=nan, rel_error=nan, nonfinite=0,
            tolerance=tolerance.name, min_cosine=tolerance.min_cosine, max_rel=tolerance.max_rel,
            passed=judged.passed, group=group)
    cos, rel = np.asarray(found["cosine"]), np.asarray(found["rel_error"])
    count = len(cos)
    total = judged.totals
    would_cos, would_rel = metrics.loosest_passing(judged.cosine, judged.rel_error)
    finite = bool(np.isfinite(cos).all() and np.isfinite(rel).all())
    p50, p99 = np.asarray(found["p50"]), np.asarray(found["p99"])
    return OutputComparison(
        backend=backend, output=output, shape=[count, *shape], reference_shape=[count, *reference_shape], shape_match=True,
        cosine=total["cosine"], worst_sample_cosine=total["worst_cosine"], max_abs=total["max_abs"], mean_abs=total["mean_abs"],
        rel_error=total["rel_error"], nonfinite=total["nonfinite"], tolerance=tolerance.name,
        min_cosine=tolerance.min_cosine, max_rel=tolerance.max_rel,
        passed=judged.passed,
        error_p50=float(np.median(p50)) if count and np.isfinite(p50).all() else nan,
        error_p99=float(np.max(p99)) if count and np.isfinite(p99).all() else nan,
        would_pass_min_cosine=would_cos, would_pass_max_rel=would_rel, group=group,
        images={"count": count, "cos_worst": total["worst_cosine"],
                "cos_p1": float(np.quantile(cos, 0.01)) if finite and count else nan,
                "cos_median": float(np.median(cos)) if finite and count else nan,
                "rel_median": float(np.median(rel)) if finite and count else nan, "rel_worst": total["worst_rel_error"],
                "worst_image": items[int(np.argmin(cos))] if finite and count else "",
                "worst_rel_image": items[int(np.argmax(rel))] if finite and count else ""},
    )


def compare_outputs(backend: str, got: dict, want: dict, tolerance: Tolerance, layout: dict | None = None,
                    items: list[str] | None = None) -> list[OutputComparison]:
    """Each output of `got` against the reference `want`, judged by `tolerance`; `tokens` also per token group
    (cls, registers, patches: the groups `layout` has), since a drifting register hides in the whole."""
    count = len(np.asarray(got["pooled"]))
    return accuracy_rows(backend, item_figures(got, want, layout), tolerance, items or sample_names(count))


def sample_names(count: int) -> list[str]:
    return [f"sample {index}" for index in range(count)]


def per_image_figures(figures: dict[tuple[str, str], dict]) -> dict[str, dict[str, list]]:
    """{"pooled": {"cosine": [...], "rel_error": [...]}, "tokens[registers]": {...}}: one value per item, in input order."""
    return {f"{output}[{group}]" if group else output: {name: np.asarray(found[name]).tolist() for name in ("cosine", "rel_error")}
            for (output, group), found in figures.items() if "cosine" in found}


def neighbour_row(backend: str, reference: np.ndarray, embeddings: np.ndarray, tolerance: Tolerance,
                  items: list[str] | None = None) -> NeighbourComparison:
    """Neighbour agreement of one backend's pooled embeddings with the reference's (recall@k: `overlap`), judged by
    its class; and how many of the reference's rankings this backend's error could flip (`items` name the queries)."""
    found = metrics.neighbours(reference, embeddings, NEIGHBOURS_K)
    margins = metrics.neighbour_margins(reference, embeddings, NEIGHBOURS_K)
    closest = margins["min_margin_query"]
    named = "" if closest is None else (items[closest] if items and closest < len(items) else f"sample {closest}")
    if found["k"] < 1:  # nothing to judge: never a PASS on nothing
        passed, note = None, f"not judged: {len(reference)} image{'s' if len(reference) != 1 else ''}, neighbours need at least 2"
    else:
        passed, note = tolerance.judge_neighbours(found["overlap"], found["nearest_unchanged"]).passed, ""
    return NeighbourComparison(backend=backend, k=found["k"], overlap=found["overlap"], nearest_unchanged=found["nearest_unchanged"],
                               tolerance=tolerance.name, min_overlap=tolerance.min_overlap, min_nearest=tolerance.min_nearest,
                               passed=passed, note=note, flippable=margins["flippable"], min_margin=margins["min_margin"],
                               min_margin_error=margins["min_margin_error"], min_margin_query=named,
                               median_margin=margins["median_margin"], median_error=margins["median_error"])


def stability_rows(found: dict[str, dict[str, np.ndarray]], outputs: dict[str, dict], judged: dict[str, Tolerance],
                   layout: dict | None) -> list[StabilityComparison]:
    """--stability (compare/worker.py stability): each backend against itself, judged by its own class. "repeat": the
    batch run again against its first run; "batch": its first item alone against the same item among companions, at
    each position, the position that changed it most kept. A row per check and backend: its worst row (output or
    token group); passed when every row passes."""
    rows = []
    for name, arrays in found.items():
        if name not in judged or name not in outputs:
            continue
        tolerance = judged[name]

        def worst_of(got: dict, want: dict):
            figures = judging.judge_rows(judging.item_figures(got, want, layout), tolerance)
            identical = all(np.array_equal(np.asarray(got[o]), np.asarray(want[o])) for o in got)
            diff = max(float(np.max(np.abs(np.asarray(got[o], np.float64) - np.asarray(want[o], np.float64)))) for o in got)
            return judging.worst(figures), all(r.passed for r in figures), identical, diff

        again = {o: arrays[f"again/{o}"] for o in OUTPUTS if f"again/{o}" in arrays}
        if set(again) == set(OUTPUTS):
            worst, passed, identical, diff = worst_of(again, {o: outputs[name][o] for o in OUTPUTS})
            rows.append(StabilityComparison(name, "repeat", worst.label, identical, diff, worst.cosine, worst.rel_error,
                                            tolerance.name, passed, reason=worst.reason))
        alone = {o: arrays[f"alone/{o}"] for o in OUTPUTS if f"alone/{o}" in arrays}
        positions = sorted({int(k.split("/")[0][2:]) for k in arrays if k.startswith("at")})
        if set(alone) == set(OUTPUTS) and positions:
            found_at = [(p, *worst_of({o: arrays[f"at{p}/{o}"] for o in OUTPUTS}, alone)) for p in positions]
            position, worst, _, _, diff = max(found_at, key=lambda f: (f[4], 1 - f[1].cosine))
            copies = {o: np.asarray(arrays[f"copies/{o}"], np.float64) for o in OUTPUTS if f"copies/{o}" in arrays}
            companions = max((float(np.max(np.abs(np.asarray(arrays[f"at{p}/{o}"], np.float64) - copies[o][p:p + 1])))
                              for p in positions for o in copies), default=None)
            rows.append(StabilityComparison(name, "batch", worst.label, all(f[3] for f in found_at),
                                            max(f[4] for f in found_at), min(f[1].cosine for f in found_at),
                                            max(f[1].rel_error for f in found_at), tolerance.name,
                                            all(f[2] for f in found_at), position=position, reason=worst.reason,
                                            companions_max_abs=companions))
    return rows


def truth_rows(images: dict[str, dict[str, np.ndarray]], reference: str, truth: str) -> list[TruthComparison]:
    """Every backend's error against the truth over all items: sqrt(sum |a-t|^2 / sum |t|^2), and its ratio to
    the reference's (the truth's figures of each backend, as `wire` wrote them under "truth")."""
    errors = {}
    for name, arrays in images.items():
        for (output, group), found in from_wire(arrays, "truth").items():
            if group == "" and "sq_diff" in found:
                total = metrics.over_samples(found)
                errors[(name, output)] = total["rel_error"]
    return [TruthComparison(name, output, rel, rel / errors[(reference, output)] if errors.get((reference, output)) else None, truth)
            for (name, output), rel in errors.items()]


def size_rows(sizes: dict[str, dict[str, np.ndarray]], want: dict, reference: str, accuracy: list[OutputComparison],
              judged: dict[str, Tolerance], layout: dict | None) -> list[OutputComparison]:
    """--batch-sizes: each backend's outputs at every other size, against the reference's for the same rows (the
    accuracy batch cycled to that size, as the latency run feeds it); one row per output whose judgement differs
    from the accuracy batch's (onnxruntime#10636, TensorRT#1697: some failures appear only at some sizes)."""
    at_batch = {(row.backend, row.output, row.group): row.passed for row in accuracy}
    rows = []
    for name, found in sizes.items():
        if name == reference or name not in judged:
            continue
        for size in sorted({int(key.split("/")[0]) for key in found}):
            got = {output: found[f"{size}/{output}"] for output in OUTPUTS if f"{size}/{output}" in found}
            if set(got) != set(OUTPUTS):
                continue
            cycled = np.resize(np.arange(len(want["pooled"])), size)
            for row in compare_outputs(name, got, {o: np.asarray(want[o])[cycled] for o in OUTPUTS}, judged[name], layout):
                if row.passed != at_batch.get((name, row.output, row.group), True):
                    rows.append(replace(row, batch=size))
    return rows


def judged_by(name: str, statuses: list[BackendStatus], stored, min_cosine: float | None, max_rel: float | None) -> Tolerance:
    """The tolerance of a backend: its class, and the precision it really ran in (as it reported)."""
    if stored is None or name not in stored.outputs:
        status = next(s for s in statuses if s.name == name)
        # a variant graph is judged by its own class; anything else by its backend's, in the precision it ran in
        backend_class, precision = (status.variant_class or split(name)[0].tolerance), status.ran_in
    else:
        backend_class, precision = stored.tolerance_class(name), stored.precision(name)
    return tolerance_for(backend_class, precision, min_cosine, max_rel)
