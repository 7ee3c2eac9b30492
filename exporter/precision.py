"""Reduced-precision variants of an artifact: written with the recipes of exporter/variants.py, verified
against eager fp32 by their tolerance class, searched for what must stay fp32 (exporter/keep_fp32.py),
and added to an existing artifact in one atomic publish.

Nothing here imports torch: a variant is checked against the eager outputs the artifact keeps in
sample.npz, unless --calibration-images asks for the eager outputs of those images too.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import artifact, runtime
from .artifact import INPUT_NAME, OUTPUT_NAMES
from .errors import CheckFailed, UserError
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


def check_variant(path: Path, inputs: np.ndarray, reference: dict[str, np.ndarray], tolerance) -> tuple[bool, dict]:
    """Run the graph at `path` on `inputs` and judge it against the eager fp32 `reference` by `tolerance`:
    the lowest cosine (whole and worst sample) and the relative error of every output must pass, with
    no NaN or Inf. Returns (passed, figures); figures name the worst output."""
    from exporter import metrics

    session = runtime.session(path)
    names = [o.name for o in session.get_outputs()]
    chunks = [session.run(None, {INPUT_NAME: inputs[i:i + VARIANT_CHUNK]}) for i in range(0, len(inputs), VARIANT_CHUNK)]
    figures, passed = {}, True
    for index, name in enumerate(names):
        got = np.concatenate([chunk[index] for chunk in chunks]).astype(np.float32)
        want = reference[name]
        bad = metrics.nonfinite_count(got)
        cos = min(metrics.cosine(got, want), metrics.worst_sample_cosine(got, want)) if not bad else float("nan")
        rel = metrics.relative_error(got, want) if not bad else float("nan")
        ok = bool(not bad and cos >= tolerance.min_cosine and rel <= tolerance.max_rel)
        figures[name] = {"cosine": cos, "rel_error": rel, "nonfinite": bad, "passed": ok}
        passed = passed and ok
    # The worst output: a failing one first, then the lowest cosine (NaN lowest of all).
    worst = min(figures, key=lambda n: (figures[n]["passed"], np.nan_to_num(figures[n]["cosine"], nan=-np.inf)))
    return passed, {"worst_output": worst, "cosine": figures[worst]["cosine"], "rel_error": figures[worst]["rel_error"],
                    "nonfinite": sum(f["nonfinite"] for f in figures.values()), "outputs": figures}


def _fails(variant: str, tolerance, figures: dict, hint: str) -> CheckFailed:
    worst = figures["outputs"][figures["worst_output"]]
    found = (f"{worst['nonfinite']} NaN/Inf values" if worst["nonfinite"] else
             f"cosine {worst['cosine']:.6f} (need >= {tolerance.min_cosine}), rel err {worst['rel_error']:.3g} "
             f"(need <= {tolerance.max_rel})")
    return CheckFailed(f"the {variant} variant fails its {tolerance.name} class against eager fp32: output "
                       f"{figures['worst_output']} {found}; {hint}")


def verify_inputs(sample: np.ndarray, outputs: dict, eager, config: dict, images: str | None, step) -> tuple[np.ndarray, dict, dict]:
    """What variants are verified on: the sample and, with `images`, those images through the model's eval
    transform; their eager fp32 outputs (`eager(batch)` gives those of the images); a description for the manifest."""
    described = {"sample": int(len(sample))}
    if not images:
        return sample, outputs, described
    from .images import eval_transform, list_images, preprocess

    transform, decoded = eval_transform(config), []
    for path in list_images(images, "--calibration-images"):
        try:
            decoded.append(preprocess(path, config, transform))
        except UserError as why:
            step(f"skipped {path}: {why}")
    if not decoded:
        raise UserError(f"--calibration-images {images}: none of the files is a readable image; pass a folder of JPEG or PNG files")
    batch = np.stack(decoded)
    found = [eager(batch[i:i + VARIANT_CHUNK]) for i in range(0, len(batch), VARIANT_CHUNK)]
    described["calibration_images"] = len(batch)
    return (np.concatenate([sample, batch]),
            {name: np.concatenate([outputs[name], *(e[name] for e in found)]) for name in OUTPUT_NAMES}, described)


def write_variants(stage: Path, inputs: np.ndarray, reference: dict, described: dict, options: VariantOptions, step,
                       source: str = "model.onnx") -> dict[str, dict]:
    """Write and verify every variant of `options.variants` from stage/`source`; their manifest records, by file.

    A variant that fails its class raises CheckFailed: nothing of this export is published.
    """
    from . import variants
    from .tolerances import TOLERANCES

    records = {}
    for variant in options.variants:
        tolerance = TOLERANCES[variants.PRECISION_VARIANTS[variant]]
        target = stage / variants.variant_file(variant)
        search = None
        if variant == variants.FP16 and options.search_precision:
            step(f"searching what must stay fp32 in the fp16 graph (on {len(inputs)} inputs)")
            search = _search_fp32(stage / source, target, inputs, reference, tolerance, step)
            if not search["passed"]:
                raise CheckFailed(f"the fp16 variant fails its {tolerance.name} class even with every node kept fp32: the "
                                  f"conversion itself breaks the graph, not its precision")
            recipe = variants.write_fp16(stage / source, target, keep_ops=(), keep_nodes=search["nodes"])
            recipe["keep_fp32"]["entries"] = search["keep_fp32"]
        elif variant == variants.FP16:
            step(f"writing the fp16 variant, {', '.join(options.fp16_keep) or 'nothing'} kept fp32")
            recipe = variants.write_fp16(stage / source, target, keep_ops=options.fp16_keep)
        else:
            step(f"writing the {variant} variant with onnxruntime.quantization")
            calibration = inputs if variant == variants.INT8_QDQ else None
            recipe = variants.write_int8(stage / source, target, calibration)
        step(f"verifying the {variant} variant against eager fp32 ({tolerance.name} class)")
        passed, figures = check_variant(target, inputs, reference, tolerance)
        if not passed:
            hint = ("keep more fp32 (--fp16-keep OPS) or let --search-precision find the smallest list"
                    if variant == variants.FP16 else "try another int8 recipe (int8 or int8-qdq) or --calibration-images")
            raise _fails(variant, tolerance, figures, hint)
        records[target.name] = {
            "variant": variant, "class": variants.PRECISION_VARIANTS[variant], "from": source, "recipe": recipe,
            "verify": {**{k: figures[k] for k in ("cosine", "rel_error", "worst_output", "outputs")}, "inputs": described,
                       "thresholds": {"min_cosine": tolerance.min_cosine, "max_rel": tolerance.max_rel}},
            **({"search": {"keep_fp32": search["keep_fp32"], "trials": search["trials"]}} if search else {}),
        }
    return records


def _search_fp32(source: Path, target: Path, inputs, reference, tolerance, step) -> dict:
    """keep_fp32.search over the nodes of `source`, each trial an fp16 graph written to `target` and checked."""
    import onnx

    from . import keep_fp32, variants

    graph = onnx.load(str(source), load_external_data=False).graph
    nodes = [(node.name, variants.scope_of(node), node.op_type) for node in graph.node if node.name]

    def judge(kept: frozenset) -> tuple[bool, dict]:
        variants.write_fp16(source, target, keep_ops=(), keep_nodes=sorted(kept))
        passed, figures = check_variant(target, inputs, reference, tolerance)
        return passed, {k: figures[k] for k in ("cosine", "rel_error", "worst_output")}

    return keep_fp32.search(nodes, judge, step)


def add_variants(root: Path | str, key: str, options: VariantOptions, step=lambda message: None) -> dict[str, dict]:
    """Add the variants of `options.variants` to the existing artifact `key`, in one atomic publish: the
    artifact's files are linked into a staging folder, the variants written and verified there, and the
    whole swapped in. Killed at any instant, or failing a check, the previous artifact stays as it was."""
    art = artifact.load(root, key)
    with np.load(art.path("sample.npz")) as found:
        sample, outputs = found[INPUT_NAME], {name: found[name] for name in OUTPUT_NAMES}
    eager = None
    if options.calibration_images:  # the eager outputs of the images: the only part that needs torch
        from .export import eager_outputs, rebuild_model

        model = rebuild_model(art)
        eager = lambda batch: eager_outputs(model, batch)  # noqa: E731
    with artifact.staging(art.folder) as stage:
        for name in art.manifest["files"]:
            _link(art.path(name), stage / name)
        inputs, reference, described = verify_inputs(sample, outputs, eager, art.manifest["data_config"],
                                                      options.calibration_images, step)
        added = write_variants(stage, inputs, reference, described, options, step)
        manifest = {**art.manifest, "variants": {**art.manifest.get("variants", {}), **added}}
        manifest.pop("files")
        step("publishing")
        artifact.publish(art.folder, {p.name: p for p in sorted(stage.iterdir()) if p.is_file()}, manifest)
    return added


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # the staging folder is beside the artifact: the same filesystem
    except OSError:
        shutil.copyfile(source, target)


