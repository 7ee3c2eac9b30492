"""Trace a timm ViT to ONNX with the dynamo exporter, verify it, and publish the artifact."""
from __future__ import annotations

import contextlib
import errno
import inspect
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vitparity import artifact, environment, processes, registry, runtime
from vitparity.artifact import INPUT_NAME, OUTPUT_NAMES
from vitparity.eager import TwoOutputs, eager_outputs
from vitparity.errors import CheckFailed, UserError
from vitparity.graphs import LN_DECOMPOSED
from vitparity.tolerances import verify_tolerance

from . import weights
from .precision import VariantOptions
from .variants import write_ln_decomposed

DEFAULT_OPSET = 18
TRACE_BATCH = 2  # batch 1 would let the exporter specialise the batch axis to a constant
VERIFY_BATCHES = (1, 3)
SAMPLE_SEED = 0


@dataclass(frozen=True)
class ExportOptions(VariantOptions):
    """How to export: weights ("auto", "random" or a path), seed, opset, the verify thresholds, and the
    reduced-precision variants to write too (VariantOptions: exporter/precision.py)."""

    weights: str = "auto"
    seed: int = 0
    opset: int = DEFAULT_OPSET
    min_cosine: float = artifact.VERIFY_DEFAULTS["min_cosine"]
    max_abs: float = artifact.VERIFY_DEFAULTS["max_abs"]
    verbose: bool = False
    decompose_layernorm: bool = False  # also write model.ln-decomposed.onnx (for the CANN provider)
    dynamic_size: bool = False  # one graph for every height and width in multiples of the patch (vitparity/sizes.py)
    model_kwargs: tuple = ()  # --model-kwargs: (key, value) pairs for timm.create_model, kept in the manifest
    verify_sizes: tuple = ()  # with dynamic_size: sizes (h, w) verified besides the native, smaller, larger and non-square


@dataclass(frozen=True)
class ExportResult:
    """What one export produced, for the summary table and --json."""

    model: str
    timm_name: str
    folder: str
    input_size: list
    params: int
    opset: int
    nodes: int
    onnx_mb: float
    seconds: float
    cosine: float
    max_abs: float
    weights_source: str
    variants: dict = field(default_factory=dict)  # reduced-precision variants written: {file: manifest record}
    sizes: dict = field(default_factory=dict)  # the manifest's size record (vitparity/sizes.py)
    model_kwargs: dict = field(default_factory=dict)  # --model-kwargs it was built with


def sample_batch(input_size, seed: int = SAMPLE_SEED, batch: int = TRACE_BATCH) -> np.ndarray:
    """A seeded standard-normal NCHW float32 batch, the scale of a normalised image."""
    return np.random.default_rng(seed).standard_normal((batch, *input_size), dtype=np.float32)


def build_model(spec: registry.ModelSpec, weights_arg: str, seed: int, dynamic: bool = False, model_kwargs: dict | None = None):
    """The eval-mode timm model with its weights, and where the weights came from. `dynamic`: built with timm's
    dynamic_img_size (any height and width) where its class has that option (not_dynamic says why when not).
    `model_kwargs`: the user's --model-kwargs for timm.create_model."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model = registry.create(spec, model_kwargs, **({"dynamic_img_size": True} if dynamic else {}))
        except TypeError as error:  # the architecture's constructor has no dynamic_img_size
            if not dynamic or "dynamic_img_size" not in str(error):
                raise
            torch.manual_seed(seed)
            model = registry.create(spec, model_kwargs)
    source = weights.load_weights(model, weights_arg, seed)
    return model, source


def not_dynamic(spec: registry.ModelSpec, model) -> str:
    """Why a model built with dynamic=True takes its native size only, or "" when it takes any."""
    return "" if getattr(model, "dynamic_img_size", False) else \
        f"timm's {spec.timm_name.partition('.')[0]} has no dynamic_img_size option"


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Silence the exporter's own prints, warnings and logs unless -v was given."""
    if verbose:
        yield
        return
    sink = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


class TraceFailed(CheckFailed):
    """torch.onnx.export could not trace the model; `cause` is the innermost exception, in one line."""

    def __init__(self, cause: str):
        super().__init__(f"ONNX export failed: {cause}; run again with -v for the whole chain")
        self.cause = cause


def trace_to_onnx(model, input_size, path: Path, opset: int, verbose: bool, patch=None) -> str:
    """Write `model` as ONNX with one dynamic-batch input and the outputs pooled and tokens; with `patch` (h, w), the
    height and width are dynamic too, in multiples of the patch.

    Returns the attention path that was traced: "fused", or, where the exporter cannot trace the
    fused attention (relative-position biases, SAM's 3-D attention), "non-fused" with the reason.
    The model itself is left on its fused path: the caller checks the graph against that.
    """
    try:
        _trace(model, input_size, path, opset, verbose, patch)
        return "fused"
    except TraceFailed as fused_error:
        fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
        if not fused:
            raise
        for module in fused:  # timm's own switch to its explicit softmax(q @ k^T) @ v path
            module.fused_attn = False
        try:
            _trace(model, input_size, path, opset, verbose, patch)
        except TraceFailed:
            raise fused_error from None
        finally:
            for module in fused:
                module.fused_attn = True
        return f"non-fused (the fused path could not be traced: {fused_error.cause})"


def _trace(model, input_size, path: Path, opset: int, verbose: bool, patch=None) -> None:
    parameters = inspect.signature(torch.onnx.export).parameters
    if "dynamo" not in parameters:  # the dynamo exporter arrived in torch 2.5
        raise UserError(f"torch {torch.__version__} has no dynamo ONNX exporter; install torch >= 2.5")
    example = torch.from_numpy(sample_batch(input_size))
    batch = torch.export.Dim("batch", min=1, max=4096)
    axes = {0: batch}
    if patch:  # height and width as whole numbers of patches: the graph takes no size its patch grid cannot cover
        axes[2] = patch[0] * torch.export.Dim("patch_rows", min=1, max=1024)
        axes[3] = patch[1] * torch.export.Dim("patch_columns", min=1, max=1024)
    try:
        with _quiet(verbose):
            program = torch.onnx.export(
                TwoOutputs(model),
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=(axes,),
                opset_version=opset,
                verbose=verbose,
            )
            program.save(str(path))
    except Exception as error:  # noqa: BLE001 - the exporter raises many types; the user needs the real cause
        root = innermost(error)
        raise TraceFailed(f"{type(root).__name__}: {_first_line(root)}") from error


def innermost(error: BaseException) -> BaseException:
    """The exception at the bottom of `error`'s chain: what really went wrong, under the wrappers."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    return error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def verify_onnx(path: Path, sample: np.ndarray, reference: dict[str, np.ndarray], options: ExportOptions,
                layout: dict | None = None, batches=VERIFY_BATCHES) -> tuple[float, float]:
    """Check the graph and its parity with the eager outputs `reference` of `sample`; return the worst (cosine, max abs diff).

    Every row compare judges is checked (vitparity/judging.py: each output and each token group of `layout`, on the
    whole and on the worst item) by the verify thresholds' cosine, and each whole output by their max abs diff.
    Raises CheckFailed on any failed check.
    """
    import onnx

    from vitparity import judging
    from vitparity.metrics import max_abs_diff

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # noqa: BLE001 - checker errors come as several types
        raise CheckFailed(f"onnx.checker rejected the graph: {_first_line(error)}") from error
    session = runtime.session(path)
    names = [o.name for o in session.get_outputs()]
    if [i.name for i in session.get_inputs()] != [INPUT_NAME] or names != list(OUTPUT_NAMES):
        raise CheckFailed(f"graph has inputs/outputs {names}, expected {INPUT_NAME} -> {list(OUTPUT_NAMES)}")
    worst_cos, worst_abs = 1.0, 0.0
    for batch_size in (sample.shape[0], *batches):
        rows = np.resize(np.arange(sample.shape[0]), batch_size)  # cycle the sample rows
        try:
            got = dict(zip(names, session.run(None, {INPUT_NAME: sample[rows]})))
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CheckFailed(f"onnxruntime cannot run the graph at batch {batch_size}: {_first_line(error)}") from error
        tolerance = verify_tolerance(options.min_cosine, options.max_abs)
        want_all = {name: reference[name][rows] for name in OUTPUT_NAMES}
        for name in OUTPUT_NAMES:
            if got[name].shape != want_all[name].shape:
                raise CheckFailed(f"output {name} at batch {batch_size} has shape {got[name].shape}, eager gives "
                                  f"{want_all[name].shape}")
        for row in judging.judge_rows(judging.item_figures(got, want_all, layout), tolerance):
            worst_cos = min(worst_cos, row.cosine)
            if not row.passed:
                raise CheckFailed(f"ONNX output {row.label} at batch {batch_size} differs from eager: {row.reason}")
        for name in OUTPUT_NAMES:
            want = want_all[name]
            diff = max_abs_diff(got[name], want)
            worst_abs = max(worst_abs, diff)
            # fp32 rounding grows with the values: the bound is per unit of the output's peak |value|
            # (absolute for outputs within +-1), so a wide model's large activations are judged alike.
            peak = max(1.0, float(np.abs(want).max()) if want.size else 1.0)
            judged = tolerance.judge(1.0, max_abs=diff, peak=peak)  # the cosines were judged above, row by row
            if not judged.passed:
                raise CheckFailed(f"ONNX output {name} at batch {batch_size} differs from eager: {judged.reason}")
    return worst_cos, worst_abs


def _verify_sizes(model, path: Path, input_size, patch, layout, options: ExportOptions, record: dict, scratch: Path,
                  step) -> None:
    """Verify a dynamic graph at its other sizes (vitparity/sizes.py: smaller, larger, non-square, and
    --verify-size), like at its native size and with the same thresholds, on a seeded sample of that size; and its
    position-embedding resample at every size on its own (vitparity/resample.py), so that a Resize built with other
    attributes than eager's is named. Fills `record`; raises CheckFailed at the first size that fails."""
    from vitparity import resample, sizes

    for size in sizes.checked_sizes(input_size[1:], patch, options.verify_sizes):
        label = sizes.label(size)
        resampled = resample.check(model, path, size, scratch)
        check = {"resample": resampled} if resampled else {}
        if size != tuple(input_size[1:]):
            step(f"verifying at {label}")
            sample = sample_batch([input_size[0], *size])
            try:
                cos, diff = verify_onnx(path, sample, eager_outputs(model, sample), options,
                                        sizes.layout_at(layout, size, patch), batches=())
            except CheckFailed as failed:
                why = f"; {resampled['reason']}" if resampled and not resampled["passed"] else ""
                raise CheckFailed(f"at {label}: {failed}{why}") from failed
            check.update(cosine=cos, max_abs=diff)
            record["verified"].append(list(size))
        if resampled and not resampled["passed"]:
            raise CheckFailed(resampled["reason"])
        record["checks"][label] = check


def _ln_variant(stage: Path, sample: np.ndarray, outputs: dict, options: ExportOptions, layout: dict | None = None) -> dict:
    """Write model.onnx's LayerNorm-decomposed variant into `stage` and verify it like model.onnx itself."""
    import onnx

    path = stage / LN_DECOMPOSED
    count = write_ln_decomposed(stage / "model.onnx", path)
    left = sum(n.op_type == "LayerNormalization" for n in onnx.load(str(path), load_external_data=False).graph.node)
    if left:
        raise CheckFailed(f"{left} LayerNormalization nodes could not be decomposed (not over the last axis)")
    cos, diff = verify_onnx(path, sample, outputs, options, layout)
    return {"from": "model.onnx", "layernorms_decomposed": count, "verify": {"cosine": cos, "max_abs": diff}}


def export(
    name: str,
    root: Path | str = "artifacts",
    options: ExportOptions = ExportOptions(),
    step: Callable[[str], None] = lambda message: None,
) -> ExportResult:
    """Export, verify and publish one model under `root`/<alias or name>/. `step` hears progress."""
    started = time.perf_counter()
    spec = registry.resolve(name)
    step(f"{spec.key}: building {spec.timm_name}")
    model, source = build_model(spec, options.weights, options.seed, options.dynamic_size, dict(options.model_kwargs))
    fixed = not_dynamic(spec, model) if options.dynamic_size else ""
    if fixed:
        step(f"{spec.key}: exported for its native size only: {fixed}")
    config = registry.data_config(model)
    input_size = list(config["input_size"])
    sample = sample_batch(input_size)
    folder = artifact.artifact_folder(root, spec.key)
    try:
        manifest, onnx_bytes = _stage_and_publish(spec, model, source, config, sample, folder, options, step, started,
                                                  fixed)
    except Exception as error:
        if _disk_full(error):
            raise UserError(
                f"no space left on the device while writing the {spec.key} artifact under {root}; "
                f"free some space and export again (the previous artifact, if any, is untouched)"
            ) from error
        raise
    return ExportResult(
        model=spec.key,
        timm_name=spec.timm_name,
        folder=str(folder),
        input_size=input_size,
        params=manifest["params"],
        opset=options.opset,
        nodes=manifest["nodes"],
        onnx_mb=round(onnx_bytes / 1e6, 1),
        seconds=manifest["export_seconds"],
        cosine=manifest["verify"]["cosine"],
        max_abs=manifest["verify"]["max_abs"],
        weights_source=source,
        variants={name: record for name, record in manifest["variants"].items() if "variant" in record},
        sizes=manifest["sizes"],
        model_kwargs=manifest["model_kwargs"],
    )


def _disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or anything in its chain, is a full disk (safetensors reports it in its message)."""
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _stage_and_publish(spec, model, source, config, sample, folder, options, step, started, fixed="") -> tuple[dict, int]:
    """Trace, verify and write everything into a staging folder, then publish it; return (manifest, model.onnx bytes)."""
    import onnx
    from safetensors.torch import save_file

    input_size = list(config["input_size"])
    with artifact.staging(folder) as stage:
        outputs = eager_outputs(model, sample)  # the model as users run it: fused attention where it has one
        found = getattr(getattr(model, "patch_embed", None), "patch_size", None)  # (h, w), or one int (XCiT)
        patch = (int(found), int(found)) if isinstance(found, int) else tuple(int(p) for p in found) if found else None
        dynamic = patch if options.dynamic_size and not fixed and patch else None
        step(f"{spec.key}: tracing at {input_size[1]}x{input_size[2]} with the dynamo exporter"
             + (", height and width dynamic" if dynamic else ""))
        try:
            attention = trace_to_onnx(model, input_size, stage / "model.onnx", options.opset, options.verbose, dynamic)
        except TraceFailed as failed:
            if not dynamic:
                raise
            fixed, dynamic = f"the dynamic-size trace failed: {failed.cause}", None
            step(f"{spec.key}: exported for its native size only: {fixed}")
            attention = trace_to_onnx(model, input_size, stage / "model.onnx", options.opset, options.verbose)
        step(f"{spec.key}: verifying with onnx.checker and onnxruntime")
        layout = registry.token_layout(model, outputs["tokens"].shape)
        worst_cos, worst_abs = verify_onnx(stage / "model.onnx", sample, outputs, options, layout)
        size_record = {"dynamic": bool(dynamic), "native": input_size[1:], "patch": list(patch) if patch else None,
                       "verified": [input_size[1:]], "checks": {}}
        if options.dynamic_size and not dynamic:
            size_record["why"] = fixed or "the model has no patch embedding"
        if dynamic:
            with processes.temp_folder(processes.IMAGES_PREFIX) as scratch:
                _verify_sizes(model, stage / "model.onnx", input_size, dynamic, layout, options, size_record, scratch,
                              lambda message: step(f"{spec.key}: {message}"))
        variants = {}
        if options.decompose_layernorm:
            step(f"{spec.key}: writing and verifying the LayerNorm-decomposed variant")
            variants[LN_DECOMPOSED] = _ln_variant(stage, sample, outputs, options, layout)
        if options.variants:
            from . import precision

            said = lambda message: step(f"{spec.key}: {message}")  # noqa: E731
            with processes.temp_folder(processes.IMAGES_PREFIX) as scratch:
                inputs, described = precision.verify_inputs(sample, outputs, lambda batch: eager_outputs(model, batch),
                                                            config, options.calibration_images, said, scratch,
                                                            layout=layout,
                                                            minimum=options.minimum())
                variants.update(precision.write_variants(stage, inputs, described, options, said))
                if dynamic:  # a variant of a dynamic graph is dynamic too: verified at the same sizes, by its class
                    precision.verify_at_sizes(stage, variants, model, config, size_record, layout, said, sample_batch)
        step(f"{spec.key}: writing the artifact")
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(stage / "weights.safetensors"))
        np.savez(stage / "sample.npz", **{INPUT_NAME: sample}, **outputs)
        graph = onnx.load(str(stage / "model.onnx"), load_external_data=False)
        seconds = time.perf_counter() - started
        manifest = {
            "model": spec.key,
            "timm_name": spec.timm_name,
            "alias": spec.alias,
            "model_kwargs": dict(options.model_kwargs),  # --model-kwargs: every rebuild of the eager model takes them too
            "pretrained_tag": model.pretrained_cfg.get("tag") or spec.pretrained_tag,
            "input": {"name": INPUT_NAME, "shape": ["batch", *input_size], "dtype": "float32", "layout": "NCHW"},
            "outputs": {n: ["batch", *outputs[n].shape[1:]] for n in OUTPUT_NAMES},
            "token_layout": registry.token_layout(model, outputs["tokens"].shape),
            "data_config": config,
            "opset": options.opset,
            "exporter": "torch.onnx.export(dynamo=True)",
            "attention": attention,
            "versions": environment.versions(),
            "weights_source": source,
            "params": int(sum(p.numel() for p in model.parameters())),
            "nodes": len(graph.graph.node),
            "verify": {"cosine": worst_cos, "max_abs": worst_abs, "batches": [TRACE_BATCH, *VERIFY_BATCHES],
                       "thresholds": {"min_cosine": options.min_cosine, "max_abs": options.max_abs}},
            "sizes": size_record,
            "variants": variants,
            "export_seconds": round(seconds, 1),
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        onnx_bytes = (stage / "model.onnx").stat().st_size
        # Everything staged, including model.onnx.data if the exporter split off weights over 2 GB.
        artifact.publish_stage(folder, stage, manifest)
    return manifest, onnx_bytes
