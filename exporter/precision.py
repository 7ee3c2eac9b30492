"""Reduced-precision variants of an artifact: written with the recipes of exporter/variants.py, verified
against eager fp32 by their tolerance class, searched for what must stay fp32 (exporter/keep_fp32.py),
and added to an existing artifact in one atomic publish.

A variant is checked against eager fp32 on the artifact's sample (its eager outputs are in sample.npz),
variations of the bundled photo and any --calibration-images; the eager outputs of those are computed with
the artifact's own model (vitparity/eager.py), so adding a variant imports torch.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitparity import artifact, processes, runtime
from vitparity.artifact import INPUT_NAME, OUTPUT_NAMES
from vitparity.errors import CheckFailed, UserError

from .variants import FP16_KEEP


@dataclass(frozen=True)
class VariantOptions:
    """Which variants to write and how; exporter.export.ExportOptions extends it for a whole export."""

    variants: tuple[str, ...] = ()  # int8, int8-qdq, fp16 (exporter/variants.py)
    fp16_keep: tuple[str, ...] = FP16_KEEP  # op types the fp16 variant keeps fp32, unless searched
    search_precision: bool = False  # fp16: search the smallest fp32 list instead (exporter/keep_fp32.py)
    calibration_images: str | None = None  # a folder or glob: int8-qdq calibrates on them, every variant is verified on them


@dataclass(frozen=True)
class Added:
    """Variants added to an existing artifact, for the exporter's summary and --json."""

    model: str
    folder: str
    variants: dict = field(default_factory=dict)

VARIANT_CHUNK = 8  # images per onnxruntime call when a variant is checked on many calibration images


class VerifySet:
    """What variants are verified on: inputs and their eager fp32 outputs, row by row. In memory for the
    export's sample; on disk (raw float32 rows in `folder`) once --calibration-images join it, so that memory
    holds one chunk of VARIANT_CHUNK images whatever their count (2,500 tiny images took 3.4 GB when stacked)."""

    def __init__(self, inputs: np.ndarray, reference: dict[str, np.ndarray], folder: Path | None = None):
        self.folder, self.count = folder, 0
        self.skip = range(0)  # rows this view leaves out (see without)
        self.shapes = {INPUT_NAME: list(inputs.shape[1:]), **{n: list(reference[n].shape[1:]) for n in OUTPUT_NAMES}}
        self.memory = None if folder else {INPUT_NAME: inputs, **{n: reference[n] for n in OUTPUT_NAMES}}
        if folder:
            self.append(inputs, reference)
        else:
            self.count = len(inputs)

    def __len__(self) -> int:
        return self.count - len(self.skip)

    def append(self, inputs: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """Add rows (on disk only): the inputs and their eager outputs."""
        for name, array in ((INPUT_NAME, inputs), *((n, outputs[n]) for n in OUTPUT_NAMES)):
            with open(self.folder / f"{name}.f32", "ab") as handle:
                np.ascontiguousarray(array, dtype=np.float32).tofile(handle)
        self.count += len(inputs)

    def rows(self, name: str, start: int, count: int) -> np.ndarray:
        if self.memory is not None:
            return self.memory[name][start:start + count]
        size = int(np.prod(self.shapes[name]))
        found = np.fromfile(self.folder / f"{name}.f32", dtype=np.float32, count=count * size, offset=start * size * 4)
        return found.reshape(-1, *self.shapes[name])

    def chunks(self, size: int = VARIANT_CHUNK):
        """(inputs, {output: eager fp32 rows}) at most `size` rows at a time, the rows of `skip` left out."""
        for first, stop in ((0, self.skip.start), (self.skip.stop, self.count)) if self.skip else ((0, self.count),):
            for start in range(first, stop, size):
                count = min(size, stop - start)
                yield self.rows(INPUT_NAME, start, count), {n: self.rows(n, start, count) for n in OUTPUT_NAMES}

    def without(self, rows: range) -> "VerifySet":
        """The same set, `rows` left out (sharing the storage)."""
        import copy

        view = copy.copy(self)
        view.skip = rows
        return view


def check_variant(path: Path, inputs, reference: dict[str, np.ndarray] | None, tolerance) -> tuple[bool, dict]:
    """Run the graph at `path` on `inputs` (an array, with `reference`, or a VerifySet) and judge it against the
    eager fp32 outputs by `tolerance`: the lowest cosine (whole and worst sample) and the relative error of
    every output must pass, with no NaN or Inf. Chunk by chunk: memory holds one chunk. Returns (passed,
    figures); figures name the worst output."""
    from vitparity import metrics

    verify_set = inputs if isinstance(inputs, VerifySet) else VerifySet(inputs, reference)
    session = runtime.session(path)
    names = [o.name for o in session.get_outputs()]
    found = {name: metrics.Agreement() for name in names}
    for batch, want in verify_set.chunks():
        for name, got in zip(names, session.run(None, {INPUT_NAME: batch})):
            found[name].add(np.asarray(got, dtype=np.float32), want[name])
    figures, passed = {}, True
    for name in names:
        bad = found[name].nonfinite
        cos = min(found[name].cosine, found[name].worst_sample_cosine) if not bad else float("nan")
        rel = found[name].relative_error if not bad else float("nan")
        judged = tolerance.judge(cos, rel, bad)
        ok = judged.passed
        figures[name] = {"cosine": cos, "rel_error": rel, "nonfinite": bad, "passed": ok, "failed": judged.reason}
        passed = passed and ok
    # The worst output: a failing one first, then the lowest cosine (NaN lowest of all).
    worst = min(figures, key=lambda n: (figures[n]["passed"], np.nan_to_num(figures[n]["cosine"], nan=-np.inf)))
    return passed, {"worst_output": worst, "cosine": figures[worst]["cosine"], "rel_error": figures[worst]["rel_error"],
                    "nonfinite": sum(f["nonfinite"] for f in figures.values()), "outputs": figures}


def _fails(variant: str, tolerance, figures: dict, hint: str) -> CheckFailed:
    worst = figures["outputs"][figures["worst_output"]]
    return CheckFailed(f"the {variant} variant fails its {tolerance.name} class against eager fp32: output "
                       f"{figures['worst_output']} {worst['failed']}; {hint}")


# Real-photo statistics for every variant's verify: the bundled photo and variations of it. The seeded sample
# alone is noise, on which an int8 graph can pass while it fails on photos (dinov2: 0.9996 on the sample,
# 0.9983 on photos). The seed differs from the photos `make bench` measures on, so those stay unseen.
VERIFY_PHOTOS, VERIFY_PHOTOS_SEED = 8, 1


def verify_inputs(sample: np.ndarray, outputs: dict, eager, config: dict, images: str | None, step,
                  folder: Path | None = None, photos: int = VERIFY_PHOTOS) -> tuple[VerifySet, dict]:
    """What variants are verified on: the sample, `photos` variations of the bundled photo and, with `images`,
    those images, each through the model's eval transform, with their eager fp32 outputs (`eager(batch)`),
    streamed into `folder` VARIANT_CHUNK images at a time; and a description for the manifest."""
    from vitparity.images import (
        eval_transform,
        list_images,
        photo_variations,
        preprocess,
        printable,
    )

    described = {"sample": int(len(sample))}
    if not images and not photos:
        return VerifySet(sample, outputs), described
    found, transform, pending, skipped = VerifySet(sample, outputs, folder), eval_transform(config), [], 0
    if photos:
        batch = np.stack([transform(image).numpy().astype(np.float32) for image in photo_variations(photos, VERIFY_PHOTOS_SEED)])
        found.append(batch, eager(batch))
        described["photos"] = photos
        found.photos = range(len(sample), len(sample) + photos)
    if not images:
        return found, described

    def flush() -> None:
        if pending:
            batch = np.stack(pending)
            found.append(batch, eager(batch))
            pending.clear()

    for path in list_images(images, "--calibration-images"):
        try:
            pending.append(preprocess(path, config, transform))
        except UserError as why:
            skipped += 1
            step(f"skipped {printable(path)}: {why}")
        if len(pending) == VARIANT_CHUNK:
            flush()
    flush()
    if len(found) == len(sample) + photos:
        raise UserError(f"--calibration-images {images}: none of the files is a readable image; pass a folder of JPEG or PNG files")
    described["calibration_images"] = len(found) - len(sample) - photos
    described["skipped"] = skipped
    return found, described


def write_variants(stage: Path, inputs: VerifySet, described: dict, options: VariantOptions, step,
                   source: str = "model.onnx") -> dict[str, dict]:
    """Write and verify every variant of `options.variants` from stage/`source`; their manifest records, by file.

    fp16 is made from the LayerNorm-decomposed graph where the artifact has one (so that the CANN provider
    keeps the norms on the NPU, in fp32 by the ViT rules). int8 uses 7-bit weights on hosts without VNNI, and
    when the plain recipe fails its class, the int8 search leaves the smallest set of modules in float.
    Each record holds the CPU that verified it: int8 numerics depend on it. A variant that fails its class
    raises CheckFailed: nothing of this export is published.
    """
    from vitparity import environment
    from vitparity.tolerances import TOLERANCES

    from . import variants

    records = {}
    # A variant made from another's graph (int8-fused from fused) comes after it.
    ordered = sorted(options.variants, key=lambda v: v in variants.MADE_FROM)
    everything = inputs
    for variant in ordered:
        tolerance = TOLERANCES[variants.PRECISION_VARIANTS[variant]]
        # int8 is verified on the photos too (its numerics depend on real activations and on the CPU); fp16 and
        # the fused graph on the sample and any --calibration-images, as before.
        int8 = variants.PRECISION_VARIANTS[variant] == "int8"
        inputs = everything if int8 else everything.without(getattr(everything, "photos", range(0)))
        used = described if int8 else {k: v for k, v in described.items() if k != "photos"}
        target = stage / variants.variant_file(variant)
        origin = variants.LN_DECOMPOSED if variant == variants.FP16 and (stage / variants.LN_DECOMPOSED).is_file() else source
        if variant in variants.MADE_FROM:
            origin = variants.variant_file(variants.MADE_FROM[variant])
            if not (stage / origin).is_file():
                raise UserError(f"the {variant} variant is made from the {variants.MADE_FROM[variant]} graph; add "
                                f"--variant {variants.MADE_FROM[variant]} too")
        search = None
        if variant == variants.FUSED:
            step("writing the fused fp32 graph with onnxruntime.transformers.optimizer")
            recipe = variants.write_fused(stage / origin, target)
        elif variant == variants.FP16 and options.search_precision:
            step(f"searching what must stay fp32 in the fp16 graph (on {len(inputs)} inputs)")
            search = _search(variant, stage / origin, target, inputs, tolerance, step)
            recipe = variants.write_fp16(stage / origin, target, keep_ops=(), keep_nodes=search["nodes"])
            recipe["keep_fp32"]["entries"] = search["keep_fp32"]
        elif variant == variants.FP16:
            step(f"writing the fp16 variant, {', '.join(options.fp16_keep) or 'nothing'} kept fp32")
            recipe = variants.write_fp16(stage / origin, target, keep_ops=options.fp16_keep)
        else:
            host = environment.cpu()
            reduce_range = environment.int8_reduce_range(host)
            step(f"writing the {variant} variant with onnxruntime.quantization" + (" (7-bit weights: no VNNI here)" if reduce_range else ""))
            calibration = (lambda: (batch for batch, _ in inputs.chunks(1))) if variant == variants.INT8_QDQ else None

            def write(exclude=()):
                return variants.write_int8(stage / origin, target, calibration, len(inputs), exclude, reduce_range)

            recipe = write()
            passed, figures = check_variant(target, inputs, None, tolerance)
            if not passed:
                step(f"the plain {variant} recipe fails its class (cosine {figures['cosine']:.6f}, rel err "
                     f"{figures['rel_error']:.3g}): searching the smallest set of modules to leave in float")
                search = _search(variant, stage / origin, target, inputs, tolerance, step,
                                 lambda kept: write(sorted(kept)))
                recipe = write(search["nodes"])
                recipe["keep_float"]["entries"] = search["keep_fp32"]
        step(f"verifying the {variant} variant against eager fp32 ({tolerance.name} class)")
        passed, figures = check_variant(target, inputs, None, tolerance)
        if not passed:
            hint = ("keep more fp32 (--fp16-keep OPS) or let --search-precision find the smallest list"
                    if variant == variants.FP16 else "the optimizer's fusions change the numbers: do not use this graph"
                    if variant == variants.FUSED else "try another int8 recipe (int8 or int8-qdq) or --calibration-images")
            raise _fails(variant, tolerance, figures, hint)
        records[target.name] = {
            "variant": variant, "class": variants.PRECISION_VARIANTS[variant], "from": origin, "recipe": recipe,
            "verify": {**{k: figures[k] for k in ("cosine", "rel_error", "worst_output", "outputs")}, "inputs": used,
                       "thresholds": {"min_cosine": tolerance.min_cosine, "max_rel": tolerance.max_rel},
                       "host": environment.cpu()},
            **({"search": {"keep_fp32": search["keep_fp32"], "trials": search["trials"]}} if search else {}),
        }
    return records


def _search(variant: str, source: Path, target: Path, inputs: VerifySet, tolerance, step, write=None) -> dict:
    """keep_fp32.search over the nodes of `source`, each trial a graph written to `target` and checked: for fp16
    what stays fp32, by block scope then op type; for int8 which quantized nodes stay float, by block scope
    then module (blocks.2.mlp.fc2). CheckFailed when even keeping every node in float fails."""
    import onnx

    from . import keep_fp32, variants

    graph = onnx.load(str(source), load_external_data=False).graph
    if variant == variants.FP16:
        nodes = [(node.name, variants.scope_of(node), node.op_type) for node in graph.node if node.name]
        label, write = (lambda scope, op: f"{scope}/{op}"), \
            (lambda kept: variants.write_fp16(source, target, keep_ops=(), keep_nodes=sorted(kept)))
    else:
        nodes = [(node.name, variants.scope_of(node), variants.module_of(node)) for node in graph.node
                 if node.name and node.op_type in variants.INT8_OPS]
        label = lambda scope, module: module  # noqa: E731

    def judge(kept: frozenset) -> tuple[bool, dict]:
        write(kept)
        passed, figures = check_variant(target, inputs, None, tolerance)
        return passed, {k: figures[k] for k in ("cosine", "rel_error", "worst_output")}

    found = keep_fp32.search(nodes, judge, step, label)
    if not found["passed"]:
        raise CheckFailed(f"the {variant} variant fails its {tolerance.name} class even with every node kept in float: "
                          f"the conversion itself breaks the graph, not its precision")
    return found


def add_variants(root: Path | str, key: str, options: VariantOptions, step=lambda message: None) -> dict[str, dict]:
    """Add the variants of `options.variants` to the existing artifact `key`, in one atomic publish: the
    artifact's files are linked into a staging folder, the variants written and verified there, and the
    whole swapped in. Killed at any instant, or failing a check, the previous artifact stays as it was."""
    art = artifact.load(root, key)
    with np.load(art.path("sample.npz")) as found:
        sample, outputs = found[INPUT_NAME], {name: found[name] for name in OUTPUT_NAMES}
    from vitparity.eager import (  # the eager outputs of the photos and images
        eager_outputs,
        rebuild_model,
    )

    model = rebuild_model(art)
    eager = lambda batch: eager_outputs(model, batch)  # noqa: E731
    with linked_stage(art) as stage, processes.temp_folder(processes.IMAGES_PREFIX) as scratch:
        inputs, described = verify_inputs(sample, outputs, eager, art.manifest["data_config"],
                                          options.calibration_images, step, scratch)
        added = write_variants(stage, inputs, described, options, step)
        step("publishing")
        publish_added(art, stage, added)
    return added


@contextmanager
def linked_stage(art: artifact.Artifact):
    """A staging folder beside the artifact holding hard links to its files, for the variants to be written into."""
    with artifact.staging(art.folder) as stage:
        for name in art.manifest["files"]:
            _link(art.path(name), stage / name)
        yield stage


def publish_added(art: artifact.Artifact, stage: Path, added: dict[str, dict]) -> None:
    """Swap the staged folder in place of the artifact, its manifest listing the `added` variants too."""
    manifest = {**art.manifest, "variants": {**art.manifest.get("variants", {}), **added}}
    manifest.pop("files")
    artifact.publish_stage(art.folder, stage, manifest)


def _link(source: Path, target: Path) -> None:
    # The staging folder is beside the artifact: the same filesystem. Never through a link: the loader
    # refused artifact files that are links, and a hard link made with follow_symlinks=False is to the entry itself.
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copyfile(source, target, follow_symlinks=False)


