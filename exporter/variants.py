"""Verified variants of model.onnx for providers that lack a kernel the exported graph uses.

The CANN execution provider has no LayerNormalization kernel: each of a ViT's LayerNorms would run
on the CPU between NPU subgraphs. `decompose_layernorm` rewrites every LayerNormalization into
primitive ops (ReduceMean, Sub, Mul, Add, Sqrt, Div) that the provider does have, so the whole
graph can stay on the NPU. The exporter verifies the variant with the same parity checks as
model.onnx and hashes it in the manifest; ort-cann picks it when it is there.
"""
from __future__ import annotations

import numpy as np

LN_DECOMPOSED = "model.ln-decomposed.onnx"


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

    from .blocks import load_graph

    model = load_graph(source)
    count = decompose_layernorm(model)
    onnx.save(model, str(target))
    return count
