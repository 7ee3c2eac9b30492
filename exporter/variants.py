"""Verified variants of model.onnx: graphs derived from it, each a recipe recorded in the manifest.

Reduced precision (`--variant int8|int8-qdq|fp16`) is made by the field's libraries
(onnxruntime.quantization, onnxruntime.transformers.float16); this module only chooses their options
and says which nodes stay fp32 (exporter/keep_fp32.py searches for the smallest such list).

The LayerNorm-decomposed graph is for providers that lack a kernel the exported graph uses.

The CANN execution provider has no LayerNormalization kernel: each of a ViT's LayerNorms would run
on the CPU between NPU subgraphs. `decompose_layernorm` rewrites every LayerNormalization into
primitive ops (ReduceMean, Sub, Mul, Add, Sqrt, Div) that the provider does have, so the whole
graph can stay on the NPU. The exporter verifies the variant with the same parity checks as
model.onnx and hashes it in the manifest; ort-cann picks it when it is there.
"""
from __future__ import annotations

import ast
import contextlib
import math
from pathlib import Path

import numpy as np

from vitparity.graphs import (  # noqa: F401  # noqa: F401
    FP16,
    FUSED,
    INT8,
    INT8_FUSED,
    INT8_QDQ,
    LN_DECOMPOSED,
    MADE_FROM,
    PRECISION_VARIANTS,
    precision_variants,
    variant_file,
)


def _attribute(node, name: str, default):
    from onnx import helper

    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else default


def decompose_layernorm(model) -> int:
    """Replace, in place, every LayerNormalization over the last axis by primitive ops; return how many.

    y = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + epsilon) * scale + bias, over axis -1, in the
    input's dtype. Each new node keeps the original node's metadata (module scopes included).
    """
    from onnx import helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    graph = model.graph
    rewritten, nodes = 0, []
    for node in graph.node:
        used_outputs = [name for name in node.output[1:] if name]
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or used_outputs \
                or _attribute(node, "axis", -1) != -1:
            nodes.append(node)
            continue
        p = f"{node.name or 'layer_norm'}_{rewritten}"
        x, scale, bias = (list(node.input) + ["", ""])[:3]
        epsilon = _attribute(node, "epsilon", 1e-5)
        graph.initializer.append(numpy_helper.from_array(np.array(epsilon, dtype=np.float32), f"{p}_epsilon"))
        if opset >= 18:  # ReduceMean took axes as an attribute before opset 18, as an input since
            graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{p}_axes"))
            mean = lambda src, dst: helper.make_node("ReduceMean", [src, f"{p}_axes"], [dst], keepdims=1)  # noqa: E731
        else:
            mean = lambda src, dst: helper.make_node("ReduceMean", [src], [dst], axes=[-1], keepdims=1)  # noqa: E731
        y = node.output[0]
        steps = [
            mean(x, f"{p}_mean"),
            helper.make_node("Sub", [x, f"{p}_mean"], [f"{p}_centered"]),
            helper.make_node("Mul", [f"{p}_centered", f"{p}_centered"], [f"{p}_squared"]),
            mean(f"{p}_squared", f"{p}_variance"),
            helper.make_node("Add", [f"{p}_variance", f"{p}_epsilon"], [f"{p}_variance_eps"]),
            helper.make_node("Sqrt", [f"{p}_variance_eps"], [f"{p}_std"]),
            helper.make_node("Div", [f"{p}_centered", f"{p}_std"], [f"{p}_normed"]),
            helper.make_node("Mul", [f"{p}_normed", scale], [f"{p}_scaled" if bias else y]),
        ]
        if bias:
            steps.append(helper.make_node("Add", [f"{p}_scaled", bias], [y]))
        for i, step in enumerate(steps):
            step.name = f"{p}_{i}_{step.op_type}"
            step.metadata_props.extend(node.metadata_props)
        nodes += steps
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def write_ln_decomposed(source, target) -> int:
    """Write model `source` with its LayerNormalizations decomposed to `target` (in the same folder, where
    the external data of a model over 2 GB is shared, not copied); return how many were rewritten."""
    import onnx

    from vitparity.blocks import load_graph

    model = load_graph(source)
    count = decompose_layernorm(model)
    onnx.save(model, str(target))
    return count


# The ViT rules of what stays fp32: LayerNormalization (its mean of squares overflows fp16 once
# activations pass 256, onnxruntime#13639, onnxconverter-common#323), and the same ops of a norm
# the exporter wrote out as primitives (RMSNorm and the like: Pow, ReduceMean, Sqrt).
FP16_KEEP = ("LayerNormalization", "Pow", "ReduceMean", "Sqrt")
INT8_OPS = ("MatMul",)  # the ViT's weight matmuls; Conv (the patch embedding) is 1 node of ~100


def _library(module: str) -> dict:
    from vitparity import environment

    return {"library": module, "version": environment.version("onnxruntime")}




def write_int8(source: Path, target: Path, calibration=None, count: int = 0, exclude=(), reduce_range: bool = False,
               cache: Path | None = None) -> dict:
    """onnxruntime.quantization of `source` into `target`; return the recipe.

    Without `calibration`: quantize_dynamic (weights int8 per channel, activations quantized at run
    time). With it (a function that returns an iterator over NCHW float32 batches, `count` rows in all,
    streamed): quantize_static in QDQ format, MinMax-calibrated on them. Batches, not rows: MinMax keeps
    one min and one max per tensor and call, so memory stays flat. onnxruntime's own way to bound it
    (extra_options CalibMaxIntermediateOutputs) drops the collected ranges instead of merging them
    (onnxruntime 1.32 calibrate.py, MinMaxCalibrater.collect_data calls clear_collected_data without
    compute_data): a multiple of that many inputs ended in "No data is collected", any other count
    calibrated on the last few inputs only. The nodes `exclude` stay
    in float (nodes_to_exclude: what the int8 search found); `reduce_range` uses 7-bit weights, for the calibrated
    graph on hosts without VNNI (environment.u8s8_saturates; dynamic int8 runs exactly there in u8u8 mode:
    runtime.session_config). `cache`: a file where onnxruntime keeps the calibrated ranges
    (its calibration_cache_path, where this onnxruntime has it): the ranges are those of the float graph whatever
    stays in float, so a search calibrates once, not once a trial.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    options = {"op_types_to_quantize": list(INT8_OPS), "per_channel": True, "weight_type": "QInt8",
               "reduce_range": bool(reduce_range), "nodes_to_exclude": list(exclude)}
    kept = {"keep_float": {"nodes": list(exclude)}}
    external = Path(str(source) + ".data").exists()  # weights over 2 GB: the dynamo exporter's model.onnx.data
    with _quiet_logging():
        if calibration is None:
            quantize_dynamic(str(source), str(target), op_types_to_quantize=list(INT8_OPS), per_channel=True,
                             weight_type=QuantType.QInt8, use_external_data_format=external,
                             nodes_to_exclude=list(exclude), reduce_range=bool(reduce_range))
            return {**_library("onnxruntime.quantization"), "call": "quantize_dynamic", "options": options, **kept}

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.rows = calibration()

            def get_next(self):
                row = next(self.rows, None)
                return None if row is None else {"pixel_values": np.ascontiguousarray(row, dtype=np.float32)}

            def rewind(self):
                self.rows = calibration()

        import inspect

        cached = {"calibration_cache_path": str(cache)} if cache is not None and "calibration_cache_path" in \
            inspect.signature(quantize_static).parameters else {}  # onnxruntime >= 1.25 (a feature, not a version)
        quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(INT8_OPS),
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=external,
                        nodes_to_exclude=list(exclude), reduce_range=bool(reduce_range), **cached)
    return {**_library("onnxruntime.quantization"), "call": "quantize_static",
            "options": {**options, "quant_format": "QDQ", "activation_type": "QInt8", "calibrate_method": "MinMax",
                        "calibration_inputs": int(count)}, **kept}


# The optimizer's fusions the fused graph leaves out, and why. SkipLayerNormalization (LayerNorm with the residual
# add): onnxruntime 1.32's CPU kernel took 40 ms for dinov2's 24 at batch 1 where the LayerNormalization and Add it
# replaces took 7 ms (onnxruntime's profiler, int8-fused graph, 2 cores), and 7 ms against about 4.5 for dinov3.
FUSED_WITHOUT = ("enable_skip_layer_norm",)


def write_fused(source: Path, target: Path) -> dict:
    """onnxruntime.transformers.optimizer of `source` (model_type "vit") into `target`: bias with GELU (BiasGelu),
    Attention where its pattern matches, but no SkipLayerNormalization (FUSED_WITHOUT); then each attention the
    exporter wrote out (scaled_dot_product_attention's decomposition, which the optimizer does not match:
    exporter/attention.py) as one MultiHeadAttention, and each rotate-half rotary embedding as one RotaryEmbedding.
    Return the recipe, with how many of each it made."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    from .attention import fuse_attention, fuse_rotary

    fusions = FusionOptions("vit")
    for name in FUSED_WITHOUT:
        setattr(fusions, name, False)
    with _quiet_logging():
        # num_heads and hidden_size 0: the optimizer reads them from the graph.
        model = optimizer.optimize_model(str(source), model_type="vit", num_heads=0, hidden_size=0, use_gpu=False,
                                         optimization_options=fusions)
        fused = {op: count for op, count in model.get_fused_operator_statistics().items() if count}
        attention, rotary = fuse_attention(model.model), fuse_rotary(model.model)
        if attention:
            fused["MultiHeadAttention"] = fused.get("MultiHeadAttention", 0) + attention
        if rotary:
            fused["RotaryEmbedding"] = fused.get("RotaryEmbedding", 0) + rotary
        model.save_model_to_file(str(target), use_external_data_format=Path(str(source) + ".data").exists())
    return {**_library("onnxruntime.transformers.optimizer"), "call": "optimize_model",
            "options": {"model_type": "vit", "num_heads": 0, "hidden_size": 0, "use_gpu": False,
                        **{name: False for name in FUSED_WITHOUT}}, "fused": fused,
            "attention": {"pass": "exporter.attention.fuse_attention", "replaced": attention},
            "rotary": {"pass": "exporter.attention.fuse_rotary", "replaced": rotary}}


def int8_modules(source: Path) -> dict[str, str]:
    """{node name: its module} for the quantizable nodes (INT8_OPS) of the graph at `source`. A graph the
    optimizer rewrote (model.fused.onnx) lost the exporter's scopes; its nodes keep their names, so their
    modules are read from model.onnx beside it, and a keep list names modules for every variant."""
    import onnx

    graph = onnx.load(str(source), load_external_data=False).graph
    origin = Path(source).with_name("model.onnx")
    known = {}
    if Path(source).name != "model.onnx" and origin.is_file():
        known = {node.name: module_of(node) for node in onnx.load(str(origin), load_external_data=False).graph.node}
    return {node.name: (module_of(node) if module_of(node) != node.name else known.get(node.name, node.name))
            for node in graph.node if node.name and node.op_type in INT8_OPS}


def weight_sizes(graph) -> dict[str, int]:
    """{node name: the element count of its constant weights} for the nodes of `graph` (an onnx GraphProto) with an
    initializer among their inputs: what one costs to run in float, in proportion (rows x columns of a MatMul)."""
    sizes = {tensor.name: math.prod(tensor.dims) for tensor in graph.initializer}
    return {node.name: sum(sizes.get(name, 0) for name in node.input) for node in graph.node if node.name}


def nodes_of_modules(found: dict[str, str], modules) -> list[str]:
    """The names of the nodes of `found` (int8_modules) inside any of `modules` (timm's module names: blocks.3
    holds blocks.3.mlp.fc2). A module that holds none is a UserError that names some that do."""
    from vitparity.errors import UserError

    names = []
    for module in modules:
        inside = [name for name, owner in found.items() if owner == module or owner.startswith(module + ".")]
        if not inside:
            known = list(dict.fromkeys(found.values()))
            raise UserError(f"--int8-keep {module}: no quantized node of the graph is in that module; name timm modules "
                            f"such as {', '.join(known[:3])}, or a block such as blocks.0")
        names += inside
    return sorted(set(names))


def module_of(node) -> str:
    """The deepest module a node came from, e.g. "blocks.2.mlp.fc2" (from the dynamo exporter's name scopes),
    or the node's own name when it has none."""
    from vitparity.blocks import SCOPES_KEY

    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            modules = [scope.removeprefix("model.") for scope in ast.literal_eval(prop.value) if scope.startswith("model.")]
            if modules:
                return modules[-1]
    return node.name


def write_fp16(source: Path, target: Path, keep_ops=FP16_KEEP, keep_nodes=()) -> dict:
    """onnxruntime.transformers.float16 of `source` into `target`, the op types `keep_ops` and the nodes
    `keep_nodes` kept fp32, the input and outputs kept float32 (keep_io_types); return the recipe."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    with _quiet_logging():
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops),
                                             node_block_list=list(keep_nodes))
    joined = join_fp32_runs(converted)
    onnx.save(converted, str(target))
    return {**_library("onnxruntime.transformers.float16"), "call": "convert_float_to_float16",
            "options": {"keep_io_types": True, "op_block_list": list(keep_ops)},
            "keep_fp32": {"op_types": list(keep_ops), "nodes": list(keep_nodes)}, "fp32_runs_joined": joined}


def join_fp32_runs(model) -> int:
    """Keep the tensors between two fp32 nodes in fp32; return how many fp16 round trips were removed.

    onnxruntime.transformers.float16 keeps a blocked node's arithmetic in fp32 but stores every tensor between nodes
    in fp16: it casts a blocked node's output to fp16 (`<tensor>_cast_to_fp16_node`) and back to fp32 for the next
    blocked node (`..._cast_to_fp32_node`). A value past 65504 between two kept nodes then overflows anyway (an MLP
    whose fc1 output passes it gave NaN with every node of the graph kept). Each such fp32 -> fp16 -> fp32 round trip
    whose every reader is a cast back to fp32 is removed here, so that what is kept in fp32 is, tensors included."""
    graph = model.graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    dropped, renamed = set(), {}
    for node in graph.node:
        if node.op_type != "Cast" or not node.name.endswith("_cast_to_fp16_node") or node.output[0] in outputs:
            continue
        back = readers.get(node.output[0], [])
        if back and all(r.op_type == "Cast" and r.name.endswith("_cast_to_fp32_node") and r.output[0] not in outputs
                        for r in back):
            dropped.update(id(n) for n in (node, *back))
            renamed.update({r.output[0]: node.input[0] for r in back})
    kept = [node for node in graph.node if id(node) not in dropped]

    def source(name: str) -> str:  # a round trip may start from another's end: follow the chain to its fp32 origin
        while name in renamed:
            name = renamed[name]
        return name

    for node in kept:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = source(name)
    del graph.node[:]
    graph.node.extend(kept)
    return len(renamed)


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime.quantization logs advice ("consider to run pre-processing") and float16 its own notes:
    not the user's business during an export."""
    import logging
    import warnings

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def scope_of(node) -> str:
    """The module a node came from, at the granularity of the fp32 search: "blocks.3", "patch_embed",
    "norm", "head"..., or "graph" for the exporter's glue between modules."""
    from vitparity.blocks import SCOPES_KEY, _block_of

    block = _block_of(node)
    if block is not None:
        return f"blocks.{block}"
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            for scope in ast.literal_eval(prop.value):
                if scope.startswith("model."):
                    return scope.removeprefix("model.").split(".")[0]
    return "graph"
