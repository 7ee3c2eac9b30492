"""Attention as one onnxruntime MultiHeadAttention node (com.microsoft), for the fused variant.

Why our own pass: onnxruntime.transformers.optimizer (model_type "vit") fuses Attention only from the pattern of
BERT-like exports (separate or packed Q/K/V projections reshaped and transposed into a MatMul, a Div or Mul by
sqrt(head size) after it, a mask Add). torch's dynamo exporter writes F.scaled_dot_product_attention, which timm's
ViTs call, as its own decomposition instead: q times sqrt(scale), K transposed through Shape/Reshape/Transpose/Reshape
and times sqrt(scale), MatMul, Softmax, MatMul with v; DINOv3 puts its rotary embedding between the qkv projection and
that. None of it matches, so the optimizer fused no attention in any timm ViT we export (0 Attention in its
statistics for dinov2 and dinov3). This pass matches that decomposition alone, whatever comes before q, k and v, and
hands it to MultiHeadAttention, whose CPU kernel runs a tiled (flash) attention and never writes the
(heads, tokens, tokens) scores: 12.9 -> 10.0 ms per block at dinov2's 1374 tokens on 2 cores (onnxruntime 1.32).
The graph it writes is verified by the same judge as every variant.
"""
from __future__ import annotations

import numpy as np

DOMAIN = "com.microsoft"


def fuse_attention(model) -> int:
    """Replace each Mul(q, a) -> MatMul(., Mul(k^T, b)) -> Softmax(last axis) -> MatMul(., v) of `model` (an
    onnx ModelProto, changed in place; q, k^T and v of rank 4 with static heads and head size) by one
    MultiHeadAttention with scale a*b; return how many it replaced."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    shapes = _shapes(model)
    constants = {init.name: init for init in graph.initializer}
    constants.update({node.output[0]: attr.t for node in graph.node if node.op_type == "Constant"
                      for attr in node.attribute if attr.name == "value"})
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    outputs = {o.name for o in graph.output}

    def only_consumer(name):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in outputs else None

    def scaled(name):
        """(the tensor, the scalar) of Mul(tensor, scalar) producing `name`, or None."""
        node = producer.get(name)
        if node is None or node.op_type != "Mul":
            return None
        for mine, other in ((0, 1), (1, 0)):
            if node.input[other] in constants:
                value = numpy_helper.to_array(constants[node.input[other]])
                if value.size == 1 and value.dtype == np.float32:
                    return node.input[mine], float(value.reshape(()))
        return None

    replace, drop, added = {}, set(), []
    for softmax in [node for node in graph.node if node.op_type == "Softmax"]:
        scores, probs = producer.get(softmax.input[0]), softmax.output[0]
        axis = next((attr.i for attr in softmax.attribute if attr.name == "axis"), -1)
        out = only_consumer(probs)
        if scores is None or scores.op_type != "MatMul" or only_consumer(scores.output[0]) is not softmax \
                or out is None or out.op_type != "MatMul" or out.input[0] != probs:
            continue
        left, right = scaled(scores.input[0]), scaled(scores.input[1])
        if left is None or right is None:
            continue
        (q, a), (kt, b), v = left, right, out.input[1]
        dims = [shapes.get(name) for name in (q, kt, v)]
        if any(d is None or len(d) != 4 for d in dims) or axis not in (-1, 3):
            continue
        heads, size = dims[0][1], dims[0][3]
        # k^T's dims are often unknown (the exporter transposes it through a Reshape of computed shape): it must
        # only not contradict q's; v's must match.
        if not isinstance(heads, int) or not isinstance(size, int) or dims[2][1] != heads or dims[2][3] != size \
                or any(isinstance(d, int) and d != want for d, want in ((dims[1][1], heads), (dims[1][2], size))):
            continue
        name = softmax.name or probs
        flat, split = f"{name}/mha_flat", f"{name}/mha_split"
        new = [
            helper.make_node("Transpose", [q], [f"{name}/q_bsnh"], name=f"{name}/q_bsnh", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{name}/q_bsnh", flat], [f"{name}/q_bsd"], name=f"{name}/q_bsd"),
            helper.make_node("Transpose", [kt], [f"{name}/k_bsnh"], name=f"{name}/k_bsnh", perm=[0, 3, 1, 2]),
            helper.make_node("Reshape", [f"{name}/k_bsnh", flat], [f"{name}/k_bsd"], name=f"{name}/k_bsd"),
            helper.make_node("Transpose", [v], [f"{name}/v_bsnh"], name=f"{name}/v_bsnh", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{name}/v_bsnh", flat], [f"{name}/v_bsd"], name=f"{name}/v_bsd"),
            helper.make_node("MultiHeadAttention", [f"{name}/q_bsd", f"{name}/k_bsd", f"{name}/v_bsd"],
                             [f"{name}/mha"], name=f"{name}/mha", domain=DOMAIN, num_heads=heads, scale=a * b),
            helper.make_node("Reshape", [f"{name}/mha", split], [f"{name}/o_bsnh"], name=f"{name}/o_bsnh"),
            helper.make_node("Transpose", [f"{name}/o_bsnh"], [out.output[0]], name=f"{name}/o_bnsh", perm=[0, 2, 1, 3]),
        ]
        for node in new:  # the exporter's name scopes (blocks.3.attn): the nodes keep their module
            node.metadata_props.extend(softmax.metadata_props)
        added += [numpy_helper.from_array(np.array([0, 0, heads * size], np.int64), flat),
                  numpy_helper.from_array(np.array([0, 0, heads, size], np.int64), split)]
        replace[id(out)] = new
        drop |= {id(scores), id(softmax)}
    if not replace:
        return 0
    nodes = []
    for node in graph.node:
        if id(node) in replace:
            nodes += replace[id(node)]
        elif id(node) not in drop:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(_live(nodes, outputs))
    made = {out for node in graph.node for out in node.output}
    shaped = [info for info in graph.value_info if info.name in made]  # none for the tensors that went
    del graph.value_info[:]
    graph.value_info.extend(shaped)
    used = _read(graph.node)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    if not any(op.domain == DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return len(replace)


def _shapes(model) -> dict:
    """{tensor: [dim, ...]} from the shapes the graph records (the dynamo exporter writes a value_info for every
    tensor, and onnxruntime's optimizer keeps them): a dim an int where static, else its name or None. Read, not
    inferred: onnx's shape inference knows no com.microsoft op, and could not take a model over 2 GB whole."""
    found = {}
    for info in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            found[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return found


def _read(nodes) -> set:
    """The tensors `nodes` read, those read inside their subgraphs (If, Loop, Scan bodies) included."""
    from onnx import AttributeProto

    read = set()
    for node in nodes:
        read.update(node.input)
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                read |= _read(body.node)
    return read


def _live(nodes: list, outputs: set) -> list:
    """`nodes` less those whose outputs nothing reads (the K transpose chain the pass left unread, and so on)."""
    while True:
        read = outputs | _read(nodes)
        live = [node for node in nodes if any(out in read for out in node.output)]
        if len(live) == len(nodes):
            return live
        nodes = live
