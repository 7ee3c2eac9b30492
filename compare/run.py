"""The comparison itself: one input through every backend, then agreement and latency. Never prints.

Each backend runs in a worker process of its own (compare/worker.py), one after the other; this
module never names a runtime.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from vitparity import artifact, environment, processes, registry
from vitparity.errors import UserError
from vitparity.graphs import PRECISION_VARIANTS, precision_variants
from vitparity.images import list_images, open_rgb, printable

from . import dataset, inputs, judge, layers, worker
from .backends import BACKENDS, TRUTHS, BackendUnavailable, split
from .results import (
    BackendStatus,
    LatencyStats,
    Report,
    TruthComparison,
)

OUTPUTS = judge.OUTPUTS
VERSION_KEYS = ("torch", "timm", "onnxruntime")
COMPILE_CACHE = ".compile-cache"  # inside the artifact: compiled graphs (CANN .om files), by model.onnx's sha256


@dataclass(frozen=True)
class CompareOptions:
    """What to compare and how. None for input fields means "the default" (an image, batch 1, seed 0).

    `dtype` is the precision mode of the accelerator backends: fp32 (true fp32), fp16, bf16, or
    fast-math (the vendors' shipped fp32 defaults). `timeout_s` bounds each backend's worker.
    """

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
    replay: bool = False  # with layers: each eager backend's blocks run on the reference's inputs (local error, parts, advice)
    against: str | None = None
    save_reference: bool = False  # the run saves the reference's outputs: a real use even if nothing else runs
    truth: str | None = None  # "fp64": also run eager float64 on the CPU and measure every backend against it
    images: str | None = None  # a folder or glob: stream every image through every backend (compare/dataset.py)
    limit: int | None = None  # with images: the first N readable images only
    variants: tuple[str, ...] | None = None  # reduced-precision graphs run as rows of every onnxruntime backend; None: all the artifact has
    timeout_s: float = 600.0


@dataclass
class Run:
    """The raw arrays behind a Report: the input, and each backend's outputs and layer taps."""

    batch: np.ndarray
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    taps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # --truth: the float64 outputs
    images: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # --images: per-image figures by backend
    sizes: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # --batch-sizes: {backend: {"3/pooled": array}}


def check_names(options: CompareOptions) -> None:
    """Reject unknown backend and variant names before any work starts."""
    for name in (*options.backends, options.reference, *options.require):
        base, _, variant = name.partition(":")
        if base not in BACKENDS:
            raise UserError(f"backend '{name}' is not known; choose from {', '.join(BACKENDS)}")
        if variant and (variant not in PRECISION_VARIANTS or not BACKENDS[base].runs_variants):
            raise UserError(f"'{name}' is not a row: variants ({', '.join(PRECISION_VARIANTS)}) run on the onnxruntime "
                            f"backends only, e.g. ort-cpu:int8")
    for variant in options.variants or ():
        if variant not in PRECISION_VARIANTS:
            raise UserError(f"--variants: '{variant}' is not a variant; choose from {', '.join(PRECISION_VARIANTS)}, all or none")
    if options.reference.partition(":")[2]:
        raise UserError(f"the reference must be an fp32 backend, not the variant {options.reference}")


def rows(options: CompareOptions, manifest: dict) -> list[str]:
    """The rows to run, reference first: each backend, and after each onnxruntime backend its variants
    (`options.variants`, or every one the artifact has). A variant named that the artifact lacks is an error."""
    have = precision_variants(manifest)
    chosen = list(have) if options.variants is None else list(options.variants)
    missing = [v for v in chosen if v not in have]
    if missing:
        raise UserError(f"the {manifest['model']} artifact has no {', '.join(missing)} variant; add it with "
                        f"make export MODEL={manifest['model']} ARGS='--if-missing " + " ".join(f"--variant {v}" for v in missing)
                        + "', or pick from: " + (", ".join(have) or "none"))
    found = []
    for name in [options.reference] + [n for n in options.backends if n != options.reference]:
        found.append(name)
        if not name.partition(":")[2] and BACKENDS[name].runs_variants:
            found += [f"{name}:{variant}" for variant in chosen]
    return list(dict.fromkeys(found))


def version_warnings(manifest: dict) -> list[str]:
    here, there = environment.versions(), manifest.get("versions", {})
    mixed = environment.distributions("onnxruntime")
    warnings = [
        f"{len(mixed)} onnxruntime distributions are installed ({', '.join(mixed)}; {mixed[0]} is imported): "
        f"pip does not know they are one package and may mix their files; uninstall all but one"
    ] if len(mixed) > 1 else []
    return warnings + [
        f"{key} is {here[key]} here but the artifact was exported with {there[key]}"
        for key in VERSION_KEYS
        # The local part (+cu130, +cpu) names the build, not the library: it differs between hosts by design.
        if there.get(key) and str(here.get(key)).split("+")[0] != str(there[key]).split("+")[0]
    ]


def layout(manifest: dict) -> dict | None:
    """The artifact's token layout: recorded by the exporter, or derived from timm for older artifacts."""
    if "token_layout" in manifest:
        return manifest["token_layout"]
    tokens = manifest.get("outputs", {}).get("tokens")
    return registry.layout_of(manifest["timm_name"], tokens) if tokens else None


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
    with processes.temp_folder(REPLAY_PREFIX) as folder:  # the reference's block inputs and outputs, for the others to replay
        return _run_backends(options, art, batch, step, plan, image, folder)


REPLAY_PREFIX = processes.REPLAY_PREFIX


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
    for name in options.require:  # a required backend this host plainly lacks fails before any worker starts
        try:
            split(name)[0].probe()
        except BackendUnavailable as why:
            raise UserError(f"required backend {name} is unavailable: {why}") from None
    job = worker.Job(
        backend="", artifacts=str(art.folder.parent.resolve()), key=art.key, precision=options.dtype,
        # The accuracy batch size by default: --images' batch (the parent holds an empty placeholder then).
        batch_sizes=(options.batch_sizes or ((plan or {}).get("batch") or batch.shape[0],)) if options.latency else (),
        warmup=options.warmup, iters=options.iters, budget_s=options.budget_s, layers=options.layers,
        artifact_id=worker.artifact_identity(art),
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
        if outcome.details.get("input_error"):
            raise UserError(outcome.reason)
        return outcome.inputs["batch"] if "batch" in outcome.inputs else batch

    if image:
        job = replace(job, batch_sizes=(options.batch_sizes or (image["batch_size"],)) if options.latency else ())
    if options.truth:
        cls = TRUTHS[options.truth]
        step(f"{art.key}: {cls.name}, the {options.truth} truth (in its own process)")
        truth_job = replace(job, precision=options.truth, batch_sizes=(), layers=False, dataset=plans.get("truth", {}),
                            image=image or {})
        outcome = worker.run_backend(cls, truth_job, batch, options.timeout_s, compile_cache(art, options.truth), progress_of(cls.name))
        batch = run.batch = made_input(outcome)
        image = None
        if outcome.details.get("input_error"):  # no readable image: the user's input, not the truth's fault
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
            outcome = worker.Outcome("skipped", str(why))
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
            outcome = worker.run_backend(cls, replace(job, precision=precision, dataset=streamed, variant=variant, **first,
                                                      **replayed), batch,
                                         options.timeout_s, compile_cache(art, precision), progress_of(name))
            if first:
                batch = run.batch = made_input(outcome)
                image = None
        statuses.append(BackendStatus(name, outcome.status, outcome.reason, outcome.details))
        if outcome.status == "skipped" and not variant:
            unavailable[name] = outcome.reason
        if outcome.status == "ran":
            run.outputs[name] = outcome.outputs[name]
            run.taps.update(outcome.taps)
            run.images.update(outcome.images)
            run.sizes.update(outcome.sizes)
            if plan and name == options.reference:
                written["reference"] = {"prefix": plans["reference"]["write"]}
                batch = run.batch = decoded_batch()
            timings += [LatencyStats(**row) for row in outcome.latency]
        warnings += outcome.warnings
        if name == options.reference and outcome.details.get("input_error"):  # the images, not the backend
            raise UserError(outcome.reason)
        if name == options.reference and outcome.status != "ran":
            raise UserError(f"the reference backend {name} cannot run here: {outcome.reason}; pick another with --reference")
        if name in options.require and outcome.status == "skipped":  # a row mostly on the CPU included
            raise UserError(f"required backend {name} is unavailable: {outcome.reason}")
    return statuses, run, timings, warnings


def compare(model: str, options: CompareOptions = CompareOptions(), step: Callable[[str], None] = lambda m: None) -> tuple[Report, Run]:
    """Compare one model's artifact across backends. Returns the report and the raw arrays."""
    check_names(options)
    spec = registry.resolve(model, options.artifacts)
    step(f"{spec.key}: verifying the artifact")
    art = artifact.load(Path(options.artifacts), spec.key)
    manifest = art.manifest
    for size, flag in ((options.batch_size or 1, "--batch-size"), (max(options.batch_sizes or (1,)), "--batch-sizes")):
        check_batch_memory(size, manifest["data_config"]["input_size"], flag)
    stored = None
    if options.against:
        from . import reference

        stored = reference.load(options.against, manifest)
    groups = layout(manifest)
    if stored is not None and (stored.input.get("kind") == "images") != bool(options.images):
        raise UserError(
            f"the reference in {options.against} was saved from {stored.input.get('count')} images (--images); pass --images "
            f"with the same images" if stored.input.get("kind") == "images" else
            f"the reference in {options.against} holds one input batch, not an image set; drop --images to reuse it")
    if options.images:
        with images_folder() as folder:
            batch, plan = _images_plan(options, manifest, folder, groups)
            if stored is not None:
                _same_images_as_stored(plan["decode"]["paths"], stored, options)
            statuses, run, timings, warnings = run_backends(options, art, batch, step, plan)
            described = _images_described(options, manifest, *dataset.decoded(folder))
        warnings = [f"skipped {s['path']}: {s['reason']}" for s in described["skipped"]] + warnings
    else:
        batch, described, image = _input(options, manifest, stored)
        statuses, run, timings, warnings = run_backends(options, art, batch, step, image=image)
        if image:
            described = {"kind": "image", "source": described["source"], "shape": list(run.batch.shape), "dtype": "float32",
                         "sha256": inputs.digest(run.batch)}
            _same_as_stored(described, stored, options)
    if stored is not None and options.images:
        if stored.input["sha256"] != described["sha256"]:
            raise UserError(
                f"the images differ from those stored in {options.against} ({stored.input['count']} images there, "
                f"{described['count']} here, compared by content hash in order); pass --images with the same images")
        reference_embeddings = run.images[options.reference]["embeddings"]
        for name, embeddings in stored.embeddings.items():  # pooled, per image, against this host's reference
            run.images[name] = {"embeddings": embeddings, **judge.wire("reference", judge.item_figures(
                {"pooled": embeddings}, {"pooled": reference_embeddings}, None, outputs=("pooled",)))}
    if stored is not None:
        statuses += stored.statuses()
        run.outputs.update(stored.outputs)
        run.taps.update(stored.taps)
    if not options.images:  # one batch: a stream of one, its per-item figures made here as the workers make a folder's
        _batch_figures(run, options, stored, groups, described["kind"])
    judged = {name: judge.judged_by(name, statuses, stored, options.min_cosine, options.max_rel) for name in run.outputs}
    items = _item_names(described, len(run.batch))
    others = [name for name in run.images if name != options.reference]
    accuracy = [row for name in others
                for row in judge.accuracy_rows(name, judge.from_wire(run.images[name], "reference"), judged[name], items)]
    if not options.images:
        accuracy += judge.size_rows(run.sizes, run.outputs[options.reference], options.reference, accuracy, judged, groups)
    embeddings = run.images[options.reference].get("embeddings")
    neighbour_rows = [judge.neighbour_row(name, embeddings, run.images[name]["embeddings"], judged[name])
                      for name in others if embeddings is not None and "embeddings" in run.images[name]]
    per_image = {name: judge.per_image_figures(judge.from_wire(run.images[name], "reference")) for name in others}
    truth = (judge.truth_rows(run.images, options.reference, options.truth) if options.truth else []) + (
        [TruthComparison(**row) for row in stored.truth] if stored is not None else [])
    layer_rows, drift, parts, advice = [], {}, [], {}
    if options.layers and options.reference in run.taps:
        layer_rows, drift = layers.compare_layers(run.taps, options.reference, judged, groups)
    replays = {s.name: s.details["replay"] for s in statuses if isinstance(s.details.get("replay"), dict)}
    if replays:
        ran = {s.name: {"precision": s.details.get("precision", "fp32"), "variant": split(s.name)[1]} for s in statuses}
        layer_rows, parts, local, advice = layers.localise(layer_rows, replays, judged, ran)
        drift = {name: "; ".join(filter(None, [drift.get(name), local.get(name, "").removeprefix(f"{name}: ")]))
                 for name in {*drift, *local}}
    report = Report(
        model=spec.key,
        timm_name=manifest["timm_name"],
        artifact=str(art.folder),
        weights_source=manifest.get("weights_source", "unknown"),
        weights_sha256=manifest["files"]["weights.safetensors"]["sha256"],
        input=described,
        reference=options.reference,
        dtype=options.dtype,
        versions=_environment(statuses, int8_rows(statuses)),
        warnings=version_warnings(manifest) + artifact.verify_warnings(manifest) + host_warnings(manifest, int8_rows(statuses))
        + warnings,
        backends=statuses,
        accuracy=accuracy,
        latency=_with_speedups(timings, options.reference),
        layers=layer_rows,
        drift=drift,
        overrides={k: v for k, v in (("min_cosine", options.min_cosine), ("max_rel", options.max_rel)) if v is not None},
        saved_reference=options.save_reference,
        truth=truth,
        neighbours=neighbour_rows,
        per_image=per_image,
        parts=parts,
        advice=advice,
    )
    return report, run


IMAGES_PREFIX = processes.IMAGES_PREFIX  # + the parent's pid: the --images run folder, removed by the next run if left


@contextlib.contextmanager
def images_folder():
    """The --images run folder in the temp folder: the preprocessed inputs and the truth's and reference's outputs."""
    with processes.temp_folder(IMAGES_PREFIX) as folder:
        yield folder


def _images_plan(options: CompareOptions, manifest: dict, folder: Path, groups: dict | None) -> tuple[np.ndarray, dict]:
    """An empty placeholder batch and the plan of the workers' streams. The first worker decodes the images
    (run_backends passes it "decode"), so that this process never imports timm and torch for --images."""
    shape = list(manifest["data_config"]["input_size"])
    paths = [str(path) for path in list_images(options.images)]
    plan = {"folder": str(folder), "inputs": str(folder / dataset.INPUTS), "batch": options.batch_size or 1, "shape": shape,
            "layout": groups, "decode": {"paths": paths, "data_config": manifest["data_config"], "limit": options.limit}}
    return np.zeros((0, *shape), dtype=np.float32), plan


def _same_images_as_stored(paths: list[str], stored, options: CompareOptions) -> None:
    """Refuse, before any backend runs, images that cannot be the stored ones: the stored images' hashes must
    come first, in order, among the files here whose hash is one of them (unreadable files are skipped by
    the run, so this is necessary, not sufficient: the run checks the decoded set again)."""
    want = [image["sha256"] for image in stored.input["images"]]
    wanted, found = set(want), []
    for path in paths:
        if len(found) == len(want):
            break
        try:
            digest = artifact.sha256(Path(path))
        except OSError:
            continue
        if digest in wanted:
            found.append(digest)
    if found != want:
        raise UserError(f"the images differ from those stored in {options.against} ({len(want)} images there; here "
                        f"{len(found)} of them in that order, compared by content hash); pass --images with the same images")


def _images_described(options: CompareOptions, manifest: dict, images: list[dict], skipped: list[dict]) -> dict:
    shape = list(manifest["data_config"]["input_size"])
    digest = hashlib.sha256("".join(image["sha256"] for image in images).encode()).hexdigest()
    return {"kind": "images", "source": printable(options.images), "shape": [len(images), *shape], "dtype": "float32",
            "sha256": digest, "count": len(images), "images": images, "skipped": skipped,
            "batch_size": options.batch_size or 1}


def _batch_figures(run: Run, options: CompareOptions, stored, groups: dict | None, kind: str) -> None:
    """One batch as a stream of one: each backend's per-item figures against the reference (and the truth, for
    backends that ran here; stored ones keep their host's), into run.images as the workers put a folder's. An
    image's pooled embedding is kept for neighbour agreement, which one image cannot have: "not judged", as a
    one-image folder says; a seeded noise batch has no neighbours to keep."""
    want = run.outputs[options.reference]
    for name, outputs in run.outputs.items():
        found = judge.wire("reference", judge.item_figures(outputs, want, groups)) if name != options.reference else {}
        if run.truth and (stored is None or name not in stored.outputs):
            found.update(judge.wire("truth", judge.item_figures(outputs, run.truth, None)))
        if kind == "image":  # copies of one image: one item to find neighbours among
            found["embeddings"] = np.asarray(outputs["pooled"])[:1]
        run.images[name] = found


def _item_names(described: dict, count: int) -> list[str]:
    """What the rows call each item: the images' paths, the one image's path, or "sample 0"... of a seeded batch."""
    if described.get("kind") == "images":
        return [image["path"] for image in described["images"]]
    if described.get("kind") == "image":
        return [str(described["source"])] * count
    return judge.sample_names(count)


def _with_speedups(timings: list[LatencyStats], reference: str) -> list[LatencyStats]:
    """Rows ordered by batch size (backends in run order within one), each with reference mean / its mean, and
    for a variant row its fp32 graph's mean / its mean ("ort-cpu:int8" against "ort-cpu")."""
    mean = {(row.backend, row.batch): row.mean_ms for row in timings}
    ordered = sorted(timings, key=lambda row: row.batch)

    def ratio(backend: str, row: LatencyStats) -> float | None:
        return mean[(backend, row.batch)] / row.mean_ms if (backend, row.batch) in mean else None

    return [replace(row, speedup=ratio(reference, row),
                    graph_speedup=ratio(row.backend.partition(":")[0], row) if ":" in row.backend else None)
            for row in ordered]


def _input(options: CompareOptions, manifest: dict, stored) -> tuple[np.ndarray, dict, dict | None]:
    """(batch, its description, image job). For an image the batch is an empty placeholder and the image job
    says what the first worker transforms: only the file is checked here, without importing torch."""
    config = manifest["data_config"]
    chosen = (options.input, options.image, options.seed, options.batch_size)
    if stored is not None and chosen == (None, None, None, None):
        return stored.batch, stored.input, None
    kind = options.input or "image"
    if kind == "image" and options.seed is not None:
        raise UserError("--seed applies to --input random; add --input random, or drop --seed to use the image")
    size = options.batch_size or 1
    if size < 1:
        raise UserError(f"--batch-size must be at least 1, got {size}")
    if kind == "image":
        path = Path(options.image) if options.image else inputs.default_image()
        open_rgb(path, config)  # a file that is no usable image fails now, in one line
        image = {"path": str(path.resolve()), "data_config": config, "batch_size": size}
        return np.zeros((0, *config["input_size"]), dtype=np.float32), {"kind": "image", "source": str(path)}, image
    batch, described = inputs.make_input(kind, options.image, config, size, options.seed or 0)
    _same_as_stored(described, stored, options)
    return batch, described, None


def check_batch_memory(size: int, input_size, flag: str = "--batch-size") -> None:
    """Refuse a batch whose input alone would not fit in a quarter of this host's memory (the outputs, the
    model and every backend's copies need the rest), in one line rather than a MemoryError later."""
    need = size * int(np.prod(input_size)) * 4
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: nothing to compare with
        return
    if need > have // 4:
        raise UserError(f"{flag} {size}: its input alone is {need / 2**30:.1f} GiB, over a quarter of this host's "
                        f"{have / 2**30:.0f} GiB of memory; use a smaller batch")


def _same_as_stored(described: dict, stored, options: CompareOptions) -> None:
    if stored is not None and described["sha256"] != stored.input["sha256"]:
        raise UserError(
            f"the input differs from the one stored in {options.against} ({stored.input['source']}, shape "
            f"{stored.input['shape']}); drop the input options to reuse the stored input"
        )


def int8_rows(statuses: list[BackendStatus]) -> list[str]:
    """The rows that ran an int8 graph of this artifact here (stored rows ran on their own host)."""
    return [s.name for s in statuses if s.status == "ran" and s.details.get("variant_class") == "int8"]


def host_warnings(manifest: dict, rows: list[str], here: dict | None = None) -> list[str]:
    """A warning for each int8 row whose graph was verified on a CPU with other int8 features than this host's
    (VNNI or not changes int8 numerics), or on an unrecorded one."""
    if not rows:  # reading the CPU's features takes a second
        return []
    here = here or environment.cpu()
    found = precision_variants(manifest)
    warnings = []
    for row in rows:
        record = found.get(row.partition(":")[2], {})
        note = environment.int8_host_note(record.get("verify", {}).get("host"), here)
        if note:
            warnings.append(f"{row}: {note}")
    return warnings


def _environment(statuses: list[BackendStatus], int8: list[str] = ()) -> dict:
    """Library versions here, plus each backend's device name and accelerator stack versions, and the CPU's int8
    features when an int8 graph ran (reading them takes about a second)."""
    env = {**environment.versions(), "torch_npu": environment.version("torch_npu")}
    if int8:
        host = environment.cpu()
        env["cpu"] = host["model"]
        env["cpu int8 features"] = ", ".join(host["int8_features"] or []) if host["int8_features"] is not None else "unknown"
    for status in statuses:
        for key in ("device_name", "cann", "cuda"):
            if status.details.get(key):
                env[f"{status.name} {key}"] = status.details[key]
    return env
