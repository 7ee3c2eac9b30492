"""The comparator's results: frozen dataclasses that serialise to JSON as they are."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend ran here ("ran"), could not ("skipped"), broke while running ("error"),
    or was read from a saved reference ("stored")."""

    name: str
    status: str
    reason: str = ""
    details: dict = field(default_factory=dict)  # what is shown: flat facts as the runtime read them back
    # What drives the judgement, typed: the precision mode it ran in ("fp32" for a variant graph, which runs as written),
    # the class of its variant graph ("int8", "fp16", "same-host"; "" for model.onnx), and --replay's per-block figures.
    ran_in: str = "fp32"
    variant_class: str = ""
    replay: dict | None = None

    @classmethod
    def of(cls, name: str, status: str, reason: str, details: dict) -> "BackendStatus":
        """A status from what a worker (or a saved reference) reported: the typed fields taken out of its details."""
        shown = dict(details)
        replay = shown.pop("replay", None)
        variant_class = str(shown.get("variant_class") or "")
        ran_in = "fp32" if variant_class else str(shown.get("precision") or "fp32")
        return cls(name, status, reason, shown, ran_in, variant_class, replay if isinstance(replay, dict) else None)

    def switches(self) -> str:
        """The precision switches and provider options in force, as the backend read them back."""
        found = {**self.details.get("switches", {}), **self.details.get("provider_options", {})}
        return ", ".join(f"{key}={value}" for key, value in found.items())

    def throughput(self, count: int) -> str:
        """--images: "41.8 s of inference, 12.0 images/s", from the compute the worker timed over `count` images."""
        seconds = self.details.get("inference_s")
        return f"{seconds:.1f} s of inference, {count / seconds:.1f} images/s" if seconds else ""

    def placement(self) -> str:
        """Where the nodes ran, with the provider's share of kernel time, and the same for the --layers taps."""
        details = self.details
        taps = details.get("layers_placement_summary")
        return details.get("placement_summary", "-") + (f"; taps ({details.get('layers_graph')}): {taps}" if taps else "")


@dataclass(frozen=True)
class OutputComparison:
    """One output of one backend against the reference, with the tolerance that judged it."""

    backend: str
    output: str
    shape: list
    reference_shape: list
    shape_match: bool
    cosine: float
    worst_sample_cosine: float
    max_abs: float
    mean_abs: float
    rel_error: float
    nonfinite: int
    tolerance: str
    min_cosine: float
    max_rel: float
    passed: bool
    error_p50: float | None = None  # |a - b|: the median item's median, and the worst item's p99
    error_p99: float | None = None
    would_pass_min_cosine: float | None = None  # the strictest thresholds this row still passes (None: any)
    would_pass_max_rel: float | None = None
    group: str = ""  # a token group of `tokens` (cls, registers, patches); "" for the whole output
    # cosine and rel_error are those of the whole output (every item flattened), in every mode; worst_sample_cosine
    # is the worst item's. This holds the per-item distribution (count, cos_worst, cos_p1, cos_median, rel_median,
    # rel_worst) and the worst items by name (an image's path, or "sample 3" of a seeded batch).
    images: dict = field(default_factory=dict)
    batch: int | None = None  # --batch-sizes: a row at another batch size whose judgement differs from the accuracy batch's

    @property
    def label(self) -> str:
        """The output as tables name it: pooled, tokens, tokens[registers], and "pooled @ batch 3" at another size."""
        name = f"{self.output}[{self.group}]" if self.group else self.output
        return name if self.batch is None else f"{name} @ batch {self.batch}"

    def how_far(self) -> str:
        """E.g. "would pass at cos >= 0.9971, rel <= 3.1e-03; |a-b| p50 1.2e-05, p99 3.4e-04, max 1.0e-03"."""
        if not self.shape_match:
            return f"shapes differ: {self.shape} against {self.reference_shape}"
        if self.nonfinite:
            return f"{self.nonfinite} NaN/Inf values: no threshold passes"
        cos, rel = self.would_pass_min_cosine, self.would_pass_max_rel
        loosest = ", ".join(filter(None, [f"cos >= {cos:.6g}" if cos is not None else "",
                                          f"rel <= {rel:.2g}" if rel is not None else ""])) or "any threshold"
        quantiles = "" if self.error_p50 is None else (
            f"; |a-b| p50 {self.error_p50:.2e}, p99 {self.error_p99:.2e}, max {self.max_abs:.2e}")
        return f"would pass at {loosest}{quantiles}"


@dataclass(frozen=True)
class NeighbourComparison:
    """--images: how well a backend's pooled embeddings keep the reference's k nearest neighbours (by cosine)."""

    backend: str
    k: int
    overlap: float  # mean overlap@k over the images
    nearest_unchanged: float  # share of images whose nearest neighbour is the reference's
    tolerance: str
    min_overlap: float
    min_nearest: float
    passed: bool | None  # None: not judged (fewer than 2 images have no neighbours), `note` says so
    note: str = ""
    # How close the reference's rankings are to flipping (vitparity/metrics.py neighbour_margins): the queries whose
    # gap between their k-th and (k+1)-th neighbour is at most twice this backend's similarity error on them.
    flippable: int = 0
    min_margin: float | None = None  # the smallest such gap, its query (an image) and that query's similarity error
    min_margin_error: float | None = None
    min_margin_query: str = ""
    median_margin: float | None = None
    median_error: float | None = None


@dataclass(frozen=True)
class StabilityComparison:
    """--stability: one backend against itself. check "repeat": the same batch run twice (bit-identical, or by how
    much not); check "batch": its first item alone against the same item in a batch with others, at the position
    where it changed most. Judged by the backend's class, on the worst of its rows (each output and token group)."""

    backend: str
    check: str  # "repeat" | "batch"
    label: str  # the row that changed most: "pooled", "tokens[registers]"...
    identical: bool  # bit for bit, every output
    max_abs: float
    cosine: float
    rel_error: float
    tolerance: str
    passed: bool
    position: int | None = None  # batch: where the item sat in the batch of 1 + companions when it changed most
    # batch: the largest change the companions alone make (the item among them against among its own copies, same
    # position, same batch size); 0 when only the batch size changes it (rounding), not what else is in the batch
    companions_max_abs: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class WorstInput:
    """--hunt: one backend's worst input of a hunt: the file written, what it was made from, and its worst row."""

    backend: str
    path: str  # the PNG written, which --image reproduces the figure with
    source: str  # the image of the folder it was made from
    variation: str
    label: str  # its worst row, "tokens[cls]"
    cosine: float
    rel_error: float
    passed: bool
    command: str


@dataclass(frozen=True)
class TruthComparison:
    """One output of one backend against the fp64 truth (--truth fp64): its relative error, and that error
    as a multiple of the fp32 CPU reference's own (`ratio`; None where the reference's error is zero)."""

    backend: str
    output: str
    rel_error: float
    ratio: float | None
    truth: str = "fp64"


@dataclass(frozen=True)
class LatencyStats:
    """Timings of one (backend, batch) cell in milliseconds per call; speedup is reference mean / this mean."""

    backend: str
    batch: int
    warmup: int
    iters: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    images_per_s: float
    speedup: float | None = None
    graph_speedup: float | None = None  # a variant row ("ort-cpu:int8"): its fp32 graph's mean / this mean


@dataclass(frozen=True)
class LayerComparison:
    """One tap (a block's output tokens, or the final norm) of one backend against the reference.
    `groups` holds the same figures per token group ({"registers": {"cosine", "rel_error", ...}})."""

    backend: str
    layer: str
    cosine: float
    max_abs: float
    rel_error: float
    nonfinite: int
    passed: bool
    groups: dict = field(default_factory=dict)
    # --replay: the block run on the reference's input to it, so its own error apart from the error it was given
    local_cosine: float | None = None
    local_rel_error: float | None = None


@dataclass(frozen=True)
class PartComparison:
    """--replay: one part of the opened block (timm's module name: norm1, attn.qkv, attn.softmax, mlp.fc1...), run
    on the reference's input to the block, against the reference's same part; judged by the backend's class."""

    backend: str
    layer: str  # "block_5"
    part: str
    cosine: float
    rel_error: float
    max_abs: float
    nonfinite: int
    passed: bool


@dataclass(frozen=True)
class Verdict:
    """The outcome of one comparison, as every output states it: the terminal, JSON, Markdown and sweep.

    `status` is PASS, FAIL or NOT COMPARED. `exit_code` is the process's: 0 PASS, 1 FAIL, 2 NOT COMPARED
    (0 when the run's purpose was to save the reference). `overrides` are the --min-cosine/--max-rel
    values that replaced the class thresholds.
    """

    status: str
    exit_code: int
    failed: list
    compared: list
    skipped: list
    overrides: dict


def verdict(report: "Report") -> Verdict:
    """The one verdict function: a PASS needs at least one compared backend, no failed row and no error."""
    failed = sorted({r.backend for r in report.accuracy if not r.passed}
                    | {r.backend for r in report.neighbours if r.passed is False}
                    | {b.name for b in report.backends if b.status == "error"}
                | {r.backend for r in report.stability if not r.passed}
                | ({"model.onnx's position-embedding resample"} if report.resample and not report.resample["passed"] else set()))
    compared = [b.name for b in report.backends if b.status in ("ran", "stored") and b.name != report.reference
                and any(r.backend == b.name for r in report.accuracy)]
    skipped = [b.name for b in report.backends if b.status == "skipped"]
    if failed:
        status, code = "FAIL", 1
    elif report.devices_not_run:
        status, code = "NOT COMPARED", 2
    elif compared:
        status, code = "PASS", 0
    else:
        status, code = "NOT COMPARED", 0 if report.saved_reference else 2
    return Verdict(status, code, failed, compared, skipped, dict(report.overrides))


@dataclass(frozen=True)
class Report:
    """Everything one comparison of one model found; `verdict` says what it means."""

    model: str
    timm_name: str
    artifact: str
    weights_source: str
    weights_sha256: str
    input: dict
    reference: str
    dtype: str
    versions: dict
    warnings: list
    backends: list[BackendStatus]
    accuracy: list[OutputComparison]
    latency: list[LatencyStats]
    layers: list[LayerComparison] = field(default_factory=list)
    drift: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)  # {"min_cosine": x, "max_rel": y}: what replaced the classes
    saved_reference: bool = False  # this run saves the reference's outputs (--save-reference): a real use alone
    truth: list[TruthComparison] = field(default_factory=list)  # --truth fp64: every backend against float64
    neighbours: list[NeighbourComparison] = field(default_factory=list)  # --images
    per_image: dict = field(default_factory=dict)  # --images: {backend: {"pooled": {"cosine": [...], ...}}}, in input order
    parts: list[PartComparison] = field(default_factory=list)  # --replay: inside the block each backend's error is largest in
    advice: dict = field(default_factory=dict)  # --replay: {backend: what to try}, from where its error was found and how it ran
    stability: list[StabilityComparison] = field(default_factory=list)  # --stability
    hunt: list[WorstInput] = field(default_factory=list)  # --hunt: each backend's worst input, written with its command
    size: str = ""  # --size: the input size ("224x224") when it is not the artifact's native one
    resample: dict | None = None  # a dynamic graph's position-embedding resample against eager's (vitparity/resample.py)
    # {"ascend": why}: an accelerator this host has (its device files) whose backends were asked for and none ran: no
    # PASS then, whatever the CPU rows say (the user came to compare that device)
    devices_not_run: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)  # the artifact's --model-kwargs for timm.create_model

    @property
    def verdict(self) -> Verdict:
        return verdict(self)

    @property
    def name(self) -> str:
        """The model, and the size when it is not the native one: "dinov2 at 448x448"."""
        return f"{self.model} at {self.size}" if self.size else self.model

    @property
    def from_folder(self) -> bool:
        """--images: the input was a folder of images (per-image tables, charts and neighbours are shown)."""
        return self.input.get("kind") == "images"

    @property
    def shown_neighbours(self) -> list[NeighbourComparison]:
        """The neighbour rows the tables show: a folder's always, one image's ("not judged") only in the JSON."""
        return self.neighbours if self.from_folder or any(r.passed is not None for r in self.neighbours) else []

    @property
    def passed(self) -> bool:
        return self.verdict.status == "PASS"

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code

    def to_dict(self) -> dict:
        judged = self.verdict
        return {**asdict(self), "verdict": judged.status, "passed": judged.status == "PASS",
                "exit_code": judged.exit_code, "verdict_details": asdict(judged)}
