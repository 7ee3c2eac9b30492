"""exporter/attention.py: the exporter's scaled_dot_product_attention decomposition becomes one MultiHeadAttention
with the same numbers, and nothing else is touched."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.attention import fuse_attention

BATCH, HEADS, TOKENS, SIZE = 2, 3, 7, 4


def decomposed(extra_reader: bool = False, mask: bool = False, recorded: bool = True):
    """The decomposition torch's dynamo exporter writes: q * sqrt(scale), k transposed * sqrt(scale), MatMul, Softmax,
    MatMul with v; q, k and v (batch, heads, tokens, head size) made from one input, as a ViT's qkv projection."""
    root = np.float32(SIZE ** -0.25)
    probs = "probs"
    nodes = [
        helper.make_node("Split", ["x"], ["q", "k", "v"], axis=1, num_outputs=3),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
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
    shapes = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", HEADS, TOKENS, SIZE]) for name in "qv"]
    shapes += [helper.make_tensor_value_info("kt", TensorProto.FLOAT, [None] * 4)] if recorded else []
    graph = helper.make_graph(nodes, "sdpa", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            ["batch", 3 * HEADS, TOKENS, SIZE])],
                              outputs, [numpy_helper.from_array(np.array([root], np.float32), "root")], value_info=shapes)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_the_decomposition_becomes_one_multiheadattention_with_the_same_numbers():
    model = decomposed()
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


@pytest.mark.parametrize("change", ["extra_reader", "mask", "recorded"])
def test_a_graph_that_is_not_the_pattern_is_left_as_it_was(change):
    model = decomposed(**{change: change != "recorded"})  # or k^T's rank not recorded: no fusion on a guess
    before = model.SerializeToString()
    assert fuse_attention(model) == 0
    assert model.SerializeToString() == before
