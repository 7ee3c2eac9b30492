"""One judgement from export to verdict: the rows a comparison judges and how each is judged.

A row is one output, or one token group of `tokens` (cls, registers, patches), since a drifting register
hides in the whole. Every item (an image, a sample) gets its own figures (`item_figures`), and a row is
judged by its tolerance class on the whole and on its worst item (`judge_row`). The exporter's verify of
every variant, its searches for what stays in float, and compare's verdict all call these, so a graph the
manifest calls verified was judged over the same rows, by the same rule, that compare judges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from . import metrics, registry
from .artifact import OUTPUT_NAMES
from .tolerances import Tolerance

SHAPE, REFERENCE_SHAPE = "shape", "reference_shape"  # per (output, group): one item's shape, the backend's and the reference's


def parts(output: str, layout: dict | None) -> dict[str, slice]:
    """The slices of one output the rows judge: the whole (""), and for tokens each token group of the layout."""
    found = {"": slice(None)}
    if output == "tokens":
        found.update(registry.token_groups(layout))
    return found


def label(output: str, group: str) -> str:
    """A row's name in every table and message: pooled, tokens, tokens[cls]."""
    return f"{output}[{group}]" if group else output


def item_figures(got: dict, want: dict, layout: dict | None, outputs: tuple[str, ...] = OUTPUT_NAMES
                 ) -> dict[tuple[str, str], dict]:
    """{(output, group): per-item figures of `got` against `want` (metrics.per_sample), with each item's shape}.
    Shapes that differ give the shapes alone: the row says so."""
    found = {}
    for output in outputs:
        a, b = np.asarray(got[output]), np.asarray(want[output])
        for group, part in parts(output, layout).items():
            if a.shape != b.shape:
                if group == "":
                    found[(output, group)] = {SHAPE: list(a.shape[1:]), REFERENCE_SHAPE: list(b.shape[1:]), "count": len(a)}
                continue
            x, y = a[:, part], b[:, part]
            found[(output, group)] = {**metrics.per_sample(x, y), SHAPE: list(x.shape[1:]), REFERENCE_SHAPE: list(y.shape[1:])}
    return found


def concatenate(chunks: list[dict[tuple[str, str], dict]]) -> dict[tuple[str, str], dict]:
    """The figures of consecutive batches as one: per-item arrays joined, shapes kept from the first batch."""
    lists: dict[tuple[str, str], dict] = {}
    for chunk in chunks:
        for key, found in chunk.items():
            into = lists.setdefault(key, {SHAPE: found[SHAPE], REFERENCE_SHAPE: found[REFERENCE_SHAPE]})
            for name, value in found.items():
                if name not in (SHAPE, REFERENCE_SHAPE):
                    into.setdefault(name, []).append(np.asarray(value))
    return {key: {name: value if name in (SHAPE, REFERENCE_SHAPE) else np.concatenate(value) for name, value in found.items()}
            for key, found in lists.items()}


def select(figures: dict[tuple[str, str], dict], items) -> dict[tuple[str, str], dict]:
    """The same figures for the items at the indices `items` only (a held-out set among the verify inputs)."""
    index = np.asarray(list(items), dtype=np.int64)
    return {key: {name: value if name in (SHAPE, REFERENCE_SHAPE) or np.ndim(value) == 0 else np.asarray(value)[index]
                  for name, value in found.items()} for key, found in figures.items()}


@dataclass(frozen=True)
class RowJudgement:
    """One row judged: the figures judged (the lowest cosine and the largest relative error of the whole and the
    worst item), whether they pass, each failed limit, and the share of the class's error budget left (`margin`:
    1 for a perfect row, 0 at the limit, below 0 failing)."""

    output: str
    group: str
    cosine: float
    rel_error: float
    nonfinite: int
    shape_match: bool
    passed: bool
    reason: str
    margin: float
    totals: dict  # metrics.over_samples of the row (empty when the shapes differ)

    @property
    def label(self) -> str:
        return label(self.output, self.group)


def _nan_min(*values: float) -> float:
    return float("nan") if any(math.isnan(v) for v in values) else min(values)


def _nan_max(*values: float) -> float:
    return float("nan") if any(math.isnan(v) for v in values) else max(values)


def margin(tolerance: Tolerance, cosine: float, rel_error: float) -> float:
    """The share of the error budget still unused by the worse of the two limits: (cos - min) / (1 - min) and
    (max_rel - rel) / max_rel. NaN figures give -inf."""
    if not (np.isfinite(cosine) and np.isfinite(rel_error)):
        return -math.inf
    shares = [(tolerance.max_rel - rel_error) / tolerance.max_rel] if math.isfinite(tolerance.max_rel) else []
    if tolerance.min_cosine < 1:
        shares.append((cosine - tolerance.min_cosine) / (1 - tolerance.min_cosine))
    return float(min(shares, default=1.0))


def judge_row(output: str, group: str, found: dict, tolerance: Tolerance) -> RowJudgement:
    """Judge one row's per-item figures by `tolerance`: the whole and the worst item must both pass."""
    nan = float("nan")
    if "cosine" not in found:  # the shapes differ: nothing to measure
        judged = tolerance.judge(nan, nan, 0, shape_match=False)
        return RowJudgement(output, group, nan, nan, 0, False, judged.passed, judged.reason, -math.inf, {})
    total = metrics.over_samples(found)
    cos, rel = _nan_min(total["cosine"], total["worst_cosine"]), _nan_max(total["rel_error"], total["worst_rel_error"])
    judged = tolerance.judge(cos, rel, total["nonfinite"])
    return RowJudgement(output, group, cos, rel, total["nonfinite"], True, judged.passed, judged.reason,
                        margin(tolerance, cos, rel) if not total["nonfinite"] else -math.inf, total)


def judge_rows(figures: dict[tuple[str, str], dict], tolerance: Tolerance) -> list[RowJudgement]:
    """Every row of `figures` (item_figures, or several batches' concatenated) judged by `tolerance`, in order."""
    return [judge_row(output, group, found, tolerance) for (output, group), found in figures.items()]


def worst(rows: list[RowJudgement]) -> RowJudgement:
    """The row closest to failing (or failing by most): the smallest margin, the first of equals."""
    return min(rows, key=lambda row: row.margin)


def with_margin(tolerance: Tolerance, share: float) -> Tolerance:
    """`tolerance` with only `share` of its error budget (1 - min_cosine, max_rel): what a search aims for so that
    the graph it finds passes the class itself on inputs it never judged."""
    return replace(tolerance, name=f"{tolerance.name} x{share:g} budget", min_cosine=1 - (1 - tolerance.min_cosine) * share,
                   max_rel=tolerance.max_rel * share)
