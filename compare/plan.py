"""Planning: what a comparison will run, on what input, checked before any worker starts. Never prints.

The rows (each backend, and each variant after its onnxruntime backend), the input (a seeded batch, one
image, or a folder's plan for the workers' streams), and the names each item is given in the rows.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitparity import artifact, registry
from vitparity.errors import UserError
from vitparity.graphs import PRECISION_VARIANTS, precision_variants
from vitparity.images import list_images, open_rgb, printable

from . import dataset, inputs, judge
from .backends import BACKENDS

VERSION_KEYS = ("torch", "timm", "onnxruntime")


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
    stability: bool = False  # --stability: each backend's batch run twice, and an item alone against among companions
    size: tuple[int, int] | None = None  # --size: every backend at this (height, width); None: the artifact's native size


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


def layout(manifest: dict) -> dict | None:
    """The artifact's token layout: recorded by the exporter, or derived from timm for older artifacts."""
    if "token_layout" in manifest:
        return manifest["token_layout"]
    tokens = manifest.get("outputs", {}).get("tokens")
    return registry.layout_of(manifest["timm_name"], tokens) if tokens else None


def choose_input(options: CompareOptions, manifest: dict, stored) -> tuple[np.ndarray, dict, dict | None]:
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
    same_as_stored(described, stored, options)
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


def same_as_stored(described: dict, stored, options: CompareOptions) -> None:
    if stored is not None and described["sha256"] != stored.input["sha256"]:
        raise UserError(
            f"the input differs from the one stored in {options.against} ({stored.input['source']}, shape "
            f"{stored.input['shape']}); drop the input options to reuse the stored input"
        )


def images_plan(options: CompareOptions, manifest: dict, folder: Path, groups: dict | None) -> tuple[np.ndarray, dict]:
    """An empty placeholder batch and the plan of the workers' streams. The first worker decodes the images
    (run_backends passes it "decode"), so that this process never imports timm and torch for --images."""
    shape = list(manifest["data_config"]["input_size"])
    paths = [str(path) for path in list_images(options.images)]
    plan = {"folder": str(folder), "inputs": str(folder / dataset.INPUTS), "batch": options.batch_size or 1, "shape": shape,
            "layout": groups, "decode": {"paths": paths, "data_config": manifest["data_config"], "limit": options.limit}}
    return np.zeros((0, *shape), dtype=np.float32), plan


def same_images_as_stored(paths: list[str], stored, options: CompareOptions) -> None:
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


def images_described(options: CompareOptions, manifest: dict, images: list[dict], skipped: list[dict]) -> dict:
    shape = list(manifest["data_config"]["input_size"])
    digest = hashlib.sha256("".join(image["sha256"] for image in images).encode()).hexdigest()
    return {"kind": "images", "source": printable(options.images), "shape": [len(images), *shape], "dtype": "float32",
            "sha256": digest, "count": len(images), "images": images, "skipped": skipped,
            "batch_size": options.batch_size or 1}


def item_names(described: dict, count: int) -> list[str]:
    """What the rows call each item: the images' paths, the one image's path, or "sample 0"... of a seeded batch."""
    if described.get("kind") == "images":
        return [image["path"] for image in described["images"]]
    if described.get("kind") == "image":
        return [str(described["source"])] * count
    return judge.sample_names(count)
