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


def sample_batch(input_size, seed: int = SAMPLE_SEED, batch: int = TRACE_BATCH) -> np.ndarray:
    """A seeded standard-normal NCHW float32 batch, the scale of a normalised image."""
    return np.random.default_rng(seed).standard_normal((batch, *input_size), dtype=np.float32)


def build_model(spec: registry.ModelSpec, weights_arg: str, seed: int):
    """The eval-mode timm model with its weights, and where the weights came from."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = registry.create(spec)
    source = weights.load_weights(model, weights_arg, seed)
    return model, source


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


def trace_to_onnx(model, input_size, path: Path, opset: int, verbose: bool) -> str:
    """Write `model` as ONNX with one dynamic-batch input and the outputs pooled and tokens.

    Returns the attention path that was traced: "fused", or, where the exporter cannot trace the
    fused attention (relative-position biases, SAM's 3-D attention), "non-fused" with the reason.
    The model itself is left on its fused path: the caller checks the graph against that.
    """
    try:
        _trace(model, input_size, path, opset, verbose)
        return "fused"
    except TraceFailed as fused_error:
        fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
        if not fused:
            raise
        for module in fused:  # timm's own switch to its explicit softmax(q @ k^T) @ v path
            module.fused_attn = False
        try:
            _trace(model, input_size, path, opset, verbose)
        except TraceFailed:
            raise fused_error from None
        finally:
            for module in fused:
                module.fused_attn = True
        return f"non-fused (the fused path could not be traced: {fused_error.cause})"


def _trace(model, input_size, path: Path, opset: int, verbose: bool) -> None:
    parameters = inspect.signature(torch.onnx.export).parameters
    if "dynamo" not in parameters:  # the dynamo exporter arrived in torch 2.5
        raise UserError(f"torch {torch.__version__} has no dynamo ONNX exporter; install torch >= 2.5")
    example = torch.from_numpy(sample_batch(input_size))
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet(verbose):
            program = torch.onnx.export(
                TwoOutputs(model),
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},),
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
                layout: dict | None = None) -> tuple[float, float]:
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
    for batch_size in (sample.shape[0], *VERIFY_BATCHES):
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
    model, source = build_model(spec, options.weights, options.seed)
    config = registry.data_config(model)
    input_size = list(config["input_size"])
    sample = sample_batch(input_size)
    folder = artifact.artifact_folder(root, spec.key)
    try:
        manifest, onnx_bytes = _stage_and_publish(spec, model, source, config, sample, folder, options, step, started)
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
    )


def _disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or anything in its chain, is a full disk (safetensors reports it in its message)."""
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _stage_and_publish(spec, model, source, config, sample, folder, options, step, started) -> tuple[dict, int]:
    """Trace, verify and write everything into a staging folder, then publish it; return (manifest, model.onnx bytes)."""
    import onnx
    from safetensors.torch import save_file

    input_size = list(config["input_size"])
    with artifact.staging(folder) as stage:
        outputs = eager_outputs(model, sample)  # the model as users run it: fused attention where it has one
        step(f"{spec.key}: tracing at {input_size[1]}x{input_size[2]} with the dynamo exporter")
        attention = trace_to_onnx(model, input_size, stage / "model.onnx", options.opset, options.verbose)
        step(f"{spec.key}: verifying with onnx.checker and onnxruntime")
        layout = registry.token_layout(model, outputs["tokens"].shape)
        worst_cos, worst_abs = verify_onnx(stage / "model.onnx", sample, outputs, options, layout)
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
            "variants": variants,
            "export_seconds": round(seconds, 1),
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        onnx_bytes = (stage / "model.onnx").stat().st_size
        # Everything staged, including model.onnx.data if the exporter split off weights over 2 GB.
        artifact.publish_stage(folder, stage, manifest)
    return manifest, onnx_bytes
