"""Per-block comparison: where along the network the backends start to disagree. Pure: arrays in, rows out."""
from __future__ import annotations

import numpy as np

from vitparity import metrics, registry

from .results import LayerComparison, PartComparison


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
        # A tap passes as an accuracy row does: the whole and every token group (a drifting register hides in the whole).
        passed = _passes(whole, tolerance) and all(figures["passed"] for figures in per_group.values())
        rows.append(LayerComparison(backend=backend, layer=layer, passed=passed, groups=per_group, **whole))
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


def drift_line(backend: str, rows: list[LayerComparison], tolerance, failing: bool = False) -> str:
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
    if first is None and failing:  # never "no drift" beside a FAIL: the taps saw less than the outputs' rows
        return (f"{backend}: every tap is within {tolerance.name} thresholds, yet its outputs fail: the error the verdict "
                f"sees is added after the last tap (pooling, the head) or only on other inputs" + where_group)
    if first is None:
        return f"{backend}: no drift: every block within {tolerance.name} thresholds" + where_group
    where = first.layer.replace("_", " ")
    nan = f", {first.nonfinite} NaN/Inf" if first.nonfinite else ""
    figures = first.groups.get(group[0]) if group and group[1] is first else None
    if figures is not None and _passes({k: getattr(first, k) for k in ("cosine", "rel_error", "nonfinite")}, tolerance):
        # the whole tap passes: say the group that fails there, with its own figures
        return (f"{backend}: drift starts at {where} in the {group[0]} tokens (cos {figures['cosine']:.4f}, rel err "
                f"{figures['rel_error']:.2e}{nan})" + where_group)
    return f"{backend}: drift starts at {where} (cos {first.cosine:.4f}, rel err {first.rel_error:.2e}{nan})" + where_group


def compare_layers(taps: dict[str, dict], reference: str, tolerances: dict, layout: dict | None = None,
                   failing: frozenset = frozenset()) -> tuple[list[LayerComparison], dict[str, str]]:
    """Every backend's taps against the reference's, each judged by its own tolerance; `failing` names the backends
    whose accuracy rows fail (their line never says "no drift"). Returns (rows, drift lines)."""
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
        drift[name] = drift_line(name, backend_rows, tolerances[name], name in failing)
    return rows, drift


def _local(figures: dict) -> tuple[float, float]:
    """(rel error, cosine) of a replayed block, NaN/Inf counted as the largest error."""
    rel = figures["rel_error"]
    bad = figures["nonfinite"] or not np.isfinite(rel)
    return (float("inf") if bad else rel), -figures.get("cosine", 1.0)


def localise(rows: list[LayerComparison], replays: dict[str, dict], tolerances: dict, runs: dict[str, dict]
             ) -> tuple[list[LayerComparison], list[PartComparison], dict[str, str], dict[str, str]]:
    """--replay: each block's local error (run on the reference's input to it) next to its accumulated one, the
    block whose own error is largest opened part by part, and what to try. `replays`: each backend's figures from
    its worker ({"block_5": {"": whole, "mlp.fc1": ...}}); `runs`: how each ran ({"precision", "variant"}).
    Returns (rows with local figures, the opened blocks' part rows, one sentence per backend, advice per backend)."""
    from dataclasses import replace

    # The figures crossed the worker boundary as strict JSON: NaN came back as None.
    replays = {backend: {layer: {part: {k: (float("nan") if v is None else v) for k, v in figures.items()}
                                 for part, figures in parts.items()} for layer, parts in blocks.items()}
               for backend, blocks in replays.items()}
    rows = [replace(row, local_cosine=replays[row.backend][row.layer][""]["cosine"],
                    local_rel_error=replays[row.backend][row.layer][""]["rel_error"])
            if row.layer in replays.get(row.backend, {}) else row for row in rows]
    parts, found, advice = [], {}, {}
    for backend, blocks in replays.items():
        if not blocks:
            continue
        tolerance = tolerances[backend]
        layer = max(blocks, key=lambda name: _local(blocks[name][""]))
        opened = [PartComparison(backend, layer, part, f["cosine"], f["rel_error"], f["max_abs"], f["nonfinite"],
                                 tolerance.judge(f["cosine"], f["rel_error"], f["nonfinite"]).passed)
                  for part, f in blocks[layer].items() if part]
        parts += opened
        whole = blocks[layer][""]
        block = layer.replace("_", "s.", 1)  # block_5 -> blocks.5, timm's own module name
        first = next((p for p in opened if not p.passed), None)
        worst = first or max(opened, key=lambda p: _local({"rel_error": p.rel_error, "nonfinite": p.nonfinite, "cosine": p.cosine}),
                              default=None)
        nan = f", {whole['nonfinite']} NaN/Inf" if whole["nonfinite"] else ""
        sentence = (f"{backend}: {block} makes the largest error of its own (local rel err {whole['rel_error']:.2e}, "
                    f"cos {whole['cosine']:.6f}{nan}, on the reference's input to it)")
        if worst is not None:
            sentence += (f"; inside it, {worst.part} " + ("drifts first" if first else "differs most")
                         + f" (rel err {worst.rel_error:.2e}" + (f", {worst.nonfinite} NaN/Inf" if worst.nonfinite else "") + ")")
        found[backend] = sentence
        passed = tolerance.judge(whole["cosine"], whole["rel_error"], whole["nonfinite"]).passed
        if not passed or any(not row.passed for row in rows if row.backend == backend):
            advice[backend] = advise(backend, block, worst.part if worst else "", worst, runs.get(backend, {}))
    return rows, parts, found, advice


NORMS = ("norm1", "norm2", "norm", "q_norm", "k_norm")
QUANTIZED = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # a block's weight matmuls: what int8 quantizes


def _int8_advice(block: str, part: str, where: str, variant: str, ran: dict) -> str:
    """A command that changes the int8 graph: keep the part's module in float (its block where the part is no
    quantized module, or the module is already kept), the search adding what else the class needs. Never a
    command that gives the same graph: with the block already in float there is nothing int8 to undo there."""
    kept = list(ran.get("kept", []))
    covered = lambda module: any(module == k or module.startswith(k + ".") for k in kept)  # noqa: E731
    module = where if part in QUANTIZED and not covered(where) else block
    if covered(module):
        return (f"{block} is already kept in float in the {variant} graph: its error is not int8's; compare the fp32 graph's "
                f"row (ort-cpu) and --truth fp64")
    return (f"{where} loses the most in int8: keep {module} in float: "
            f"{ran.get('export', 'python -m exporter MODEL --if-missing')} --variant {variant} --int8-keep {','.join([*kept, module])}")


def advise(backend: str, block: str, part: str, figures: PartComparison | None, ran: dict) -> str:
    """One line of what to try, from where the error was found and how the row ran (its precision or variant)."""
    where = f"{block}.{part}" if part else block
    leaf = part.rsplit(".", 1)[-1]
    overflow = bool(figures and figures.nonfinite)
    variant, precision = ran.get("variant", ""), ran.get("precision", "fp32")
    if variant.startswith("int8"):
        return _int8_advice(block, part, where, variant, ran)
    if variant == "fp16":
        keep = "Softmax" if part == "attn.softmax" else "LayerNormalization" if leaf in NORMS else "MatMul"
        kept = ran.get("kept") or ["LayerNormalization", "Pow", "ReduceMean", "Sqrt"]
        if keep in kept:
            return (f"{where} {'overflows' if overflow else 'drifts'} in the fp16 graph though {keep} is already fp32: let the "
                    f"search find the list: {ran.get('export', 'python -m exporter MODEL --if-missing')} --variant fp16 "
                    f"--search-precision")
        return (f"{where} {'overflows' if overflow else 'drifts'} in the fp16 graph: keep {keep} fp32: "
                f"{ran.get('export', 'python -m exporter MODEL --if-missing')} --variant fp16 --fp16-keep {','.join([*kept, keep])}")
    if precision == "fp16":
        if overflow:
            return (f"{where} overflows fp16 (values past 65504): run --dtype bf16, which keeps fp32's range, "
                    f"or --dtype fp32")
        return f"{where} drifts in fp16: run it in fp32 (--dtype fp32), or keep {leaf} in fp32 on the device"
    if precision == "bf16":
        return f"{where} drifts in bf16 (8 mantissa bits): run --dtype fp16 where the values fit, or --dtype fp32"
    if precision == "fast-math":
        return f"{where} drifts with the fp32 shortcuts on (TF32/HF32): run without --fast-math"
    return (f"{where} differs in true fp32 on {backend}: a kernel of that op on this device; keep the evidence with "
            f"--save-reference and report it to the device's vendor")
