"""Orchestration: every backend of a plan in a worker process of its own, one at a time. Never prints.

Returns the raw arrays (`Run`); judging them is compare/judge.py's job, and assembling the report
compare/run.py's. This module never names a runtime.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vitparity import artifact, processes, sizes
from vitparity.errors import UserError

from . import dataset, launch, protocol
from .backends import BACKENDS, TRUTHS, BackendUnavailable, split
from .plan import CompareOptions, rows
from .results import BackendStatus, LatencyStats

COMPILE_CACHE = ".compile-cache"  # inside the artifact: compiled graphs (CANN .om files), by model.onnx's sha256


@dataclass
class Run:
    """The raw arrays behind a Report: the input, and each backend's outputs and layer taps."""

    batch: np.ndarray
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    taps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # --truth: the float64 outputs
    images: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # --images: per-image figures by backend
    sizes: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # --batch-sizes: {backend: {"3/pooled": array}}
    stability: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # --stability: see compare/worker.py


def compile_cache(art: artifact.Artifact, precision: str) -> Path:
    """The workers' working directory: a folder keyed by model.onnx's sha256 and the precision mode.

    A provider that compiles the graph keeps its files there: CANN writes and reads <name>_<hash>.om
    in the working directory, keyed by the model's path and input shapes, not by its content or
    precision_mode. So a re-export, or another precision, gets a fresh folder; stale ones are removed.
    """
    digest = art.manifest["files"]["model.onnx"]["sha256"]
    root = art.folder / COMPILE_CACHE
    try:
        # Never through a link: a .compile-cache that is a symbolic link is replaced by a real folder (the
        # link goes, its target is untouched), and stale entries are removed without following links.
        folder = artifact.own_folder(root / digest / precision, art.folder)
        for old in os.scandir(root):
            if old.name != digest:
                artifact.remove_tree(Path(old.path))
        return folder
    except OSError:  # a read-only artifact (a shared or mounted copy): the user's cache instead
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vit-parity" / "compile" / digest / precision
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def run_backends(options: CompareOptions, art: artifact.Artifact, batch: np.ndarray, step, plan: dict | None = None,
                 image: dict | None = None) -> tuple[list, Run, list, list]:
    if not options.replay:
        return _run_backends(options, art, batch, step, plan, image, None)
    with processes.temp_folder(processes.REPLAY_PREFIX) as folder:  # the reference's block inputs and outputs, for the others to replay
        return _run_backends(options, art, batch, step, plan, image, folder)


def _run_backends(options: CompareOptions, art: artifact.Artifact, batch: np.ndarray, step, plan: dict | None,
                  image: dict | None, replay: Path | None) -> tuple[list, Run, list, list]:
    """Probe every chosen backend, then run those that may work, each in its own worker, one at a time.

    Returns (statuses, raw arrays, latency rows, warnings). The truth (--truth) runs first, then the
    reference; a truth, a reference or a required backend that does not run is a UserError. With
    `plan` (--images) each worker also streams every image; the truth and the reference write their
    outputs for the others to read. With `image` ({"path", "data_config", "batch_size"}) `batch` is an
    empty placeholder: the first worker transforms the image (it imports timm anyway) and returns the
    batch for the others, so this process never imports torch.
    """
    names = rows(options, art.manifest)
    # The first worker (the truth's, else the reference's) makes the input from --images or the photo.
    maker = None if not (plan or image) else TRUTHS[options.truth] if options.truth else split(options.reference)[0]
    launch.prepare([split(name)[0] for name in names] + ([TRUTHS[options.truth]] if options.truth else []), maker)
    for name in options.require:  # a required backend this host plainly lacks fails before any worker starts
        try:
            split(name)[0].probe()
        except BackendUnavailable as why:
            raise UserError(f"required backend {name} is unavailable: {why}") from None
    job = protocol.Job(
        backend="", artifacts=str(art.folder.parent.resolve()), key=art.key, precision=options.dtype,
        # The accuracy batch size by default: --images' batch (the parent holds an empty placeholder then).
        batch_sizes=(options.batch_sizes or ((plan or {}).get("batch") or batch.shape[0],)) if options.latency else (),
        warmup=options.warmup, iters=options.iters, budget_s=options.budget_s, layers=options.layers,
        artifact_id=protocol.artifact_identity(art),
    )
    statuses, run, timings, warnings = [], Run(batch=batch), [], []
    written = {}  # --images: {"truth"|"reference": {"prefix"}} once that run has written its outputs
    unavailable = {}  # backend -> why it was skipped: its variant rows are skipped for the same reason
    plans = {}
    if plan:
        folder = Path(plan["folder"])
        base = {k: v for k, v in plan.items() if k != "decode"}
        first = "truth" if options.truth else "reference"  # the first worker decodes the images
        plans = {"truth": {**base, "write": str(folder / "truth"), "dtype": "float64"},
                 "reference": {**base, "write": str(folder / "reference"), "dtype": "float32"},
                 "other": base}
        plans[first]["decode"] = plan["decode"]

    def decoded_batch() -> np.ndarray:
        """--images: the first batch, as the first worker decoded it, for the workers after it and the report."""
        count = len(dataset.decoded(folder)[0])
        return dataset.read_rows(folder / dataset.INPUTS, 0, min(plan["batch"], count), plan["shape"])


    def progress_of(name: str):
        return lambda done, total: step(f"{art.key}: {name} {dataset.progress_bar(done, total)} {done}/{total} images")

    def made_input(outcome) -> np.ndarray:
        """The batch the first worker made from `image`; a file that is no usable image is the user's error."""
        if outcome.input_error:
            raise UserError(outcome.reason)
        return outcome.inputs["batch"] if "batch" in outcome.inputs else batch

    if image:
        job = replace(job, batch_sizes=(options.batch_sizes or (image["batch_size"],)) if options.latency else ())
    if options.truth:
        cls = TRUTHS[options.truth]
        step(f"{art.key}: {cls.name}, the {options.truth} truth (in its own process)")
        truth_job = replace(job, precision=options.truth, batch_sizes=(), layers=False, dataset=plans.get("truth", {}),
                            image=image or {})
        outcome = launch.run_backend(cls, truth_job, batch, options.timeout_s, compile_cache(art, options.truth), progress_of(cls.name))
        batch = run.batch = made_input(outcome)
        image = None
        if outcome.input_error:  # no readable image: the user's input, not the truth's fault
            raise UserError(outcome.reason)
        if outcome.status != "ran":
            raise UserError(f"the {options.truth} truth ({cls.name}) did not run: {outcome.reason}")
        run.truth = outcome.outputs[cls.name]
        if plan:
            written["truth"] = {"prefix": plans["truth"]["write"]}
            batch = run.batch = decoded_batch()
    for name in names:
        cls, variant = split(name)
        # The reference is the truth the others are judged against: it always runs in true fp32.
        precision = "fp32" if name == options.reference else options.dtype
        try:
            cls.probe()
            if variant and cls.name in unavailable:  # its provider could not run model.onnx: no worker to learn it again
                raise BackendUnavailable(unavailable[cls.name])
        except BackendUnavailable as why:
            outcome = protocol.Outcome("skipped", str(why))
        else:
            step(f"{art.key}: {name} (in its own process)")
            role = "reference" if name == options.reference else "other"
            streamed = {**plans[role], **({"reference": written["reference"]} if "reference" in written else {}),
                        **({"truth": written["truth"]} if "truth" in written else {})} if plan else {}
            first = {"image": image} if image and name == options.reference else {}
            replayed = {}
            if replay is not None and hasattr(cls, "replay") and getattr(BACKENDS[options.reference], "records_replay", False):
                replayed = {"replay": {"folder": str(replay), "write": name == options.reference}}
            elif replay is not None:  # said once per row, never silently absent
                warnings.append(f"{name}: no local error per block: --replay needs an eager reference (torch-*) to record "
                                f"the blocks' inputs")
            # The reference of a graph for every size checks that graph's position-embedding resample on its own.
            resample = name == options.reference and sizes.record(art.manifest)["dynamic"] and hasattr(cls, "resample")
            outcome = launch.run_backend(cls, replace(job, precision=precision, dataset=streamed, variant=variant, **first,
                                                      **replayed, resample=resample, stability=options.stability), batch,
                                         options.timeout_s, compile_cache(art, precision), progress_of(name))
            if first:
                batch = run.batch = made_input(outcome)
                image = None
        statuses.append(BackendStatus.of(name, outcome.status, outcome.reason, outcome.details))
        if outcome.status == "skipped" and not variant:
            unavailable[name] = outcome.reason
        if outcome.status == "ran":
            run.outputs[name] = outcome.outputs[name]
            run.taps.update(outcome.taps)
            run.images.update(outcome.images)
            run.sizes.update(outcome.sizes)
            run.stability.update(outcome.stability)
            if plan and name == options.reference:
                written["reference"] = {"prefix": plans["reference"]["write"]}
                batch = run.batch = decoded_batch()
            timings += [LatencyStats(**row) for row in outcome.latency]
        warnings += outcome.warnings
        if name == options.reference and outcome.input_error:  # the images, not the backend
            raise UserError(outcome.reason)
        if outcome.status == "changed":  # an export landed during the run: nothing compared, not a FAIL
            raise UserError(f"{art.key}: not compared: {outcome.reason}")
        if name == options.reference and outcome.status != "ran":
            raise UserError(f"the reference backend {name} cannot run here: {outcome.reason}; pick another with --reference")
        if name in options.require and outcome.status == "skipped":  # a row mostly on the CPU included
            raise UserError(f"required backend {name} is unavailable: {outcome.reason}")
    return statuses, run, timings, warnings


@contextlib.contextmanager
def images_folder():
    """The --images run folder in the temp folder: the preprocessed inputs and the truth's and reference's outputs."""
    with processes.temp_folder(processes.IMAGES_PREFIX) as folder:  # + the parent's pid; the next run removes one left behind
        yield folder
