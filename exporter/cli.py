"""Command line for the exporter: `python -m exporter [MODEL ...]`."""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vitparity import artifact, registry
from vitparity.artifact import MANIFEST, artifact_folder
from vitparity.cli import Parser, check_thresholds, console, guarded
from vitparity.errors import UserError
from vitparity.graphs import FP16, PRECISION_VARIANTS, precision_variants

from .variants import FP16_KEEP

DEFAULT_ARTIFACTS = "artifacts"
MIN_OPSET = 18  # torch.onnx's dynamo exporter writes opset 18; lower ones need a down-conversion it does not promise


def parse(argv=None) -> argparse.Namespace:
    parser = Parser(
        prog="python -m exporter",
        description="Export timm ViTs to verified ONNX artifacts at their native resolution.",
    )
    parser.add_argument("models", nargs="*", help=f"aliases ({', '.join(registry.ALIASES)}) or timm model names; default: every alias")
    parser.add_argument("--list", action="store_true", help="show the registered aliases and exit")
    parser.add_argument("--weights", default="auto", help="auto (HF cache, hub, then random init), random, or a weights file/folder (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init (default: 0)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    parser.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifacts root (default: artifacts)")
    parser.add_argument("--min-cosine", type=float, default=artifact.VERIFY_DEFAULTS["min_cosine"], help="verify: lowest cosine ONNX vs eager (default: 0.99999)")
    parser.add_argument("--max-abs", type=float, default=artifact.VERIFY_DEFAULTS["max_abs"], help="verify: largest abs diff ONNX vs eager, per unit of the output's peak |value| when that exceeds 1 (default: 1e-4)")
    parser.add_argument("--decompose-layernorm", action="store_true",
                        help="also write model.ln-decomposed.onnx, LayerNorms as primitive ops, verified; ort-cann runs it so every node can stay on the NPU")
    parser.add_argument("--variant", action="append", default=[], choices=list(PRECISION_VARIANTS), metavar="VARIANT",
                        help="also write a derived graph, verified against eager fp32 by its own class: int8 (dynamic), "
                             "int8-qdq (static QDQ, calibrated on --calibration-images), fp16, fused (onnxruntime's "
                             "optimizer and attention as MultiHeadAttention, fp32), int8-fused (int8 of the fused "
                             "graph; add fused too); repeatable. With "
                             "--if-missing, adds missing variants to an existing artifact")
    parser.add_argument("--calibration-images", metavar="DIR", help="a folder or glob of images: int8-qdq calibrates on "
                        "them, and every variant is verified on them too (default: the seeded sample only)")
    parser.add_argument("--fp16-keep", default=",".join(FP16_KEEP), metavar="OPS",
                        help=f"op types the fp16 variant keeps fp32, comma-separated, or none (default: {','.join(FP16_KEEP)})")
    parser.add_argument("--int8-keep", default="", metavar="MODULES",
                        help="timm modules the int8 graphs keep in float, comma-separated (blocks.0, blocks.3.mlp.fc2); the "
                             "search adds what else its class needs. With --if-missing, remakes an int8 variant that does "
                             "not keep them yet")
    parser.add_argument("--search-precision", action="store_true",
                        help="fp16: search the smallest list of nodes, by block scope then op type, that must stay fp32 "
                             "for the variant to pass its class; prints the trials and records them in the manifest")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="one graph for every height and width in multiples of the patch (timm's dynamic_img_size), "
                             "verified at the native size and at a smaller, a larger and a non-square one; a model that "
                             "cannot says why and is exported for its native size")
    parser.add_argument("--verify-size", default="", metavar="SIZES",
                        help="with --dynamic-size: also verify at these sizes, H or HxW, comma-separated (e.g. 224,448,518x392)")
    parser.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                        help="keyword arguments for timm.create_model, as in timm's own scripts (e.g. global_pool=token for "
                             "the CLS token as pooled output, depth=2); kept in the manifest, so every rebuild of the eager "
                             "model takes them too")
    parser.add_argument("--if-missing", action="store_true", help="export only models that have no artifact yet")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the exporter's own log")
    args = parser.parse_args(argv)
    if args.opset is not None:
        import onnx.defs

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= args.opset <= newest:
            raise UserError(
                f"--opset {args.opset} is out of range: the dynamo exporter traces at opset {MIN_OPSET}, "
                f"and the installed onnx knows opsets up to {newest}; pick one in {MIN_OPSET}..{newest}"
            )
    if args.seed < 0:
        raise UserError(f"--seed must be at least 0, got {args.seed}")
    if args.verify_size and not args.dynamic_size:
        raise UserError("--verify-size verifies a dynamic graph at more sizes; add --dynamic-size")
    from vitparity import sizes

    args.verify_size = tuple(sizes.parse_list(args.verify_size, "--verify-size")) if args.verify_size else ()
    check_thresholds(args.min_cosine, args.max_abs, "--max-abs", "an absolute difference")
    args.model_kwargs = registry.parse_model_kwargs(args.model_kwargs)
    args.variant = list(dict.fromkeys(args.variant))
    keep = [op.strip() for op in args.fp16_keep.split(",") if op.strip()]
    args.fp16_keep = () if keep == ["none"] else tuple(keep)
    # An op type ONNX does not know would be "kept fp32" in the manifest while keeping nothing.
    bad = [op for op in args.fp16_keep if not (op.isidentifier() and _onnx_op(op))] if args.fp16_keep != FP16_KEEP else []
    if bad:
        raise UserError(f"--fp16-keep takes ONNX op types such as LayerNormalization,Softmax (or none); {bad[0]!r} is not "
                        f"an ONNX operator")
    fp16 = FP16 in args.variant
    args.int8_keep = tuple(dict.fromkeys(m.strip() for m in args.int8_keep.split(",") if m.strip()))
    if args.int8_keep and not any(PRECISION_VARIANTS[v] == "int8" for v in args.variant):
        raise UserError("--int8-keep applies to the int8 variants; add --variant int8 (or int8-qdq, int8-fused)")
    if args.search_precision and not fp16:
        raise UserError("--search-precision searches the fp16 variant's fp32 list; add --variant fp16")
    if args.fp16_keep != FP16_KEEP and not fp16:
        raise UserError("--fp16-keep applies to the fp16 variant; add --variant fp16")
    if args.search_precision and args.fp16_keep != FP16_KEEP:
        raise UserError("--search-precision finds the fp32 list itself; drop --fp16-keep")
    if "int8-qdq" in args.variant and not args.calibration_images:
        raise UserError("--variant int8-qdq calibrates its activation ranges on images; add --calibration-images DIR "
                        "(or use --variant int8, which needs none)")
    if args.calibration_images and not args.variant:
        raise UserError("--calibration-images calibrates and verifies variants; add --variant int8-qdq (or int8, fp16)")
    if args.calibration_images:
        from vitparity.images import list_images

        list_images(args.calibration_images, "--calibration-images")  # a bad path fails now, not after the trace
    return args


def _onnx_op(name: str) -> bool:
    import onnx.defs

    return onnx.defs.has(name)


def aliases_table() -> Table:
    table = Table(title="Registered models")
    table.add_column("alias")
    table.add_column("timm name")
    for alias, name in registry.ALIASES.items():
        table.add_row(alias, name)
    return table


def summary_table(results) -> Table:
    table = Table(title="Exported artifacts")
    for column in ("model", "input", "params", "opset", "nodes", "ONNX MB", "export s", "verify cosine", "verify max abs", "weights"):
        table.add_column(column, justify="left" if column in ("model", "weights") else "right")
    for r in results:
        table.add_row(
            r.model + (f" ({registry.kwargs_label(r.model_kwargs)})" if r.model_kwargs else ""),
            f"{r.input_size[1]}x{r.input_size[2]}",
            f"{r.params / 1e6:.1f}M",
            str(r.opset),
            str(r.nodes),
            f"{r.onnx_mb:.1f}",
            f"{r.seconds:.1f}",
            f"{r.cosine:.7f}",
            f"{r.max_abs:.2e}",
            r.weights_source,
        )
    return table


def sizes_table(results) -> Table:
    """Each size a dynamic graph was verified at: its tokens, the graph against eager, and the position-embedding
    resample on its own (vitparity/resample.py)."""
    from vitparity import sizes

    table = Table(title="One graph for every size: verified at (dynamic height and width)")
    for column in ("model", "size", "patch grid", "cosine", "max abs", "resample max abs", "resample"):
        table.add_column(column, justify="left" if column in ("model", "size", "resample") else "right")
    for r in results:
        record = r.sizes
        if not record.get("dynamic"):
            continue
        for size in record["verified"]:
            label = sizes.label(size)
            check, grid = record["checks"].get(label, {}), [size[0] // record["patch"][0], size[1] // record["patch"][1]]
            resampled = check.get("resample")
            native = list(size) == list(record["native"])
            table.add_row(r.model, label + (" (native)" if native else ""), f"{grid[0]}x{grid[1]}",
                          f"{r.cosine if native else check['cosine']:.7f}", f"{r.max_abs if native else check['max_abs']:.2e}",
                          f"{resampled['max_abs']:.2e}" if resampled else "-",
                          "no table (rotary)" if not resampled else "Resize as eager" if resampled["passed"] else "WRONG")
    return table


def variants_table(results) -> Table:
    """Each reduced-precision variant written: its file, class, verify figures and what stayed fp32."""
    table = Table(title="Reduced-precision variants (verified against eager fp32)")
    numeric = ("MB", "worst row", "cosine", "rel err", "margin", "held-out cos")
    for column in ("model", "variant", "file", "MB", "class", "worst row", "cosine", "rel err", "margin", "held-out cos",
                   "recipe", "kept in float"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for r in results:
        for name, record in r.variants.items():
            recipe, verify = record["recipe"], record["verify"]
            keep = recipe.get("keep_fp32") or recipe.get("keep_float") or {}
            kept = (", ".join(keep.get("entries", [])) or "nothing") + f" ({len(keep['nodes'])} nodes)" if "entries" in keep \
                else ", ".join(keep.get("op_types", keep.get("nodes", []))) or ("-" if not keep else "nothing")
            table.add_row(r.model, record["variant"], name, f"{Path(r.folder, name).stat().st_size / 1e6:.1f}",
                          record["class"], verify.get("worst_output", "-"), f"{verify['cosine']:.6f}",
                          f"{verify['rel_error']:.2e}", f"{verify['margin']:.0%}" if "margin" in verify else "-",
                          f"{verify['held_out']['cosine']:.6f}" if "held_out" in verify else "-",
                          f"{recipe['call']}", kept)
    return table


def trials_table(model: str, record: dict) -> Table:
    """The trials of one search, in order: what was kept in float, and whether the reduced-precision graph passed."""
    table = Table(title=f"{model}: the search for what must stay in float in the {record['variant']} graph "
                        f"({len(record['search']['trials'])} trials)")
    for column in ("#", "kept in float", "nodes", "cosine", "rel err", "result"):
        table.add_column(column, justify="right" if column in ("#", "nodes", "cosine", "rel err") else "left")
    for i, trial in enumerate(record["search"]["trials"], 1):
        entries = trial["keep_fp32"]
        shown = ", ".join(entries[:6]) + (f" ... ({len(entries)})" if len(entries) > 6 else "") if entries else "nothing"
        table.add_row(str(i), shown, str(trial["nodes"]), f"{trial['cosine']:.6f}", f"{trial['rel_error']:.2e}",
                      Text("pass", style="green") if trial["passed"] else Text("fail", style="red"))
    return table


RANDOM_WARNING = (
    "WARNING: {model} uses random weights ({source}). The numbers validate the export, "
    "not the model's quality. Pass --weights PATH or fill the Hugging Face cache for real weights."
)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    from vitparity import sizes

    names = args.models or list(registry.ALIASES)
    specs = [registry.resolve(name) for name in names]  # fail on a bad name before minutes of work
    added = []
    if args.if_missing:
        # Decided from the manifest and the files' hashes alone: no torch import when nothing is to export.
        present = []
        for spec in specs:
            if not (artifact_folder(args.artifacts, spec.key) / MANIFEST).is_file():
                continue
            try:
                found = artifact.load(args.artifacts, spec.key)  # every hash checked: a damaged artifact is not "present"
            except UserError as why:
                found = _repaired(args.artifacts, spec.key, why, err)
                if found is None:
                    continue
            if args.dynamic_size and not sizes.record(found.manifest)["dynamic"]:
                raise UserError(f"{spec.key}: the artifact under {args.artifacts}/ takes {sizes.label(sizes.native(found.manifest))} "
                                f"only; --if-missing never replaces it: export it again with python -m exporter {spec.key} "
                                f"--dynamic-size (and the --weights it was made from)")
            made_with = artifact.model_kwargs(found.manifest)
            if args.model_kwargs and made_with != args.model_kwargs:  # none given: any artifact there is taken
                raise UserError(f"{spec.key}: the artifact under {args.artifacts}/ was made with model kwargs "
                                f"{registry.kwargs_label(made_with) or '(none)'}, not {registry.kwargs_label(args.model_kwargs) or '(none)'}; "
                                f"--if-missing never replaces it: export it again without --if-missing (and the --weights "
                                f"it was made from)")
            present.append(spec.key)
            for warning in artifact.verify_warnings(found.manifest):
                err.print(Text(f"warning: {warning}", style="yellow"))
            missing = [v for v in args.variant if v not in precision_variants(found.manifest)
                       or not _as_asked(precision_variants(found.manifest)[v], args)]
            if not missing:
                err.print(f"{spec.key}: an artifact exists under {args.artifacts}/, not exporting it again")
                continue
            added.append(_add_variants(args, spec.key, missing, err))
        names = [s.timm_name for s in specs if s.key not in present]
        if not names:
            _print_results(args, added, out)
            return 0
    from . import export as exporting
    from .weights import is_random

    options = _options(args, exporting.ExportOptions)
    results = []
    with err.status("starting") as status:
        for name in names:
            try:
                result = exporting.export(name, Path(args.artifacts), options, step=status.update)
            except UserError as error:
                if args.verbose and error.__cause__ is not None:  # -v: the whole chain, not just its root
                    err.print(Text("".join(traceback.format_exception(error.__cause__)), style="dim"))
                raise
            err.log(f"{result.model}: exported and verified in {result.seconds:.1f} s -> {result.folder}")
            if is_random(result.weights_source):
                err.print(Text(RANDOM_WARNING.format(model=result.model, source=result.weights_source), style="bold yellow"))
            results.append(result)
    _print_results(args, added + results, out)
    return 0


def _as_asked(record: dict, args) -> bool:
    """Whether a variant already in the artifact is the graph these options ask for: an int8 graph that keeps every
    --int8-keep module in float (a block kept whole counts for its modules); an fp16 graph with the --fp16-keep op
    types given, or searched when --search-precision is. A variant that is not is made again, so that advice that
    names one of these options always changes the graph."""
    recipe = record.get("recipe", {})
    if record.get("class") == "int8" and args.int8_keep:
        kept = recipe.get("keep_float", {}).get("entries", [])
        return all(any(module == entry or module.startswith(entry + ".") for entry in kept) for module in args.int8_keep)
    if record.get("variant") == FP16 and args.search_precision:
        return "search" in record
    if record.get("variant") == FP16 and args.fp16_keep != FP16_KEEP:
        return "search" not in record and set(recipe.get("keep_fp32", {}).get("op_types", [])) == set(args.fp16_keep)
    return True


def _repaired(root: str, key: str, why: UserError, err: Console):
    """An artifact that failed its checks under --if-missing: what to do without ever trading the user's weights.

    Damaged variants and derived graphs are dropped (a requested variant is then rebuilt from the artifact's
    own model.onnx), and the artifact is returned. Damaged core files of an artifact made with random weights
    are exported again with the same seed (None); those of an artifact with the user's own weights, or an
    artifact whose manifest cannot tell, are an error that names them: its weights are never replaced.
    """
    from .weights import is_random

    folder = artifact_folder(root, key)
    try:
        manifest = artifact.read_manifest(folder)
        problem = artifact.manifest_problem(manifest)
    except UserError as unreadable:
        manifest, problem = {}, str(unreadable)
    if problem:
        raise UserError(f"{key}: the artifact in {folder} is unusable ({why}), and its manifest cannot say whose weights it "
                        f"holds, so it is not exported again over them: move the folder aside, then export again (with "
                        f"--weights FILE for your own weights)")
    found = artifact.Artifact(folder=folder, manifest=manifest)
    bad = artifact.damaged(found)
    core = [name for name in bad if name not in manifest.get("variants", {}) and name != "model.ln-decomposed.onnx"]
    if core:
        source = str(manifest.get("weights_source", "unknown"))
        if is_random(source):
            err.print(f"{key}: exporting again with the same seed, the artifact there is unusable: {why}")
            return None
        raise UserError(f"{key}: {', '.join(core)} in {folder} failed the artifact's checks ({why}); it holds weights from "
                        f"{source}, which are never replaced by others: restore the file, or move the folder aside and export "
                        f"again with --weights FILE")
    if not bad:
        raise why  # not a file of the artifact: the loader's own finding stands
    err.print(Text(f"warning: {key}: dropped {', '.join(bad)}, which failed the artifact's checks ({why}); "
                   f"add a variant again with --if-missing --variant NAME", style="yellow"))
    return artifact.Artifact(folder=folder, manifest=artifact.drop(folder, bad))


def _options(args, kind, **changes):
    """The ExportOptions (or another options class with its fields) of the command line."""
    from dataclasses import fields

    given = {"weights": args.weights, "seed": args.seed, "min_cosine": args.min_cosine,
             "max_abs": args.max_abs, "verbose": args.verbose, "decompose_layernorm": args.decompose_layernorm,
             "variants": tuple(args.variant), "fp16_keep": args.fp16_keep, "search_precision": args.search_precision,
             "calibration_images": args.calibration_images, "int8_keep": args.int8_keep,
             "dynamic_size": args.dynamic_size, "verify_sizes": args.verify_size,
             "model_kwargs": tuple(args.model_kwargs.items()), **({"opset": args.opset} if args.opset else {}), **changes}
    return kind(**{f.name: given[f.name] for f in fields(kind) if f.name in given})


def _add_variants(args, key: str, missing: list[str], err: Console):
    """Add `missing` variants to the artifact `key` that is there; the result row of the summary."""
    from . import precision

    def still_missing(manifest: dict) -> list[str]:  # read again under the artifact's lock
        return [v for v in missing if v not in precision_variants(manifest) or not _as_asked(precision_variants(manifest)[v], args)]

    with err.status(f"{key}: adding {', '.join(missing)}") as status:
        records = precision.add_variants(args.artifacts, key, _options(args, precision.VariantOptions, variants=tuple(missing)),
                                         step=lambda message: status.update(f"{key}: {message}"), still_missing=still_missing)
    made = [record["variant"] for record in records.values()]
    if made:
        err.log(f"{key}: added and verified {', '.join(made)} -> {artifact_folder(args.artifacts, key)}")
    else:
        err.print(f"{key}: another run added {', '.join(missing)} meanwhile; nothing to add")
    return precision.Added(model=key, folder=str(artifact_folder(args.artifacts, key)), variants=records)


def _print_results(args, results, out: Console) -> None:
    if args.json:
        out.print_json(json.dumps([asdict(r) for r in results], indent=2))
        return
    exported = [r for r in results if hasattr(r, "nodes")]
    if exported:
        out.print(summary_table(exported))
    if any(getattr(r, "sizes", {}).get("dynamic") for r in exported):
        out.print(sizes_table(exported))
    for r in exported:
        if getattr(r, "sizes", {}).get("why"):
            out.print(Text(f"{r.model}: exported for {r.input_size[1]}x{r.input_size[2]} only: {r.sizes['why']}", style="yellow"))
    if any(r.variants for r in results):
        out.print(variants_table(results))
        for r in results:
            for record in r.variants.values():
                if "search" in record:
                    out.print(trials_table(r.model, record))
                    out.print(Text(f"{r.model}: must stay in float in the {record['variant']} graph: "
                                   f"{', '.join(record['search']['keep_fp32']) or 'nothing'}", style="bold"))


def main(argv=None) -> int:
    out, err = console(), console(stderr=True)

    def body() -> int:
        args = parse(argv)
        if args.list:
            out.print(aliases_table())
            return 0
        return run(args, out, err)

    return guarded(body, err, "interrupted: no artifact was changed by the unfinished export")


if __name__ == "__main__":
    sys.exit(main())
