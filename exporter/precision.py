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
from dataclasses import dataclass, field, replace
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
    int8_keep: tuple[str, ...] = ()  # modules (timm's names: blocks.0, blocks.3.mlp.fc2) the int8 graphs keep in float

    def minimum(self) -> int:
        """The readable --calibration-images these variants need."""
        return MIN_CALIBRATION if "int8-qdq" in self.variants else 1


@dataclass(frozen=True)
class Added:
    """Variants added to an existing artifact, for the exporter's summary and --json."""

    model: str
    folder: str
    variants: dict = field(default_factory=dict)

VARIANT_CHUNK = 8  # images per onnxruntime call when a variant is checked on many images

# The roles of the verify inputs. The searches judge on SEARCHED only; the final verify on every row, and the
# HELD_OUT rows' figures are recorded apart: "verified" then says something about images no search looked at.
SAMPLE, PHOTOS, HELD_OUT_PHOTOS, IMAGES, HELD_OUT_IMAGES = "sample", "photos", "held_out_photos", "calibration_images", \
    "held_out_images"
SEARCHED = (SAMPLE, PHOTOS, IMAGES)
HELD_OUT = (HELD_OUT_PHOTOS, HELD_OUT_IMAGES)
SINGLE = (PHOTOS, HELD_OUT_PHOTOS)  # also run one at a time: compare's default is the bundled photo at batch 1
HOLD_OUT_EVERY = 4  # of --calibration-images, every 4th readable image is held out of the search (and calibration)


class VerifySet:
    """What variants are verified on: inputs and their eager fp32 outputs, row by row, each row with its role
    (the seeded sample, the photo variations, the calibration images, and those held out of the searches). In
    memory for the export's sample alone; on disk (raw float32 rows in `folder`) once images join it, so that
    memory holds one chunk of VARIANT_CHUNK images whatever their count (2,500 tiny images took 3.4 GB when
    stacked). `layout` is the model's token layout: the rows judged are those compare judges (token groups too)."""

    def __init__(self, inputs: np.ndarray, reference: dict[str, np.ndarray], folder: Path | None = None,
                 layout: dict | None = None):
        self.folder, self.count, self.layout = folder, 0, layout
        self.roles: list[str] = []
        self.index: list[int] | None = None  # the rows of this view (see `only`); None: every row
        self.shapes = {INPUT_NAME: list(inputs.shape[1:]), **{n: list(reference[n].shape[1:]) for n in OUTPUT_NAMES}}
        self.memory = None if folder else {INPUT_NAME: inputs, **{n: reference[n] for n in OUTPUT_NAMES}}
        if folder:
            self.append(inputs, reference, SAMPLE)
        else:
            self.count, self.roles = len(inputs), [SAMPLE] * len(inputs)

    @property
    def rows(self) -> list[int]:
        return list(range(self.count)) if self.index is None else self.index

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, inputs: np.ndarray, outputs: dict[str, np.ndarray], role: str) -> None:
        """Add rows of `role` (on disk only): the inputs and their eager outputs."""
        for name, array in ((INPUT_NAME, inputs), *((n, outputs[n]) for n in OUTPUT_NAMES)):
            with open(self.folder / f"{name}.f32", "ab") as handle:
                np.ascontiguousarray(array, dtype=np.float32).tofile(handle)
        self.count += len(inputs)
        self.roles += [role] * len(inputs)

    def counts(self) -> dict[str, int]:
        """How many rows of this view each role has, in role order: what the manifest records."""
        found: dict[str, int] = {}
        for row in self.rows:
            found[self.roles[row]] = found.get(self.roles[row], 0) + 1
        return found

    def _read(self, name: str, rows: list[int]) -> np.ndarray:
        if self.memory is not None:
            return self.memory[name][rows]
        size = int(np.prod(self.shapes[name]))
        runs, start = [], 0
        for i in range(1, len(rows) + 1):  # contiguous runs of rows, one read each
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                runs.append(np.fromfile(self.folder / f"{name}.f32", dtype=np.float32, count=(i - start) * size,
                                        offset=rows[start] * size * 4))
                start = i
        return np.concatenate(runs).reshape(-1, *self.shapes[name])

    def chunks(self, size: int = VARIANT_CHUNK, rows: list[int] | None = None):
        """(inputs, {output: eager fp32 rows}) at most `size` rows at a time, over this view's rows (or `rows`)."""
        rows = self.rows if rows is None else rows
        for start in range(0, len(rows), size):
            part = rows[start:start + size]
            yield self._read(INPUT_NAME, part), {n: self._read(n, part) for n in OUTPUT_NAMES}

    def only(self, *roles: str) -> "VerifySet":
        """The same set, only the rows of `roles` (sharing the storage)."""
        import copy

        view = copy.copy(self)
        view.index = [row for row in self.rows if self.roles[row] in roles]
        return view

    def without(self, *roles: str) -> "VerifySet":
        return self.only(*(role for role in dict.fromkeys(self.roles) if role not in roles))


def check_variant(path: Path, inputs, reference: dict[str, np.ndarray] | None, tolerance,
                  layout: dict | None = None, stop_early: bool = False) -> tuple[bool, dict]:
    """Run the graph at `path` on `inputs` (an array, with `reference`, or a VerifySet) and judge it against the
    eager fp32 outputs with compare's judge (vitparity/judging.py): every output and every token group, on the
    whole and on the worst item, at the chunk's batch size and, for the photos, at batch 1 too (dynamic int8
    scales its activations over the whole batch, so batch 1 is another graph's numbers). Chunk by chunk: memory
    holds one chunk. Returns (passed, figures): the worst row, every row by label, and the held-out rows apart.
    `stop_early` (the searches' trials): stop at the first chunk with an item that fails alone, which fails its row
    whatever the rest holds; the figures are then those of the rows run so far."""
    from vitparity import judging

    verify_set = inputs if isinstance(inputs, VerifySet) else VerifySet(inputs, reference, layout=layout)
    layout = verify_set.layout if layout is None else layout
    session = runtime.session(path)
    names = [o.name for o in session.get_outputs()]
    chunks, items = [], []
    singles = [row for row in verify_set.rows if verify_set.roles[row] in SINGLE]
    for size, rows in ((VARIANT_CHUNK, verify_set.rows), (1, singles)):
        for batch, want in verify_set.chunks(size, rows):
            got = dict(zip(names, session.run(None, {INPUT_NAME: batch})))
            chunks.append(judging.item_figures({n: np.asarray(got[n], dtype=np.float32) for n in OUTPUT_NAMES}, want, layout))
            if stop_early and not all(tolerance.judge(float(np.min(f["cosine"])), float(np.max(f["rel_error"])),
                                                     int(np.sum(f["nonfinite"]))).passed
                                      for f in chunks[-1].values() if "cosine" in f):
                return _summary(judging.judge_rows(judging.concatenate(chunks), tolerance))
        items += [verify_set.roles[row] for row in rows]
    figures = judging.concatenate(chunks)
    passed, found = _summary(judging.judge_rows(figures, tolerance))
    held = [index for index, role in enumerate(items) if role in HELD_OUT]
    if held:
        found["held_out"] = _summary(judging.judge_rows(judging.select(figures, held), tolerance))[1]
    return passed, found


def _summary(rows) -> tuple[bool, dict]:
    from vitparity import judging

    worst = judging.worst(rows)
    return all(row.passed for row in rows), {
        "worst_output": worst.label, "cosine": worst.cosine, "rel_error": worst.rel_error, "margin": worst.margin,
        "nonfinite": sum(row.nonfinite for row in rows),
        "outputs": {row.label: {"cosine": row.cosine, "rel_error": row.rel_error, "nonfinite": row.nonfinite,
                                "passed": row.passed, "failed": row.reason, "margin": row.margin} for row in rows}}


def _fails(variant: str, tolerance, figures: dict, hint: str) -> CheckFailed:
    worst = figures["outputs"][figures["worst_output"]]
    return CheckFailed(f"the {variant} variant fails its {tolerance.name} class against eager fp32: "
                       f"{figures['worst_output']} {worst['failed']}; {hint}")


# Real-photo statistics for every variant's verify: the bundled photo and variations of it. The seeded sample
# alone is noise, on which an int8 graph can pass while it fails on photos (dinov2: 0.9996 on the sample,
# 0.9983 on photos). The searches judge on the first set; the second (another seed) is held out of them. Both
# seeds differ from the photos `make bench` measures on, so those stay unseen.
VERIFY_PHOTOS, VERIFY_PHOTOS_SEED, HELD_OUT_PHOTOS_SEED = 8, 1, 2
# What an int8 search aims for: this share of the class's error budget on the searched rows, then the class itself
# on every row, the held-out ones included; when the held-out rows fail, the next, smaller share. Half the budget:
# with 0.8, an int8-qdq graph of test_vit passed its held-out rows (cosine 0.99938) and failed on a texture photo
# none of them resembled (gravel.png, 0.99887); with 0.5 it kept 0.99921 there.
SEARCH_SHARES = (0.5, 0.25)


MIN_CALIBRATION = 4  # readable images int8-qdq needs: three to calibrate on, one held out


def verify_inputs(sample: np.ndarray, outputs: dict, eager, config: dict, images: str | None, step,
                  folder: Path | None = None, photos: int = VERIFY_PHOTOS, layout: dict | None = None,
                  minimum: int = 1) -> tuple[VerifySet, dict]:
    """What variants are verified on: the sample, `photos` variations of the bundled photo, `photos` more held
    out of the searches and, with `images`, those images (every HOLD_OUT_EVERY-th held out), each through the
    model's eval transform, with their eager fp32 outputs (`eager(batch)`), streamed into `folder`
    VARIANT_CHUNK images at a time; and the count of each role, for the manifest. Fewer than `minimum` readable
    images is a UserError that says how many were read and why the others were skipped."""
    from vitparity.images import (
        eval_transform,
        list_images,
        photo_variations,
        preprocess,
        printable,
    )

    if not images and not photos:
        found = VerifySet(sample, outputs, layout=layout)
        return found, found.counts()
    found, transform, skipped = VerifySet(sample, outputs, folder, layout), eval_transform(config), 0
    pending: dict[str, list] = {IMAGES: [], HELD_OUT_IMAGES: []}

    def add(rows: list, role: str) -> None:
        batch = np.stack(rows)
        found.append(batch, eager(batch), role)
        rows.clear()

    for seed, role in ((VERIFY_PHOTOS_SEED, PHOTOS), (HELD_OUT_PHOTOS_SEED, HELD_OUT_PHOTOS)):
        if photos:
            add([transform(image).numpy().astype(np.float32) for image in photo_variations(photos, seed)], role)
    read, why_skipped = 0, ""
    for path in list_images(images, "--calibration-images") if images else ():
        try:
            row = preprocess(path, config, transform)
        except UserError as why:
            skipped += 1
            why_skipped = why_skipped or f"{printable(path)}: {why}"
            step(f"skipped {printable(path)}: {why}")
            continue
        read += 1
        role = HELD_OUT_IMAGES if read % HOLD_OUT_EVERY == 0 else IMAGES
        pending[role].append(row)
        if len(pending[role]) == VARIANT_CHUNK:
            add(pending[role], role)
    for role, rows in pending.items():
        if rows:
            add(rows, role)
    if images and read < minimum:
        raise UserError(f"--calibration-images {images}: {read} readable image{'s' if read != 1 else ''} of {read + skipped}, "
                        f"{minimum} needed" + (f" ({skipped} skipped, the first: {why_skipped})" if skipped else "")
                        + "; pass a folder of JPEG or PNG photos")
    described = found.counts()
    if images:
        described["skipped"] = skipped
    return found, described


def write_variants(stage: Path, inputs: VerifySet, described: dict, options: VariantOptions, step,
                   source: str = "model.onnx") -> dict[str, dict]:
    """Write and verify every variant of `options.variants` from stage/`source`; their manifest records, by file.

    fp16 is made from the LayerNorm-decomposed graph where the artifact has one (so that the CANN provider
    keeps the norms on the NPU, in fp32 by the ViT rules). int8 uses 7-bit weights on hosts without VNNI, and
    when the plain recipe misses its aim (a share of the class's budget) on the searched rows, the int8 search
    leaves the smallest set of modules in float; then every variant is verified by its class on every row, the
    held-out ones included. Each record holds the CPU that verified it: int8 numerics depend on it. A variant
    that fails its class raises CheckFailed: nothing of this export is published.
    """
    from vitparity import environment
    from vitparity.tolerances import TOLERANCES

    from . import variants

    records = {}
    # A variant made from another's graph (int8-fused from fused) comes after it.
    ordered = sorted(options.variants, key=lambda v: v in variants.MADE_FROM)
    searched = inputs.only(*SEARCHED)
    for variant in ordered:
        tolerance = TOLERANCES[variants.PRECISION_VARIANTS[variant]]
        target = stage / variants.variant_file(variant)
        origin = variants.LN_DECOMPOSED if variant == variants.FP16 and (stage / variants.LN_DECOMPOSED).is_file() else source
        if variant in variants.MADE_FROM:
            origin = variants.variant_file(variants.MADE_FROM[variant])
            if not (stage / origin).is_file():
                raise UserError(f"the {variant} variant is made from the {variants.MADE_FROM[variant]} graph; add "
                                f"--variant {variants.MADE_FROM[variant]} too")
        search, aim = None, None
        if variant == variants.FUSED:
            step("writing the fused fp32 graph with onnxruntime.transformers.optimizer")
            recipe = variants.write_fused(stage / origin, target)
        elif variant == variants.FP16 and options.search_precision:
            # fp16 aims for its class itself: no calibration and no batch dependence, and even every node kept fp32
            # leaves the casts' rounding, which a share of the budget may not cover (an overflowing model's 1.3e-2).
            aim = tolerance
            step(f"searching what must stay fp32 in the fp16 graph (on {len(searched)} inputs)")
            search = _search(variant, stage / origin, target, searched, aim, step)
            recipe = variants.write_fp16(stage / origin, target, keep_ops=(), keep_nodes=search["nodes"])
            recipe["keep_fp32"]["entries"] = search["keep_fp32"]
        elif variant == variants.FP16:
            step(f"writing the fp16 variant, {', '.join(options.fp16_keep) or 'nothing'} kept fp32")
            recipe = variants.write_fp16(stage / origin, target, keep_ops=options.fp16_keep)
        else:  # int8-fused starts from what int8 needed in this export (the same modules), when it is made too
            done = [r["search"]["keep_fp32"] for r in sorted(records.values(), key=lambda r: r["variant"] != "int8")
                    if r["class"] == "int8" and "search" in r]
            recipe, search, aim = _int8(variant, stage / origin, target, inputs, tolerance, options, step,
                                        done[0] if done else None)
        step(f"verifying the {variant} variant against eager fp32 ({tolerance.name} class, held-out images included)")
        passed, figures = check_variant(target, inputs, None, tolerance)
        if not passed:
            hint = ("keep more fp32 (--fp16-keep OPS) or let --search-precision find the smallest list"
                    if variant == variants.FP16 else "the optimizer's fusions change the numbers: do not use this graph"
                    if variant == variants.FUSED else "keep modules in float with --int8-keep MODULES, or try int8-qdq "
                    "with --calibration-images")
            raise _fails(variant, tolerance, figures, hint)
        records[target.name] = {
            "variant": variant, "class": variants.PRECISION_VARIANTS[variant], "from": origin, "recipe": recipe,
            "verify": {**{k: figures[k] for k in ("cosine", "rel_error", "margin", "worst_output", "outputs")},
                       **({"held_out": figures["held_out"]} if "held_out" in figures else {}),
                       "inputs": described, "searched_on": searched.counts(),
                       "thresholds": {"min_cosine": tolerance.min_cosine, "max_rel": tolerance.max_rel},
                       "host": environment.cpu(), "session_config": runtime.session_config()},
            **({"search": {"keep_fp32": search["keep_fp32"], "trials": search["trials"],
                           **({"started_from": search["started_from"]} if "started_from" in search else {}),
                           "aim": {"min_cosine": aim.min_cosine, "max_rel": aim.max_rel}}} if search else {}),
        }
    return records


def _int8(variant: str, source: Path, target: Path, inputs: VerifySet, tolerance, options: VariantOptions, step,
          start=None) -> tuple[dict, dict | None, object]:
    """Write the int8 graph: the plain recipe (the --int8-keep modules in float) when it reaches its aim on the
    searched rows, else the smallest set of modules the search leaves in float; and again with a smaller share
    of the budget while the held-out rows fail the class. Returns (recipe, search or None, the aim)."""
    from vitparity import environment, judging

    from . import variants

    # 7-bit weights only for the calibrated graph on x86 without VNNI: its s8 activations are not covered by the U8U8
    # mode every session gets there (vitparity/runtime.py session_config), which makes dynamic int8's products exact.
    reduce_range = variant == variants.INT8_QDQ and environment.u8s8_saturates(environment.cpu())
    modules = variants.int8_modules(source)
    forced = variants.nodes_of_modules(modules, options.int8_keep)
    step(f"writing the {variant} variant with onnxruntime.quantization" + (" (7-bit weights: no VNNI here)" if reduce_range else ""))
    calibration, cache = None, None
    if variant == variants.INT8_QDQ:  # calibrated on the searched photos and images, never on noise or held-out rows
        real = inputs.only(PHOTOS, IMAGES)
        calibration = lambda: (batch for batch, _ in real.chunks())  # noqa: E731
        if inputs.folder is not None:
            cache = inputs.folder / f"{variant}.calibration.json"  # the scratch folder: calibrated once per export

    def write(exclude=()):
        return variants.write_int8(source, target, calibration, len(inputs.only(PHOTOS, IMAGES)),
                                   sorted({*forced, *exclude}), reduce_range, cache)

    searched, search = inputs.only(*SEARCHED), None
    for share in SEARCH_SHARES:
        aim = judging.with_margin(tolerance, share)
        recipe = write()
        passed, figures = check_variant(target, searched, None, aim)
        if not passed:
            step(f"the plain {variant} recipe misses its aim ({figures['worst_output']} cosine {figures['cosine']:.6f}, "
                 f"rel err {figures['rel_error']:.3g}; {aim.name}): searching the smallest set of modules to leave in float")
            search = _search(variant, source, target, searched, aim, step, lambda kept: write(sorted(kept)), forced, start)
            recipe = write(search["nodes"])
            recipe["keep_float"]["entries"] = list(dict.fromkeys([*options.int8_keep, *search["keep_fp32"]]))
        elif options.int8_keep:
            recipe["keep_float"]["entries"] = list(options.int8_keep)
        if check_variant(target, inputs, None, tolerance)[0]:
            break
        step(f"the {variant} graph fails its class on the held-out images: aiming for less of the budget")
    return recipe, search, aim


def _search(variant: str, source: Path, target: Path, inputs: VerifySet, tolerance, step, write=None,
            forced=frozenset(), start=None) -> dict:
    """keep_fp32.search over the nodes of `source`, each trial a graph written to `target` and checked: for fp16
    what stays fp32, by block scope then op type; for int8 which quantized nodes stay float, by block scope
    then module (blocks.2.mlp.fc2), the `forced` nodes (--int8-keep) always in float. CheckFailed when even
    keeping every node in float fails."""
    import onnx

    from . import keep_fp32, variants

    graph = onnx.load(str(source), load_external_data=False).graph
    cost = None
    if variant == variants.FP16:
        nodes = [(node.name, variants.scope_of(node), node.op_type) for node in graph.node if node.name]
        label, write = (lambda scope, op: f"{scope}/{op}"), \
            (lambda kept: variants.write_fp16(source, target, keep_ops=(), keep_nodes=sorted(kept)))
    else:
        modules = variants.int8_modules(source)
        nodes = [(node.name, _scope(modules[node.name]), modules[node.name]) for node in graph.node
                 if node.name in modules and node.name not in forced]
        label = lambda scope, module: module  # noqa: E731
        cost = variants.weight_sizes(graph)  # a MatMul kept in float costs in proportion to its weights

    def judge(kept: frozenset) -> tuple[bool, dict]:
        write(kept)
        passed, figures = check_variant(target, inputs, None, tolerance, stop_early=True)
        return passed, {k: figures[k] for k in ("cosine", "rel_error", "worst_output")}

    found = keep_fp32.search(nodes, judge, step, label, start, cost)
    if not found["passed"]:
        raise CheckFailed(f"the {variant} variant fails its {tolerance.name} class even with every node kept in float: "
                          f"the conversion itself breaks the graph, not its precision")
    return found


def _scope(module: str) -> str:
    """The search's first level for a module: its block (blocks.2.mlp.fc2 -> blocks.2), else its top module."""
    head = module.split(".")
    return ".".join(head[:2]) if head[0] == "blocks" and len(head) > 1 else head[0]


def add_variants(root: Path | str, key: str, options: VariantOptions, step=lambda message: None,
                 still_missing=None) -> dict[str, dict]:
    """Add the variants of `options.variants` to the existing artifact `key`, in one atomic publish: the
    artifact's files are linked into a staging folder, the variants written and verified there, and the
    whole swapped in. Killed at any instant, or failing a check, the previous artifact stays as it was.

    The artifact's lock is held from reading its manifest to publishing: another writer (an export, another
    variant) goes before or after, never between, so neither loses the other's work, and a variant is judged
    against the graph and weights it is published beside. `still_missing(manifest)`, read under the lock, says
    which of the variants are still to make (another writer may have made them meanwhile)."""
    from .variants import variant_file

    with artifact.writing(artifact.artifact_folder(root, key)):
        art = artifact.load(root, key)
        if still_missing is not None:
            options = replace(options, variants=tuple(still_missing(art.manifest)))
            if not options.variants:
                return {}
        with np.load(art.path("sample.npz")) as found:
            sample, outputs = found[INPUT_NAME], {name: found[name] for name in OUTPUT_NAMES}
        from vitparity.eager import (  # the eager outputs of the photos and images
            eager_outputs,
            rebuild_model,
        )

        model = rebuild_model(art)
        eager = lambda batch: eager_outputs(model, batch)  # noqa: E731
        remade = [variant_file(variant) for variant in options.variants]
        with linked_stage(art, remade) as stage, processes.temp_folder(processes.IMAGES_PREFIX) as scratch:
            inputs, described = verify_inputs(sample, outputs, eager, art.manifest["data_config"], options.calibration_images,
                                              step, scratch, layout=art.manifest.get("token_layout"), minimum=options.minimum())
            added = write_variants(stage, inputs, described, options, step)
            step("publishing")
            publish_added(art, stage, added)
    return added


@contextmanager
def linked_stage(art: artifact.Artifact, leave=()):
    """A staging folder beside the artifact holding hard links to its files, for the variants to be written into;
    the files `leave` (variants being made again) and their derived graphs are left out, and so is a derived
    graph that is missing or damaged (whoever uses one rebuilds it). A new file is written, never a linked one
    rewritten: a hard link shares the published file's bytes."""
    from vitparity.blocks import blocks_file

    skipped = {*leave, *(blocks_file(name) for name in leave)}
    with artifact.staging(art.folder) as stage:
        for name in art.manifest["files"]:
            if name in skipped or (name.endswith(artifact.DERIVED_SUFFIX) and artifact.file_problem(art, name)):
                continue
            _link(art.path(name), stage / name)
        yield stage


def publish_added(art: artifact.Artifact, stage: Path, added: dict[str, dict]) -> None:
    """Swap the staged folder in place of the artifact, its manifest listing the `added` variants too (and no
    record whose file the stage does not hold)."""
    variants = {name: record for name, record in {**art.manifest.get("variants", {}), **added}.items()
                if (stage / name).is_file()}
    manifest = {**art.manifest, "variants": variants}
    manifest.pop("files")
    artifact.publish_stage(art.folder, stage, manifest)


def _link(source: Path, target: Path) -> None:
    # The staging folder is beside the artifact: the same filesystem. Never through a link: the loader
    # refused artifact files that are links, and a hard link made with follow_symlinks=False is to the entry itself.
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copyfile(source, target, follow_symlinks=False)




# Photo variations per size a dynamic graph's variants are verified at (besides the seeded sample of that size).
SIZE_PHOTOS = 4


def verify_at_sizes(stage: Path, records: dict, model, config: dict, size_record: dict, layout: dict | None, step,
                    sample) -> None:
    """Each variant of a dynamic graph at every other size its model.onnx was verified at, judged by its class against
    eager fp32 at that size, on the seeded sample and SIZE_PHOTOS variations of the bundled photo through the eval
    transform scaled to the size (`sample(input_size)`: the exporter's seeded sample). Adds verify.sizes to each record; raises CheckFailed at the first that fails."""
    from vitparity import sizes
    from vitparity.eager import eager_outputs
    from vitparity.images import eval_transform, photo_variations
    from vitparity.tolerances import TOLERANCES

    from . import variants

    native = tuple(size_record["native"])
    for size in [tuple(s) for s in size_record["verified"] if tuple(s) != native]:
        label = sizes.label(size)
        at = {**config, "input_size": [config["input_size"][0], *size]}
        transform = eval_transform(at)
        photos = np.stack([transform(image).numpy().astype(np.float32) for image in photo_variations(SIZE_PHOTOS, VERIFY_PHOTOS_SEED)])
        batch = np.concatenate([sample([config["input_size"][0], *size]), photos])
        want = eager_outputs(model, batch)
        for name, record in records.items():
            if "variant" not in record:
                continue
            tolerance = TOLERANCES[variants.PRECISION_VARIANTS[record["variant"]]]
            step(f"verifying the {record['variant']} variant at {label}")
            passed, figures = check_variant(stage / name, batch, want, tolerance, sizes.layout_at(layout, size, size_record["patch"]))
            if not passed:
                raise _fails(record["variant"], tolerance, figures, f"at {label} (it passed at {sizes.label(native)}); "
                             f"export without --dynamic-size, or verify the sizes you run with --verify-size")
            record["verify"].setdefault("sizes", {})[label] = {k: figures[k] for k in ("cosine", "rel_error", "worst_output")}
