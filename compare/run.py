"""The comparison itself: one input through every backend, then agreement and latency. Never prints."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from exporter import artifact, registry
from exporter.errors import UserError

from . import inputs, latency, metrics
from .backends import BACKENDS, Backend, BackendUnavailable
from .results import BackendStatus, OutputComparison, Report
from .tolerances import Tolerance, tolerance_for

OUTPUTS = ("pooled", "tokens")
VERSION_KEYS = ("torch", "timm", "onnxruntime")


@dataclass(frozen=True)
class CompareOptions:
    """What to compare and how. None for input fields means "the default" (an image, batch 1, seed 0)."""

    artifacts: str = "artifacts"
    input: str | None = None  # "image" or "random"
    image: str | None = None
    seed: int | None = None
    batch_size: int | None = None
    backends: tuple[str, ...] = tuple(BACKENDS)
    reference: str = "torch-cpu"
    require: tuple[str, ...] = ()
    dtype: str = "fp32"
    batch_sizes: tuple[int, ...] | None = None
    warmup: int = 10
    iters: int | None = None
    budget_s: float = 3.0
    latency: bool = True
    min_cosine: float | None = None
    max_rel: float | None = None
    layers: bool = False
    against: str | None = None


@dataclass
class Run:
    """The raw arrays behind a Report: the input, and each backend's outputs and layer taps."""

    batch: np.ndarray
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    taps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def check_names(options: CompareOptions) -> None:
    """Reject unknown backend names before any work starts."""
    for name in (*options.backends, options.reference, *options.require):
        if name not in BACKENDS:
            raise UserError(f"backend '{name}' is not known; choose from {', '.join(BACKENDS)}")


def version_warnings(manifest: dict) -> list[str]:
    from exporter.export import versions

    here, there = versions(), manifest.get("versions", {})
    return [
        f"{key} is {here[key]} here but the artifact was exported with {there[key]}"
        for key in VERSION_KEYS
        if there.get(key) and here.get(key) != there.get(key)
    ]


def compare_outputs(backend: str, got: dict, want: dict, tolerance: Tolerance) -> list[OutputComparison]:
    """Each output of `got` against the reference `want`, judged by `tolerance`."""
    rows = []
    for name in OUTPUTS:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        shape_match = a.shape == b.shape
        bad = metrics.nonfinite_count(a)
        nan = float("nan")
        cos = metrics.cosine(a, b) if shape_match else nan
        worst = metrics.worst_sample_cosine(a, b) if shape_match else nan
        rel = metrics.relative_error(a, b) if shape_match else nan
        passed = bool(
            shape_match and bad == 0
            and min(cos, worst) >= tolerance.min_cosine
            and rel <= tolerance.max_rel
        )
        rows.append(OutputComparison(
            backend=backend, output=name, shape=list(a.shape), reference_shape=list(b.shape),
            shape_match=shape_match, cosine=cos, worst_sample_cosine=worst,
            max_abs=metrics.max_abs_diff(a, b) if shape_match else nan,
            mean_abs=metrics.mean_abs_diff(a, b) if shape_match else nan,
            rel_error=rel, nonfinite=bad, tolerance=tolerance.name,
            min_cosine=tolerance.min_cosine, max_rel=tolerance.max_rel, passed=passed,
        ))
    return rows


def open_backends(options: CompareOptions, art: artifact.Artifact, step) -> tuple[dict[str, Backend], list[BackendStatus]]:
    """Load every chosen backend; those this host cannot run become skipped statuses with a reason."""
    names = [options.reference] + [n for n in options.backends if n != options.reference]
    loaded, statuses = {}, []
    for name in names:
        step(f"{art.key}: loading {name}")
        backend = BACKENDS[name]()
        try:
            details = backend.load(art, options.dtype)
        except BackendUnavailable as why:
            statuses.append(BackendStatus(name, "skipped", str(why)))
            continue
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - present but unable to load this artifact: a finding
            statuses.append(BackendStatus(name, "error", f"failed to load the artifact: {_first_line(error)}"))
            continue
        loaded[name] = backend
        statuses.append(BackendStatus(name, "ran", details=details))
    skipped = {s.name: s.reason for s in statuses if s.status == "skipped"}
    if options.reference not in loaded:
        why = skipped.get(options.reference) or next(s.reason for s in statuses if s.name == options.reference)
        raise UserError(f"the reference backend {options.reference} cannot run here: {why}; pick another with --reference")
    for name in options.require:
        if name in skipped:
            raise UserError(f"required backend {name} is unavailable: {skipped[name]}")
    return loaded, statuses


def compare(model: str, options: CompareOptions = CompareOptions(), step: Callable[[str], None] = lambda m: None) -> tuple[Report, Run]:
    """Compare one model's artifact across backends. Returns the report and the raw arrays."""
    check_names(options)
    spec = registry.resolve(model)
    step(f"{spec.key}: verifying the artifact")
    art = artifact.load(Path(options.artifacts), spec.key)
    manifest = art.manifest
    stored = None
    if options.against:
        from . import reference

        stored = reference.load(options.against, manifest)
    batch, described = _input(options, manifest, stored)
    loaded, statuses = open_backends(options, art, step)
    run = Run(batch=batch)
    failed = {}
    for name, backend in loaded.items():
        step(f"{spec.key}: running {name}")
        try:
            run.outputs[name] = backend.run(batch)
        except Exception as error:  # noqa: BLE001 - a device failing mid-run is a finding, not a crash
            failed[name] = f"failed while running: {_first_line(error)}"
    for name in failed:
        del loaded[name]
    statuses = [BackendStatus(s.name, "error", failed[s.name], s.details) if s.name in failed else s for s in statuses]
    if options.reference not in run.outputs:
        raise UserError(f"the reference backend {options.reference} {failed[options.reference]}")
    want = run.outputs[options.reference]
    if stored is not None:
        statuses += stored.statuses()
        run.outputs.update(stored.outputs)
    accuracy = [
        row
        for name, outputs in run.outputs.items() if name != options.reference
        for row in compare_outputs(name, outputs, want, judged_by(name, loaded, stored, options))
    ]
    timings, timing_failures = _latency(options, loaded, batch, step, spec.key) if options.latency else ([], [])
    layers, drift = [], {}
    if options.layers:
        from . import layers as layer_module

        layers, drift = layer_module.compare_layers(art, loaded, batch, options, run, stored, step)
    report = Report(
        model=spec.key,
        timm_name=manifest["timm_name"],
        artifact=str(art.folder),
        weights_source=manifest.get("weights_source", "unknown"),
        weights_sha256=manifest["files"]["weights.safetensors"]["sha256"],
        input=described,
        reference=options.reference,
        dtype=options.dtype,
        versions=_environment(statuses),
        warnings=version_warnings(manifest) + timing_failures,
        backends=statuses,
        accuracy=accuracy,
        latency=timings,
        layers=layers,
        drift=drift,
    )
    return report, run


def _input(options: CompareOptions, manifest: dict, stored) -> tuple[np.ndarray, dict]:
    config = manifest["data_config"]
    chosen = (options.input, options.image, options.seed, options.batch_size)
    if stored is not None and chosen == (None, None, None, None):
        return stored.batch, stored.input
    kind = options.input or "image"
    if kind == "image" and options.seed is not None:
        raise UserError("--seed applies to --input random; add --input random, or drop --seed to use the image")
    batch, described = inputs.make_input(kind, options.image, config, options.batch_size or 1, options.seed or 0)
    if stored is not None and described["sha256"] != stored.input["sha256"]:
        raise UserError(
            f"the input differs from the one stored in {options.against} ({stored.input['source']}, shape "
            f"{stored.input['shape']}); drop the input options to reuse the stored input"
        )
    return batch, described


def _latency(options: CompareOptions, loaded: dict[str, Backend], batch: np.ndarray, step, key: str):
    """Latency rows for every (batch size, backend), and a warning for each cell that failed (e.g. out of memory)."""
    sizes = options.batch_sizes or (batch.shape[0],)
    timings, failures = [], []
    for size in sizes:
        rows = np.resize(np.arange(batch.shape[0]), size)  # cycle the input's samples up to `size`
        sized = np.ascontiguousarray(batch[rows])
        cell = {}
        for name, backend in loaded.items():
            step(f"{key}: timing {name} at batch {size}")
            try:
                cell[name] = latency.measure(backend, sized, options.warmup, options.iters, options.budget_s)
            except Exception as error:  # noqa: BLE001 - a batch too big for the device is a finding
                failures.append(f"{name} could not be timed at batch {size}: {_first_line(error)}")
        ref = cell.get(options.reference)
        for stats in cell.values():
            timings.append(replace(stats, speedup=ref.mean_ms / stats.mean_ms if ref else None))
    return timings, failures


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def judged_by(name: str, loaded: dict[str, Backend], stored, options: CompareOptions) -> Tolerance:
    """The tolerance of a local backend, or of a stored one (judged by the dtype it ran in)."""
    if name in loaded:
        backend = loaded[name]
        return tolerance_for(backend.tolerance, options.dtype, backend.follows_dtype, options.min_cosine, options.max_rel)
    return tolerance_for(stored.tolerance_class(name), stored.dtype, stored.follows_dtype(name), options.min_cosine, options.max_rel)


def _environment(statuses: list[BackendStatus]) -> dict:
    """Library versions here, plus each backend's device name and accelerator stack versions."""
    import importlib.metadata as md

    from exporter.export import versions

    env = versions()
    try:
        env["torch_npu"] = md.version("torch-npu")
    except md.PackageNotFoundError:
        env["torch_npu"] = None
    for status in statuses:
        for key in ("device_name", "cann", "cuda"):
            if status.details.get(key):
                env[f"{status.name} {key}"] = status.details[key]
    return env
