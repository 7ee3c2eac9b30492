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
    details: dict = field(default_factory=dict)

    def switches(self) -> str:
        """The precision switches and provider options in force, as the backend read them back."""
        found = {**self.details.get("switches", {}), **self.details.get("provider_options", {})}
        return ", ".join(f"{key}={value}" for key, value in found.items())


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


@dataclass(frozen=True)
class LayerComparison:
    """One tap (a block's output tokens, or the final norm) of one backend against the reference."""

    backend: str
    layer: str
    cosine: float
    max_abs: float
    rel_error: float
    nonfinite: int
    passed: bool


@dataclass(frozen=True)
class Report:
    """Everything one comparison of one model found. `exit_code` is 0 when all that ran passed, else 1."""

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

    @property
    def passed(self) -> bool:
        return (
            all(c.passed for c in self.accuracy)
            and not any(b.status == "error" for b in self.backends)
        )

    @property
    def compared(self) -> bool:
        """Whether any backend besides the reference produced outputs, or tried to and failed."""
        return bool(self.accuracy) or any(b.status == "error" for b in self.backends)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "exit_code": self.exit_code}
