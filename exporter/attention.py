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

`fuse_rotary` does the same for a rotary embedding written out as rotate-half (DINOv3's: Split in halves, Neg, Concat,
times cos and sin tables, Add): one RotaryEmbedding node (com.microsoft) in place of six per q and k. It needs the
tables as constants, as onnxruntime's optimizer leaves them (the exporter's graph splits them from one embedding it
computes), so write_fused runs it after the optimizer.
"""
from __future__ import annotations

import numpy as np

DOMAIN = "com.microsoft"


def fuse_attention(model) -> int:
    """Replace each Mul(q, a) -> MatMul(., Mul(k^T, b)) -> Softmax(last axis) -> MatMul(., v) of `model` (an
    onnx ModelProto, changed in place; q, k^T and v of rank 4 with static heads and head size) by one
    MultiHeadAttention with scale a*b; return how many it replaced."""
    from onnx import helper, numpy_helper

    graph = model.graph
    shapes, constants, producer, consumers, outputs = _index(model)

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
        # k itself where k^T is its transpose (then onnxruntime cancels k's Transpose with the ones that made it, as
        # it does q's and v's: dinov2's fused graph ran 37 Transposes, now 1), else k^T transposed back
        k = _untransposed(kt, producer, constants, shapes)
        new = [
            helper.make_node("Transpose", [q], [f"{name}/q_bsnh"], name=f"{name}/q_bsnh", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{name}/q_bsnh", flat], [f"{name}/q_bsd"], name=f"{name}/q_bsd"),
            helper.make_node("Transpose", [k or kt], [f"{name}/k_bsnh"], name=f"{name}/k_bsnh",
                             perm=[0, 2, 1, 3] if k else [0, 3, 1, 2]),
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
    return _rewrite(model, replace, drop, added)


def fuse_rotary(model) -> int:
    """Replace each Add(Mul(x, cos), Mul(Concat(Neg(x2), x1), sin)) of `model` (an onnx ModelProto, changed in
    place), where x1, x2 = Split(x) in halves on the last axis of a rank-4 x (batch, heads, tokens, head size), and
    cos and sin are float32 constants (tokens, head size) whose two halves are equal, by one RotaryEmbedding
    (com.microsoft, not interleaved, positions from 0) with the tables' first halves; return how many it replaced.
    The Mul broadcasts x's tokens against the tables' rows, so row i is position i, as RotaryEmbedding reads them."""
    from onnx import helper, numpy_helper

    graph = model.graph
    shapes, constants, producer, consumers, outputs = _index(model)

    def once(name):
        return len(consumers.get(name, [])) == 1 and name not in outputs

    def private(name):
        """The node that makes `name`, where nothing but the pattern reads it."""
        return producer.get(name) if once(name) else None

    def table(name, size):
        """The first half of the constant `name`, if it is float32 (tokens, size) with equal halves."""
        if name not in constants:
            return None
        value = numpy_helper.to_array(constants[name])
        if value.dtype != np.float32 or value.ndim != 2 or value.shape[1] != size or size % 2 \
                or not np.array_equal(value[:, :size // 2], value[:, size // 2:]):
            return None
        return value[:, :size // 2]

    def times(node, other):
        """(x, the constant) of Mul(x, constant) `node`, else None."""
        if node is None or node.op_type != "Mul":
            return None
        for mine, theirs in ((0, 1), (1, 0)):
            if node.input[theirs] in constants and (other is None or node.input[mine] == other):
                return node.input[mine], node.input[theirs]
        return None

    def axis(node, default=None):
        return next((attr.i for attr in node.attribute if attr.name == "axis"), default)

    replace, drop, added = {}, set(), []
    for add in [node for node in graph.node if node.op_type == "Add"]:
        for first, second in ((0, 1), (1, 0)):
            straight, turned = private(add.input[first]), private(add.input[second])
            plain, rotated = times(straight, None), times(turned, None)
            if plain is None or rotated is None:
                continue
            x, cos_name = plain
            dims = shapes.get(x)
            if dims is None or len(dims) != 4 or not isinstance(dims[3], int):
                continue
            concat = private(rotated[0])
            if concat is None or concat.op_type != "Concat" or len(concat.input) != 2 or axis(concat) not in (-1, 3):
                continue
            neg, x1 = private(concat.input[0]), concat.input[1]
            if neg is None or neg.op_type != "Neg":
                continue
            split = producer.get(x1)
            if split is None or split.op_type != "Split" or split.input[0] != x or axis(split, 0) not in (-1, 3) \
                    or list(split.output) != [x1, neg.input[0]] or not once(neg.input[0]) or not once(x1):
                continue
            halves = split.input[1] if len(split.input) > 1 and split.input[1] else None
            if halves is not None and (halves not in constants or
                                       list(numpy_helper.to_array(constants[halves])) != [dims[3] // 2] * 2):
                continue
            cos, sin = table(cos_name, dims[3]), table(rotated[1], dims[3])
            # one row per token: a single row the Mul broadcasts to every token is not a table by position
            if cos is None or sin is None or cos.shape != sin.shape or cos.shape[0] < 2 \
                    or (isinstance(dims[2], int) and dims[2] != cos.shape[0]):
                continue
            name = add.name or add.output[0]
            added += [numpy_helper.from_array(cos, f"{name}/cos"), numpy_helper.from_array(sin, f"{name}/sin"),
                      numpy_helper.from_array(np.array([0], np.int64), f"{name}/positions")]
            node = helper.make_node("RotaryEmbedding", [x, f"{name}/positions", f"{name}/cos", f"{name}/sin"],
                                    [add.output[0]], name=f"{name}/rotary", domain=DOMAIN, interleaved=0)
            node.metadata_props.extend(add.metadata_props)
            replace[id(add)] = [node]
            drop |= {id(straight), id(turned), id(concat), id(neg), id(split)}
            break
    return _rewrite(model, replace, drop, added)


def _untransposed(kt: str, producer: dict, constants: dict, shapes: dict) -> str | None:
    """The rank-4 k of which `kt` is the transpose of the last two axes, or None: Transpose(k, perm 0 1 3 2), or the
    dynamo exporter's Reshape(Transpose(Reshape(k, (-1, S, D)), perm 0 2 1), (B, H, D, S)), where both shapes are
    read from Shape(k) (each dim checked, so no other reshape is taken for it)."""
    from onnx import numpy_helper

    node = producer.get(kt)
    if node is None:
        return None
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        return node.input[0] if perm == [0, 1, 3, 2] else None
    middle = producer.get(node.input[0]) if node.op_type == "Reshape" else None
    if middle is None or middle.op_type != "Transpose" or \
            next((list(a.ints) for a in middle.attribute if a.name == "perm"), None) != [0, 2, 1]:
        return None
    first = producer.get(middle.input[0])
    if first is None or first.op_type != "Reshape":
        return None
    k = first.input[0]
    if len(shapes.get(k) or ()) != 4:
        return None

    def dims(name):
        """The shape tensor `name` as a list of ints and ("k", axis) for the dims it takes from Shape(k), or None."""
        if name in constants:
            value = numpy_helper.to_array(constants[name])
            return [int(v) for v in value.reshape(-1)] if value.dtype.kind == "i" and value.ndim <= 1 else None
        made = producer.get(name)
        if made is None:
            return None
        if made.op_type == "Concat":
            parts = [dims(part) for part in made.input]
            return None if any(part is None for part in parts) else [d for part in parts for d in part]
        if made.op_type == "Slice" and len(made.input) == 3:  # starts and ends, on axis 0, step 1
            shape, start, end = made.input[0], dims(made.input[1]), dims(made.input[2])
            source = producer.get(shape)
            if source is None or source.op_type != "Shape" or source.input[0] != k \
                    or any(a.name != "start" or a.i != 0 for a in source.attribute) \
                    or start is None or end is None or len(start) != 1 or len(end) != 1 \
                    or not all(isinstance(v, int) for v in (*start, *end)):
                return None
            return [("k", axis) for axis in range(4)[slice(start[0], end[0])]]
        return None

    if dims(first.input[1]) == [-1, ("k", 2), ("k", 3)] and \
            dims(node.input[1]) == [("k", 0), ("k", 1), ("k", 3), ("k", 2)]:
        return k
    return None


def _index(model) -> tuple:
    """What a pass reads of `model`'s graph: (recorded shapes, constants (initializers and Constant nodes' values),
    {tensor: the node that makes it}, {tensor: the nodes that read it}, the graph's output names)."""
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    constants.update({node.output[0]: attr.t for node in graph.node if node.op_type == "Constant"
                      for attr in node.attribute if attr.name == "value"})
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return _shapes(model), constants, producer, consumers, {o.name for o in graph.output}


def _rewrite(model, replace: dict, drop: set, added: list) -> int:
    """Put each node's replacement list (`replace`, by id) in its place, leave out the `drop` ids and the nodes
    nothing reads any more, the initializers and recorded shapes of what went; add `added` initializers and the
    com.microsoft opset. Returns how many nodes were replaced."""
    import onnx

    if not replace:
        return 0
    graph = model.graph
    nodes = []
    for node in graph.node:
        if id(node) in replace:
            nodes += replace[id(node)]
        elif id(node) not in drop:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(_live(nodes, {o.name for o in graph.output}))
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
