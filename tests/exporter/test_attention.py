"""exporter/attention.py: the exporter's scaled_dot_product_attention decomposition becomes one MultiHeadAttention
with the same numbers, and nothing else is touched."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.attention import fuse_attention, fuse_rotary

BATCH, HEADS, TOKENS, SIZE = 2, 3, 7, 4


def exporters_transpose(k: str, kt: str, from_shape: bool = True) -> list:
    """k^T as torch's dynamo exporter writes it: Reshape(k, (-1, tokens, size)), Transpose(0 2 1), Reshape to
    (batch, heads, size, tokens), each dim sliced from Shape(k); or, `from_shape` False, the last shape a constant
    (the same numbers, but nothing proves them k's)."""
    big = np.iinfo(np.int64).max
    nodes = [helper.make_node("Shape", [k], ["k_shape"], start=0)]
    for i, (start, end) in enumerate([(-2, -1), (-1, big), (0, -2), (-1, big), (-2, -1)]):
        nodes += [helper.make_node("Constant", [], [f"start{i}"], value=numpy_helper.from_array(np.array([start], np.int64))),
                  helper.make_node("Constant", [], [f"end{i}"], value=numpy_helper.from_array(np.array([end], np.int64))),
                  helper.make_node("Slice", ["k_shape", f"start{i}", f"end{i}"], [f"dim{i}"])]
    last = helper.make_node("Concat", ["dim2", "dim3", "dim4"], ["kt_shape"], axis=0) if from_shape else \
        helper.make_node("Constant", [], ["kt_shape"], value=numpy_helper.from_array(np.array([BATCH, HEADS, SIZE, TOKENS])))
    nodes += [helper.make_node("Constant", [], ["minus_one"], value=numpy_helper.from_array(np.array([-1], np.int64))),
              helper.make_node("Concat", ["minus_one", "dim0", "dim1"], ["flat_shape"], axis=0),
              helper.make_node("Reshape", [k, "flat_shape"], ["k_flat"]),
              helper.make_node("Transpose", ["k_flat"], ["kt_flat"], perm=[0, 2, 1]),
              last,
              helper.make_node("Reshape", ["kt_flat", "kt_shape"], [kt])]
    return nodes


def decomposed(extra_reader: bool = False, mask: bool = False, recorded: bool = True, chain=None):
    """The decomposition torch's dynamo exporter writes: q * sqrt(scale), k transposed * sqrt(scale), MatMul, Softmax,
    MatMul with v; q, k and v (batch, heads, tokens, head size) made from one input, as a ViT's qkv projection.
    `chain`: k^T made by exporters_transpose, from k's shape ("shape") or a constant ("constant"), else by one
    Transpose."""
    root = np.float32(SIZE ** -0.25)
    probs = "probs"
    nodes = [
        helper.make_node("Split", ["x"], ["q", "k", "v"], axis=1, num_outputs=3),
        *(exporters_transpose("k", "kt", chain == "shape") if chain else
          [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])]),
        helper.make_node("Mul", ["q", "root"], ["qs"]),
        helper.make_node("Mul", ["kt", "root"], ["ks"]),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
    ]
    if mask:  # an attention mask added before the Softmax: not the pattern
        nodes.append(helper.make_node("Add", ["scores", "root"], ["masked"]))
    nodes += [helper.make_node("Softmax", ["masked" if mask else "scores"], [probs], axis=-1, name="attn/softmax"),
              helper.make_node("MatMul", [probs, "v"], ["attended"]),
              helper.make_node("Transpose", ["attended"], ["out"], perm=[0, 2, 1, 3])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    if extra_reader:  # the probabilities are an output too: they cannot disappear
        outputs.append(helper.make_tensor_value_info(probs, TensorProto.FLOAT, None))
    # the shapes the exporter records (value_info): q and v known, k^T of rank 4 with dims unknown, as it writes them
    shapes = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", HEADS, TOKENS, SIZE]) for name in "qkv"]
    shapes += [helper.make_tensor_value_info("kt", TensorProto.FLOAT, [None] * 4)] if recorded else []
    graph = helper.make_graph(nodes, "sdpa", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            ["batch", 3 * HEADS, TOKENS, SIZE])],
                              outputs, [numpy_helper.from_array(np.array([root], np.float32), "root")], value_info=shapes)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize("chain", [None, "shape", "constant"])
def test_the_decomposition_becomes_one_multiheadattention_with_the_same_numbers(chain):
    model = decomposed(chain=chain)
    x = np.random.default_rng(0).standard_normal((BATCH, 3 * HEADS, TOKENS, SIZE)).astype(np.float32)
    before = run(model, x)[0]
    assert fuse_attention(model) == 1
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops and "MatMul" not in ops
    [mha] = [node for node in model.graph.node if node.op_type == "MultiHeadAttention"]
    attributes = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
    assert attributes["num_heads"] == HEADS and attributes["scale"] == pytest.approx(SIZE ** -0.5)
    after = run(model, x)[0]
    assert after.shape == before.shape == (BATCH, TOKENS, HEADS, SIZE)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)
    # MultiHeadAttention reads k itself, not k^T transposed back, where k^T is k's transpose however written (the
    # chain that only looks like it is left as it was); the transposes that made k^T are gone
    [k_in] = [node for node in model.graph.node if node.name.endswith("/k_bsnh")]
    proven = chain != "constant"
    assert (k_in.input[0], list(k_in.attribute[0].ints)) == (("k", [0, 2, 1, 3]) if proven else ("kt", [0, 3, 1, 2]))
    # q's, k's and v's to (batch, tokens, heads, size), the output's back, the graph's own after it, and the one that
    # made k^T where k is not proven
    assert ops.count("Transpose") == 3 + 1 + 1 + (0 if proven else 1)


@pytest.mark.parametrize("change", ["extra_reader", "mask", "recorded"])
def test_a_graph_that_is_not_the_pattern_is_left_as_it_was(change):
    model = decomposed(**{change: change != "recorded"})  # or k^T's rank not recorded: no fusion on a guess
    before = model.SerializeToString()
    assert fuse_attention(model) == 0
    assert model.SerializeToString() == before


def rotated(swap: bool = False, unequal: bool = False, recorded: bool = True, one_row: bool = False):
    """x (batch, heads, tokens, size) times cos, plus its rotate-half (Split in halves, Neg, Concat) times sin, as the
    exporter writes DINOv3's rotary embedding; `swap` concatenates (x1, -x2) instead, `unequal` makes the tables'
    halves differ, `recorded` False leaves x's rank unrecorded, `one_row` makes the tables one row for every token."""
    rng = np.random.default_rng(1)
    angles = rng.standard_normal((1 if one_row else TOKENS, SIZE // 2)).astype(np.float32)
    cos, sin = np.tile(np.cos(angles), 2), np.tile(np.sin(angles), 2)
    if unequal:
        cos[:, 0] += 0.5
    nodes = [helper.make_node("Identity", ["x"], ["q"]),
             helper.make_node("Split", ["q"], ["q1", "q2"], axis=-1, num_outputs=2),
             helper.make_node("Neg", ["q2"], ["minus_q2"]),
             helper.make_node("Concat", ["q1", "minus_q2"] if swap else ["minus_q2", "q1"], ["turned"], axis=-1),
             helper.make_node("Mul", ["q", "cos"], ["straight"]),
             helper.make_node("Mul", ["turned", "sin"], ["turned_sin"]),
             helper.make_node("Add", ["straight", "turned_sin"], ["out"], name="rope/add")]
    shapes = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", HEADS, TOKENS, SIZE])] if recorded else []
    graph = helper.make_graph(nodes, "rope", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")], value_info=shapes)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_the_rotate_half_embedding_becomes_one_rotaryembedding_with_the_same_numbers():
    model = rotated()
    x = np.random.default_rng(0).standard_normal((BATCH, HEADS, TOKENS, SIZE)).astype(np.float32)
    before = run(model, x)[0]
    assert fuse_rotary(model) == 1
    assert sorted(node.op_type for node in model.graph.node) == ["Identity", "RotaryEmbedding"]
    np.testing.assert_allclose(run(model, x)[0], before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("change", ["swap", "unequal", "recorded", "one_row"])
def test_a_rotation_that_is_not_rotate_half_is_left_as_it_was(change):
    model = rotated(**{change: change != "recorded"})
    before = model.SerializeToString()
    assert fuse_rotary(model) == 0
    assert model.SerializeToString() == before
