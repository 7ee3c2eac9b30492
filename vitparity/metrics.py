"""Agreement metrics between two arrays: pure numpy functions with explicit edge cases."""
from __future__ import annotations

import numpy as np


def _as_float(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def nonfinite_count(a) -> int:
    """The number of NaN and Inf values in `a`."""
    a = np.asarray(a)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.inexact):
        return 0
    return int(np.size(a) - np.count_nonzero(np.isfinite(a)))


def cosine(a, b) -> float:
    """Cosine similarity of the flattened arrays. Two all-zero arrays agree (1.0); one zero array gives 0.0.

    NaN or Inf in either array gives NaN.
    """
    a, b = _as_float(a).ravel(), _as_float(b).ravel()
    if a.size != b.size:
        raise ValueError(f"cosine needs equal sizes, got {a.size} and {b.size}")
    if a.size == 0:
        return 1.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def worst_sample_cosine(a, b) -> float:
    """The lowest cosine over the samples of axis 0 (the batch)."""
    a, b = _as_float(a), _as_float(b)
    if a.ndim == 0 or a.shape[0] == 0:
        return cosine(a, b)
    return min(cosine(x, y) for x, y in zip(a, b))


class Agreement:
    """`cosine`, `worst_sample_cosine`, `relative_error` and `nonfinite_count` of `a` against the reference `b`,
    accumulated over chunks of rows (axis 0), so that many samples never need to be in memory at once. The
    figures equal those of the whole arrays (float64 sums; the order of summation may differ in the last bits)."""

    def __init__(self):
        self.dot = self.aa = self.bb = self.diff = 0.0
        self.worst = float("inf")
        self.nonfinite = 0
        self.size = 0

    def add(self, a, b) -> None:
        a, b = _as_float(a), _as_float(b)
        if a.shape != b.shape:
            raise ValueError(f"agreement needs equal shapes, got {a.shape} and {b.shape}")
        self.nonfinite += nonfinite_count(a)
        self.size += a.size
        if a.size == 0:
            return
        self.worst = min(self.worst, worst_sample_cosine(a, b))
        flat_a, flat_b = a.ravel(), b.ravel()
        self.dot += float(np.dot(flat_a, flat_b))
        self.aa += float(np.dot(flat_a, flat_a))
        self.bb += float(np.dot(flat_b, flat_b))
        self.diff += float(np.dot(flat_a - flat_b, flat_a - flat_b))

    @property
    def cosine(self) -> float:
        if self.size == 0:
            return 1.0
        if not all(np.isfinite(v) for v in (self.dot, self.aa, self.bb)):
            return float("nan")
        return _cosine_of_sums(self.dot, self.aa, self.bb)

    @property
    def worst_sample_cosine(self) -> float:
        return self.cosine if self.worst == float("inf") else self.worst

    @property
    def relative_error(self) -> float:
        return _relative_error_of_sums(self.diff, self.bb)


def _cosine_of_sums(dot: float, aa: float, bb: float) -> float:
    """The cosine from sum a.b, sum a.a and sum b.b, with `cosine`'s edge cases: both zero 1.0, one zero 0.0."""
    if aa == 0 and bb == 0:
        return 1.0
    if aa == 0 or bb == 0:
        return 0.0
    return float(np.clip(dot / np.sqrt(aa * bb), -1.0, 1.0))


def _relative_error_of_sums(diff: float, bb: float) -> float:
    """||a - b|| / ||b|| from sum |a-b|^2 and sum |b|^2: 0.0 when both are zero, Inf when only b is."""
    if bb == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(np.sqrt(diff) / np.sqrt(bb))


def max_abs_diff(a, b) -> float:
    """The largest |a - b|; 0.0 for empty arrays, NaN when a NaN is involved."""
    d = np.abs(_as_float(a) - _as_float(b))
    return float(d.max()) if d.size else 0.0


def mean_abs_diff(a, b) -> float:
    """The mean |a - b|; 0.0 for empty arrays."""
    d = np.abs(_as_float(a) - _as_float(b))
    return float(d.mean()) if d.size else 0.0


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| with `b` the reference. 0.0 when both are zero, Inf when only `b` is."""
    a, b = _as_float(a), _as_float(b)
    diff = np.linalg.norm((a - b).ravel())
    ref = np.linalg.norm(b.ravel())
    if ref == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / ref)


def error_quantiles(a, b, quantiles=(0.5, 0.99)) -> list[float]:
    """The given quantiles of |a - b| over every element, then its max; NaNs when a value is not finite."""
    d = np.abs(_as_float(a) - _as_float(b)).ravel()
    if d.size == 0:
        return [0.0] * (len(quantiles) + 1)
    if not np.isfinite(d).all():
        return [float("nan")] * (len(quantiles) + 1)
    return [float(v) for v in np.quantile(d, quantiles)] + [float(d.max())]


def _ceil_2(x: float) -> float:
    """`x` > 0 rounded up to 2 significant digits: 3.07e-3 -> 3.1e-3."""
    exponent = int(np.floor(np.log10(x))) - 1
    step = 10.0 ** exponent
    return float(np.ceil(round(x / step, 9)) * step)


def loosest_passing(cosine_value: float, rel_error: float) -> tuple[float | None, float | None]:
    """The strictest thresholds that these figures still pass, in 2 significant digits of error:
    (min cosine, max relative error), e.g. (0.9971, 3.1e-3) for cosine 0.99713 and rel 3.07e-3.

    Fed back as --min-cosine / --max-rel they pass; one step stricter in the last digit (0.9972,
    3.0e-3) they fail. None where no threshold passes (NaN), and for a cosine of exactly 1 or a
    relative error of 0, which every threshold passes.
    """
    cos = None
    if np.isfinite(cosine_value) and cosine_value < 1.0:
        cos = 1.0 - _ceil_2(1.0 - float(cosine_value)) if cosine_value > 0 else None
        if cos is not None and cos > cosine_value:  # float rounding of 1 - x: never claim more than was measured
            cos = float(np.nextafter(cosine_value, 0.0))
    rel = _ceil_2(float(rel_error)) if np.isfinite(rel_error) and rel_error > 0 else None
    return cos, rel


def per_sample(a, b) -> dict[str, np.ndarray]:
    """Agreement of each sample (axis 0) of `a` with the same sample of the reference `b`, as float64 arrays:
    cosine, rel_error, max_abs, mean_abs, p50 and p99 of |a-b|, nonfinite, and the sums (dot, sq_got, sq_ref,
    sq_diff) from which the figures over many samples are exact (`over_samples`).

    The same edge cases as the functions above, sample by sample, vectorised: it runs on every batch of
    an --images run.
    """
    a, b = _as_float(a), _as_float(b)
    count = a.shape[0]
    a, b = a.reshape(count, -1), b.reshape(count, -1)
    finite = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    diff = a - b
    sq_diff, sq_ref = np.einsum("ij,ij->i", diff, diff), np.einsum("ij,ij->i", b, b)
    sq_got, dot = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", a, b)
    norm_a, norm_b = np.sqrt(sq_got), np.sqrt(sq_ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.clip(dot / (norm_a * norm_b), -1.0, 1.0)
        rel = np.sqrt(sq_diff) / norm_b
    cos = np.where((norm_a == 0) & (norm_b == 0), 1.0, np.where((norm_a == 0) | (norm_b == 0), 0.0, cos))
    rel = np.where(norm_b == 0, np.where(sq_diff == 0, 0.0, np.inf), rel)
    size = a.shape[1]
    if size == 0:
        cos, rel = np.ones(count), np.zeros(count)
    cos[~finite & (size > 0)] = np.nan
    absolute = np.abs(diff)
    quantiles = np.full((count, 2), np.nan)
    if size and finite.any():
        quantiles[finite] = np.quantile(absolute[finite], (0.5, 0.99), axis=1).T
    return {
        "cosine": cos, "rel_error": rel,
        "max_abs": absolute.max(axis=1) if size else np.zeros(count),
        "mean_abs": absolute.mean(axis=1) if size else np.zeros(count),
        "nonfinite": (~np.isfinite(a)).sum(axis=1).astype(np.float64),
        "sq_diff": sq_diff, "sq_ref": sq_ref, "sq_got": sq_got, "dot": dot, "p50": quantiles[:, 0], "p99": quantiles[:, 1],
    }


def over_samples(figures: dict[str, np.ndarray]) -> dict[str, float]:
    """The figures of many samples taken as one array, from `per_sample`'s: the flattened cosine and relative
    error (exactly those of the whole arrays, by their sums), max and mean |a-b|, and NaN/Inf count; plus the
    worst sample's cosine and relative error. NaN where a sample is not finite, as `cosine` gives."""
    cos, rel = np.asarray(figures["cosine"]), np.asarray(figures["rel_error"])
    nonfinite = int(np.sum(figures["nonfinite"]))
    found = {"nonfinite": nonfinite, "max_abs": float(np.max(figures["max_abs"])) if len(cos) else 0.0,
             "mean_abs": float(np.mean(figures["mean_abs"])) if len(cos) else 0.0}
    if len(cos) == 0:
        return {**found, "cosine": 1.0, "rel_error": 0.0, "worst_cosine": 1.0, "worst_rel_error": 0.0}
    if not np.isfinite(cos).all():
        nan = float("nan")
        return {**found, "cosine": nan, "rel_error": nan, "worst_cosine": nan, "worst_rel_error": nan}
    dot, got, ref, diff = (float(np.sum(figures[key])) for key in ("dot", "sq_got", "sq_ref", "sq_diff"))
    return {**found, "cosine": _cosine_of_sums(dot, got, ref), "rel_error": _relative_error_of_sums(diff, ref),
            "worst_cosine": float(np.min(cos)), "worst_rel_error": float(np.max(rel))}


def neighbours(reference, other, k: int, chunk: int = 64) -> dict[str, float]:
    """How well `other`'s k nearest neighbours (by cosine, each row among the others) keep the reference's:
    mean overlap@k, and the share of rows whose nearest neighbour is unchanged. Ties in the reference's
    similarities count as agreement: a neighbour as close as the reference's k-th (or 1st) is a right one.

    Rows go `chunk` at a time and top-k is a partition, not a sort, so the memory beyond the embeddings
    is a few chunk x N arrays (5 MB each for 10,000 images).
    """
    ref, got = _unit(reference), _unit(other)
    count = ref.shape[0]
    if count < 2:
        return {"k": 0, "overlap": float("nan"), "nearest_unchanged": float("nan")}
    k = min(k, count - 1)
    overlaps, same_nearest = [], []
    for start in range(0, count, chunk):
        rows = np.arange(start, min(start + chunk, count))
        ref_sim, got_sim = ref[rows] @ ref.T, got[rows] @ got.T
        ref_sim[np.arange(len(rows)), rows] = -np.inf  # a row is not its own neighbour
        got_sim[np.arange(len(rows)), rows] = -np.inf
        got_top = np.argpartition(-got_sim, k - 1, axis=1)[:, :k]  # the k nearest, in no order
        got_first = np.argmax(got_sim, axis=1)
        ordered = -np.partition(-ref_sim, (0, k - 1), axis=1)  # ordered[:, 0] the nearest, [:, k-1] the k-th
        chosen = np.take_along_axis(ref_sim, got_top, axis=1)
        overlaps.append((chosen >= ordered[:, k - 1:k]).sum(axis=1) / k)
        same_nearest.append(ref_sim[np.arange(len(rows)), got_first] >= ordered[:, 0])
    return {"k": int(k), "overlap": float(np.concatenate(overlaps).mean()),
            "nearest_unchanged": float(np.concatenate(same_nearest).mean())}


def neighbour_margins(reference, other, k: int, chunk: int = 64) -> dict:
    """How close each query's ranking is to flipping, against how far `other` is from the reference.

    For each row (a query, among the others): its margin, the gap between the reference's similarity to its k-th and
    to its (k+1)-th neighbour; its error, the largest change of its similarities in `other` (|cos_other - cos_ref|
    over every other row). A ranking the error can flip is one whose margin is at most twice its error (the k-th
    may fall by the error while the (k+1)-th rises by it). Returns k, the count of queries, of flippable rankings,
    the smallest margin and its query's error, and the median margin and error. Needs k + 2 rows (else k 0).
    """
    ref, got = _unit(reference), _unit(other)
    count = ref.shape[0]
    k = min(k, count - 2)
    if k < 1:
        return {"k": 0, "queries": int(count), "flippable": 0, "min_margin": None, "min_margin_error": None,
                "min_margin_query": None, "median_margin": None, "median_error": None}
    margins, errors = [], []
    for start in range(0, count, chunk):
        rows = np.arange(start, min(start + chunk, count))
        ref_sim, got_sim = ref[rows] @ ref.T, got[rows] @ got.T
        error = np.abs(got_sim - ref_sim)
        error[np.arange(len(rows)), rows] = 0.0
        ref_sim[np.arange(len(rows)), rows] = -np.inf  # a row is not its own neighbour
        ordered = -np.partition(-ref_sim, (k - 1, k), axis=1)  # [:, k-1] the k-th nearest, [:, k] the (k+1)-th
        margins.append(ordered[:, k - 1] - ordered[:, k])
        errors.append(error.max(axis=1))
    margin, error = np.concatenate(margins), np.concatenate(errors)
    closest = int(np.argmin(margin))
    return {"k": int(k), "queries": int(count), "flippable": int((margin <= 2 * error).sum()),
            "min_margin": float(margin[closest]), "min_margin_error": float(error[closest]), "min_margin_query": closest,
            "median_margin": float(np.median(margin)), "median_error": float(np.median(error))}


def _unit(x) -> np.ndarray:
    x = _as_float(x).reshape(np.shape(x)[0], -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)
