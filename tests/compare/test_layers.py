"""Per-block comparison: one row per block plus the final norm, and the first drifting block named."""
from __future__ import annotations

import json

import numpy as np
import pytest

from compare.cli import main
from tests.helpers import TINY, rewrite_weights
from vitparity import artifact


def _layers(capsys, tmp_path, model, root, *extra):
    code = main([model, "--artifacts", str(root), "--layers", "--no-latency", "--json", str(tmp_path / "r.json"), *extra])
    out = capsys.readouterr().out
    return code, out, json.loads((tmp_path / "r.json").read_text())["reports"][0]


def test_blocks_onnx_is_rebuilt_when_model_onnx_changes(tiny_copy, capsys, tmp_path, ort_only):
    _layers(capsys, tmp_path, TINY, tiny_copy, *ort_only)
    built_from = artifact.load(tiny_copy, TINY).manifest["blocks"]["model_sha256"]
    manifest_path = tiny_copy / TINY / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["blocks"]["model_sha256"] = "0" * 64  # as if model.onnx had been re-exported since
    manifest_path.write_text(json.dumps(manifest))
    before = (tiny_copy / TINY / "blocks.onnx").stat().st_mtime_ns
    _layers(capsys, tmp_path, TINY, tiny_copy, *ort_only)
    assert artifact.load(tiny_copy, TINY).manifest["blocks"]["model_sha256"] == built_from
    assert (tiny_copy / TINY / "blocks.onnx").stat().st_mtime_ns != before


# The architectures with fewer blocks (--model-kwargs depth=N, which the manifest keeps and every rebuild of the eager
# model takes): each block is the same code, and an export costs about 1.3 s per block here.
@pytest.mark.parametrize("model,attention", [
    ("test_vit_relpos", "non-fused"),  # relative-position bias: the fused path cannot be traced
    ("eva02_tiny_patch14_224", "fused"),  # EVA: rope, SwiGLU, Identity final norm
])
def test_layers_work_on_relpos_and_eva_models(model, attention, tmp_path, capsys):
    """(A gap model, test_vit2, whose final norm is Identity and last block's output is `tokens`: the sweep's test.)"""
    from exporter.export import ExportOptions, export

    export(model, tmp_path, ExportOptions(weights="random", model_kwargs=(("depth", 3),)))
    code, out, report = _layers(capsys, tmp_path, model, tmp_path, "--backends", "torch-cpu,ort-cpu")
    assert code == 0, out
    assert report["drift"]["ort-cpu"].startswith("ort-cpu: no drift")
    assert [r["layer"] for r in report["layers"] if r["backend"] == "ort-cpu"][:4] == ["block_0", "block_1", "block_2", "norm"]
    manifest = json.loads((tmp_path / model / "manifest.json").read_text())
    assert manifest["attention"].startswith(attention) and manifest["model_kwargs"] == {"depth": 3}


def test_layers_tap_patch_only_blocks_and_name_the_drifting_one(tmp_path, capsys):
    # XCiT's blocks carry patch tokens only (the CLS token joins later, in class-attention blocks) and
    # its forward_intermediates has no prefix-token option: the taps are forward hooks on model.blocks.
    from exporter.export import ExportOptions, export

    model = "xcit_nano_12_p16_224"
    export(model, tmp_path, ExportOptions(weights="random", model_kwargs=(("depth", 5),)))  # 5 of its 12 patch blocks

    def perturb(state):
        state["blocks.3.mlp.fc1.weight"] *= 1.05

    rewrite_weights(tmp_path / model, perturb)
    code, out, report = _layers(capsys, tmp_path, model, tmp_path, "--backends", "torch-cpu,ort-cpu")
    assert code == 1 and not report.get("warnings")
    rows = [r for r in report["layers"] if r["backend"] == "ort-cpu"]
    assert [r["layer"] for r in rows] == [f"block_{i}" for i in range(5)] + ["norm"]
    assert report["drift"]["ort-cpu"].startswith("ort-cpu: drift starts at block 3 (cos")
    assert all(r["passed"] for r in rows[:3]) and not rows[3]["passed"]


def test_taps_of_another_layout_are_reported_not_compared():
    from compare.layers import compare_layers
    from vitparity.tolerances import TOLERANCES

    ones = np.ones((1, 5, 8), dtype=np.float32)
    taps = {"torch-cpu": {"block_0": ones, "norm": ones}, "ort-cpu": {"block_0": ones[:, 1:], "norm": ones}}
    rows, drift = compare_layers(taps, "torch-cpu", {"ort-cpu": TOLERANCES["same-host"]})
    assert rows == [] and drift["ort-cpu"] == "ort-cpu: per-block outputs not comparable: 2 taps against 2, first differing: block_0"


def test_blocks_onnx_references_external_weights_instead_of_copying_them(artifacts_root, tmp_path):
    # Models over 2 GB keep their weights in model.onnx.data; loading them into blocks.onnx made it
    # unsavable ("Failed to serialize proto", vit_huge). Here the tiny model's weights are made external.
    import onnx
    import onnxruntime as ort

    from exporter.variants import write_ln_decomposed
    from vitparity import blocks

    source = artifact.load(artifacts_root, TINY).path("model.onnx")
    onnx.save(onnx.load(str(source)), str(tmp_path / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data")
    elsewhere = tmp_path / "cache"
    elsewhere.mkdir()
    batch = np.load(artifact.load(artifacts_root, TINY).path("sample.npz"))["pixel_values"]
    blocks.build(source, tmp_path / "inline.onnx")
    want = ort.InferenceSession(str(tmp_path / "inline.onnx")).run(None, {"pixel_values": batch})
    for out in (tmp_path / "blocks.onnx", elsewhere / "blocks.onnx"):
        blocks.build(tmp_path / "model.onnx", out)
        blocks.link_external_data(blocks.load_graph(tmp_path / "model.onnx"), tmp_path, out.parent)
        assert _weights_referenced(out), "weights were copied in"
        got = ort.InferenceSession(str(out)).run(None, {"pixel_values": batch})
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert write_ln_decomposed(tmp_path / "model.onnx", tmp_path / "ln.onnx") > 0
    assert _weights_referenced(tmp_path / "ln.onnx")


def _weights_referenced(path) -> bool:
    from onnx.external_data_helper import uses_external_data

    from vitparity.blocks import load_graph

    external = [t for t in load_graph(path).graph.initializer if uses_external_data(t)]
    return bool(external) and not any(t.raw_data for t in external)


def test_the_parts_of_a_block_come_from_the_graphs_node_scopes_in_the_order_they_run(artifacts_root):
    """What an onnxruntime row's replay opens: timm's module names, each the value of the last node of its scope,
    a child before the parent that ends with it, and the attention's Softmax; nothing of another block."""
    import onnx

    from vitparity import blocks

    graph = onnx.load(str(artifacts_root / TINY / "model.onnx"), load_external_data=False).graph
    parts = blocks.block_parts(graph, 2)
    assert list(parts) == ["norm1", "attn.qkv", "attn.softmax", "attn.proj", "attn", "norm2", "mlp.fc1", "mlp.act",
                           "mlp.fc2", "mlp"]
    made = {node.output[0]: node for node in graph.node}
    assert made[parts["attn.softmax"]].op_type == "Softmax" and made[parts["norm1"]].op_type == "LayerNormalization"
    assert parts["attn"] == parts["attn.proj"] and set(parts.values()).isdisjoint(blocks.block_parts(graph, 1).values())
