"""The search for what must stay in float in a reduced-precision graph: the smallest list, by block scope,
then by a finer unit (the op type for fp16; the module, e.g. blocks.2.mlp.fc2, for int8).

In the manner of Polygraphy's `debug precision` and onnxconverter-common's
`auto_convert_mixed_precision`, but minimal, not just sufficient: first over the model's scopes
(blocks.0 .. blocks.N, patch_embed, norm, head...), then over (scope, op type) pairs inside the scopes
it kept, halves dropped while one can be, then each entry tried once (`minimize`; for int8 the entries with
the most weights first, so that costly modules are quantized where cheap ones in float suffice). It ends when
removing any single entry fails, so every entry of the list is needed. The trials (what was kept fp32, did it pass, the worst
figures) are returned to be printed and recorded.

`judge(nodes)` builds the fp16 graph with those node names kept fp32 and says whether it passes its
class on the verify inputs; it is the only part that touches onnx and onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Search:
    """The units of one level, how each maps to node names, and every trial so far."""

    judge: Callable[[frozenset], tuple[bool, dict]]
    trials: list[dict] = field(default_factory=list)
    seen: dict = field(default_factory=dict)
    step: Callable[[str], None] = lambda message: None

    def passes(self, entries: list[str], nodes: frozenset) -> bool:
        if nodes not in self.seen:
            passed, figures = self.judge(nodes)
            self.seen[nodes] = passed
            self.trials.append({"keep_fp32": list(entries), "nodes": len(nodes), "passed": passed, **figures})
            self.step(f"trial {len(self.trials)}: {len(entries)} entries ({len(nodes)} nodes) fp32: "
                      f"{'pass' if passed else 'fail'}")
        return self.seen[nodes]


def minimize(units: list[str], nodes_of: Callable[[list[str]], frozenset], search: Search,
             cost: Callable[[frozenset], float] | None = None) -> list[str]:
    """A sublist of `units` (which passes) that still passes and from which no single unit can be removed: halves
    are dropped while one can be (cheap when most units are not needed), then each unit is tried once, in order (a
    unit whose removal failed from a larger list fails from a smaller one: keeping less in float never helps).
    With `cost` (of a unit's nodes), the costliest units come first, so they are the first tried for removal: where
    a costly unit or some cheap ones suffice, the cheap ones are kept (an fc2 kept in float costs four times a proj).
    The list returned keeps the order of `units`.

    About len(units) trials where most units are needed: for dinov3's int8 graph at half its class's budget (12 blocks,
    then 4 modules each; random weights, an AVX2 host) ddmin's complements took 130 trials, this 42."""
    order = list(units)
    if cost is not None:
        units = sorted(units, key=lambda unit: -cost(nodes_of([unit])))  # stable: equal costs keep their order
    while len(units) >= 2:
        half = len(units) // 2
        for chunk in (units[:half], units[half:]):
            rest = [u for u in units if u not in chunk]
            if search.passes(rest, nodes_of(rest)):
                units = rest
                break
        else:
            break
    for unit in list(units):
        rest = [u for u in units if u != unit]
        if rest and search.passes(rest, nodes_of(rest)):  # the empty list is the plain recipe, which failed first
            units = rest
    return [unit for unit in order if unit in units]


def search(graph_nodes: list[tuple[str, str, str]], judge, step=lambda message: None,
           label=lambda scope, unit: f"{scope}/{unit}", start: list[str] | None = None,
           node_cost: dict[str, float] | None = None) -> dict:
    """The smallest list for a graph whose nodes are (name, scope, unit), judged by `judge`: first by scope,
    then by (scope, unit) inside the scopes kept, each entry named `label(scope, unit)`.

    `start`: entries another graph of the same model needed (int8-fused after int8: the same modules). When they
    pass here, the search only removes from them (each entry tried once, so every entry left is still needed:
    about len(start) trials instead of a search from scratch); when not, it searches from scratch.

    `node_cost`: what keeping each node in float costs (its weights' size for an int8 MatMul); at every level the
    costliest units are tried for removal first (`minimize`). Without it, the graph's order.

    Returns {"keep_fp32": ["blocks.2/MatMul", ...], "nodes": [names], "trials": [...], "passed": bool}.
    passed is False when even keeping every node fails (not a precision problem).
    """
    cost = None if node_cost is None else (lambda nodes: sum(node_cost.get(name, 0) for name in nodes))
    by_scope: dict[str, list] = {}
    for name, scope, op in graph_nodes:
        by_scope.setdefault(scope, []).append((name, op))
    found = Search(judge, step=step)
    if found.passes([], frozenset()):
        return {"keep_fp32": [], "nodes": [], "trials": found.trials, "passed": True}
    scopes = list(by_scope)
    every = {label(scope, op): (scope, op) for scope in scopes for _, op in by_scope[scope]}
    known = [entry for entry in dict.fromkeys(start or ()) if entry in every]

    def entry_nodes(kept):
        wanted = {every[entry] for entry in kept}
        return frozenset(name for scope in scopes for name, op in by_scope[scope] if (scope, op) in wanted)

    if known and found.passes(known, entry_nodes(known)):
        kept = minimize(known, entry_nodes, found, cost)
        return {"keep_fp32": kept, "nodes": sorted(entry_nodes(kept)), "trials": found.trials, "passed": True,
                "started_from": known}

    def scope_nodes(kept):
        return frozenset(name for scope in kept for name, _ in by_scope[scope])

    if not found.passes(scopes, scope_nodes(scopes)):
        return {"keep_fp32": scopes, "nodes": sorted(scope_nodes(scopes)), "trials": found.trials, "passed": False}
    scopes = minimize(scopes, scope_nodes, found, cost)
    units = {label(scope, op): (scope, op) for scope in scopes for op in dict.fromkeys(op for _, op in by_scope[scope])}
    pairs = list(units)

    def pair_nodes(kept):
        wanted = {units[entry] for entry in kept}
        return frozenset(name for scope in scopes for name, op in by_scope[scope] if (scope, op) in wanted)

    pairs = minimize(pairs, pair_nodes, found, cost)
    return {"keep_fp32": pairs, "nodes": sorted(pair_nodes(pairs)), "trials": found.trials, "passed": True}
