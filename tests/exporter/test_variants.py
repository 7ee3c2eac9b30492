"""Reduced-precision variants: made by onnxruntime's own tools, hashed, verified by their class, published
atomically; and the search for what must stay fp32 in fp16, on a model that really overflows fp16."""
from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import onnx
import pytest

from exporter import keep_fp32, variants
from exporter.cli import main
from exporter.precision import check_variant
from tests.conftest import OUTLIER_BLOCK
from tests.helpers import (
    PUBLISH_VARIANT,
    SLOW_FILESYSTEM,
    TINY,
    call,
    kill_at,
    one_line_error,
    publisher,
)
from vitparity import artifact, environment, runtime
from vitparity.tolerances import TOLERANCES

OVERFLOW_BLOCK = 2


def verify_set(art, folder, variant="int8", searched=False):
    """What the exporter verifies the artifact's `variant` on, rebuilt here: the sample, the photo variations and
    those held out of the searches; with `searched`, the rows a search judged on (the held-out ones left out)."""
    from exporter.precision import SEARCHED, verify_inputs
    from vitparity.eager import eager_outputs, rebuild_model

    model = rebuild_model(art)
    with np.load(art.path("sample.npz")) as sample:
        inputs, reference = sample["pixel_values"], {n: sample[n] for n in ("pooled", "tokens")}
    scratch = folder / "verify-set"
    scratch.mkdir(exist_ok=True)
    found, described = verify_inputs(inputs, reference, lambda batch: eager_outputs(model, batch), art.manifest["data_config"],
                                     None, lambda message: None, scratch, layout=art.manifest["token_layout"])
    record = variants.precision_variants(art.manifest)[variant]
    assert described == record["verify"]["inputs"]
    if searched:
        found = found.only(*SEARCHED)
        assert found.counts() == record["verify"]["searched_on"]
    return found


def aim(record):
    """The tolerance a search aimed for (a share of its class's budget), as the manifest records it."""
    from dataclasses import replace

    return replace(TOLERANCES[record["class"]], **record["search"]["aim"])


@pytest.fixture(scope="module")
def overflowing_weights(tmp_path_factory):
    """test_vit whose block 2 MLP computes values over fp16's largest (65504): fc1 scaled up 1e5, fc2 down to
    match, so the fp32 model is as well-behaved as before while its fp16 graph overflows inside that block."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    mlp = model.blocks[OVERFLOW_BLOCK].mlp
    with torch.no_grad():
        mlp.fc1.weight.mul_(1e5)
        mlp.fc1.bias.mul_(1e5)
        mlp.fc2.weight.mul_(1e-5)
        x = model.blocks[OVERFLOW_BLOCK].norm2(model.blocks[:OVERFLOW_BLOCK](model._pos_embed(model.patch_embed(torch.randn(1, 3, 160, 160)))))
        assert mlp.fc1(x).abs().max() > 65504  # the premise: this block's activations leave fp16's range
    path = tmp_path_factory.mktemp("weights") / "overflow.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_tiny_variants_are_made_by_the_libraries_hashed_and_verified_by_their_class(variants_root, tmp_path):
    art = artifact.load(variants_root, TINY)  # every file's sha256 checked against the manifest
    found = variants.precision_variants(art.manifest)
    assert set(found) == {"int8", "fp16"}
    for name, record in found.items():
        assert art.manifest["files"][record["file"]]["sha256"] == artifact.sha256(art.path(record["file"]))
        assert record["recipe"]["version"] == environment.version("onnxruntime")
        tolerance = TOLERANCES[record["class"]]
        verify = record["verify"]
        assert verify["cosine"] >= tolerance.min_cosine and verify["rel_error"] <= tolerance.max_rel
        assert verify["thresholds"] == {"min_cosine": tolerance.min_cosine, "max_rel": tolerance.max_rel}
    int8 = Counter(n.op_type for n in onnx.load(str(art.path("model.int8.onnx"))).graph.node)
    assert int8["MatMulInteger"] > 0 and found["int8"]["recipe"]["call"] == "quantize_dynamic"
    fp16 = onnx.load(str(art.path("model.fp16.onnx")))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert [i.type.tensor_type.elem_type for i in fp16.graph.input] == [onnx.TensorProto.FLOAT]  # keep_io_types
    assert found["fp16"]["recipe"]["keep_fp32"]["op_types"] == list(variants.FP16_KEEP)
    # The figures are real: an independent check of the published graph agrees with the manifest's.
    # the seeded sample, real-photo statistics, and photos held out of any search
    assert found["int8"]["verify"]["inputs"] == {"sample": 2, "photos": 8, "held_out_photos": 8}
    passed, figures = check_variant(art.path("model.int8.onnx"), verify_set(art, tmp_path), None, TOLERANCES["int8"])
    assert passed and figures["cosine"] == pytest.approx(found["int8"]["verify"]["cosine"])


def test_layernorm_in_fp16_on_an_overflowing_model_fails_with_exit_1_and_keeps_the_artifact(
        overflowing_weights, tmp_path, capsys):
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--weights", str(overflowing_weights))
    assert code == 0, err
    before = artifact.load(tmp_path, TINY).manifest
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--if-missing", "--variant", "fp16", "--fp16-keep", "none")
    line = one_line_error(err.split("\n", 1)[1] if err.startswith(f"{TINY}:") else err)
    assert code == 1 and "the fp16 variant fails its fp16 class" in line and "--search-precision" in line
    assert artifact.load(tmp_path, TINY).manifest == before
    assert not (tmp_path / TINY / "model.fp16.onnx").exists()


def test_the_search_finds_the_overflowing_block_and_every_entry_is_needed(overflowing_weights, tmp_path, capsys):
    code, out, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--weights", str(overflowing_weights),
                          "--variant", "fp16", "--search-precision")
    assert code == 0, err
    art = artifact.load(tmp_path, TINY)
    record = variants.precision_variants(art.manifest)["fp16"]
    entries = record["search"]["keep_fp32"]
    assert entries and all(entry.startswith(f"blocks.{OVERFLOW_BLOCK}/") for entry in entries), entries
    assert "must stay in float in the fp16 graph: " + ", ".join(entries) in out
    assert len(record["search"]["trials"]) >= 2 and "trials)" in out
    # Rebuilt here from the entries, not read from the trials: the list passes, and each one-less list fails.
    graph = onnx.load(str(art.path("model.onnx"))).graph
    nodes = [(n.name, variants.scope_of(n), n.op_type) for n in graph.node]
    inputs = verify_set(art, tmp_path, "fp16", searched=True)

    def passes(kept):
        names = [name for name, scope, op in nodes if f"{scope}/{op}" in kept]
        variants.write_fp16(art.path("model.onnx"), tmp_path / "trial.onnx", keep_ops=(), keep_nodes=names)
        return check_variant(tmp_path / "trial.onnx", inputs, None, aim(record))[0]

    assert passes(set(entries))
    for entry in entries:
        assert not passes(set(entries) - {entry}), f"{entry} is not needed"


def test_minimize_returns_a_one_minimal_list():
    needed = {"b", "e"}  # passes exactly when both are kept
    search = keep_fp32.Search(lambda nodes: (needed <= nodes, {"cosine": 1.0, "rel_error": 0.0, "worst_output": "pooled"}))
    found = keep_fp32.minimize(list("abcdefgh"), frozenset, search)
    assert sorted(found) == ["b", "e"]
    assert len(search.trials) <= 2 + 8  # two halves tried, then each unit once


def test_with_costs_the_search_keeps_the_cheaper_of_two_lists_that_pass(artifacts_root):
    """Keeping fc1 in float (4x the weights of proj in a ViT) or both of two cheap modules passes: by count the search
    keeps fc1, by cost the two cheap ones. The costs are the int8 graph's weight sizes, read from the real graph."""
    import timm
    import torch

    graph = onnx.load(str(artifacts_root / TINY / "model.onnx"), load_external_data=False).graph
    modules = variants.int8_modules(artifacts_root / TINY / "model.onnx")
    sizes = {modules[name]: size for name, size in variants.weight_sizes(graph).items() if name in modules}
    model = timm.create_model(TINY, pretrained=False)
    linears = {name: module.weight.numel() for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert {name: size for name, size in sizes.items() if size} == {name: linears[name] for name in linears if "blocks" in name}
    assert {name for name, size in sizes.items() if not size} == {f"blocks.{i}.attn" for i in range(len(model.blocks))}
    nodes = [("proj0", "blocks.0", "blocks.0.attn.proj"), ("proj1", "blocks.0", "blocks.0.attn.qkv"),
             ("fc1", "blocks.1", "blocks.1.mlp.fc1")]
    cost = {"proj0": 1, "proj1": 1, "fc1": 4}

    def judge(kept):
        return "fc1" in kept or {"proj0", "proj1"} <= kept, {"cosine": 1.0, "rel_error": 0.0, "worst_output": "pooled"}

    by_count = keep_fp32.search(nodes, judge, label=lambda scope, unit: unit)
    by_cost = keep_fp32.search(nodes, judge, label=lambda scope, unit: unit, node_cost=cost)
    assert by_count["keep_fp32"] == ["blocks.1.mlp.fc1"]
    assert by_cost["keep_fp32"] == ["blocks.0.attn.proj", "blocks.0.attn.qkv"]  # in the graph's order


@pytest.mark.parametrize("args,message", [
    (("--variant", "int8-qdq"), "add --calibration-images DIR"),
    (("--search-precision",), "add --variant fp16"),
    (("--variant", "fp16", "--fp16-keep", "Layer Norm"), "--fp16-keep takes ONNX op types"),
    (("--variant", "int8", "--calibration-images", "/nonexistent"), "--calibration-images /nonexistent: no such folder"),
])
def test_bad_variant_options_are_one_line_usage_errors(capsys, tmp_path, args, message):
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), *args)
    assert code == 2 and message in one_line_error(err)


def test_a_kill_while_a_variant_is_added_leaves_the_previous_or_the_new_artifact_whole(tiny_copy, variants_root, tmp_path):
    """The killed process adds an int8 graph made beforehand, through add_variants' own staging and publishing
    (tests/helpers.py PUBLISH_VARIANT): the making before it imports torch and takes seconds per kill."""
    before = artifact.load(tiny_copy, TINY).manifest["files"]
    original = tmp_path / "original"
    shutil.copytree(tiny_copy / TINY, original)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_FILESYSTEM)
    command = publisher(PUBLISH_VARIANT, tiny_copy, variants_root, TINY, "model.int8.onnx")
    outcomes = []
    for delay in (0.0, 0.1, 0.2, 0.4, 2.0):  # at the start of the (slowed) publish window, inside it, and after it
        kill_at(tiny_copy, delay, tmp_path / "site", command=command)
        files = artifact.load(tiny_copy, TINY).manifest["files"]  # verifies every file's sha256
        assert files == before or set(files) == set(before) | {"model.int8.onnx"}, delay
        outcomes.append("old" if files == before else "new")
        if files != before:
            shutil.rmtree(tiny_copy / TINY)
            shutil.copytree(original, tiny_copy / TINY)
    print("kill outcomes:", outcomes)
    assert "old" in outcomes and "new" in outcomes, outcomes  # the publish window was really crossed


def test_a_verify_set_streamed_from_disk_gives_the_figures_of_the_whole_arrays(variants_root, tmp_path):
    from exporter.precision import VerifySet

    art = artifact.load(variants_root, TINY)
    with np.load(art.path("sample.npz")) as sample:
        inputs, reference = sample["pixel_values"], {n: sample[n] for n in ("pooled", "tokens")}
    rng = np.random.default_rng(0)
    more = (inputs[:1] + rng.normal(0, 0.1, (20 - len(inputs), *inputs.shape[1:]))).astype(np.float32)  # 20 rows: 3 chunks of 8
    from vitparity.eager import eager_outputs, rebuild_model

    extra = eager_outputs(rebuild_model(art), more)
    whole = np.concatenate([inputs, more]), {n: np.concatenate([reference[n], extra[n]]) for n in reference}
    on_disk = VerifySet(inputs, reference, tmp_path)
    on_disk.append(more, extra, "calibration_images")
    assert len(on_disk) == 20 and len(list(on_disk.chunks())) == 3
    for graph in ("model.int8.onnx", "model.fp16.onnx"):
        passed_a, a = check_variant(art.path(graph), *whole, TOLERANCES["int8"])
        passed_b, b = check_variant(art.path(graph), on_disk, None, TOLERANCES["int8"])
        assert passed_a == passed_b and a["worst_output"] == b["worst_output"]
        for name in ("pooled", "tokens"):
            assert b["outputs"][name]["cosine"] == pytest.approx(a["outputs"][name]["cosine"], abs=1e-9)
            assert b["outputs"][name]["rel_error"] == pytest.approx(a["outputs"][name]["rel_error"], rel=1e-6)


def test_calibration_images_stream_memory_does_not_grow_with_their_count(variants_root, tmp_path):
    """Decoded images and their eager outputs go to disk a chunk at a time: 48 images peak like 16 do
    (numpy's allocations, as tracemalloc sees them), where stacking them grew with the count (3.4 GB for 2,500)."""
    import tracemalloc

    from exporter.precision import verify_inputs
    from tests.helpers import make_images
    from vitparity.eager import eager_outputs, rebuild_model

    art = artifact.load(variants_root, TINY)
    model = rebuild_model(art)
    with np.load(art.path("sample.npz")) as sample:
        inputs, reference = sample["pixel_values"], {n: sample[n] for n in ("pooled", "tokens")}
    peaks = {}
    for count in (16, 48):
        images = make_images(tmp_path / f"images{count}", count, extras=False)
        scratch = tmp_path / f"scratch{count}"
        scratch.mkdir()
        tracemalloc.start()
        found, described = verify_inputs(inputs, reference, lambda batch: eager_outputs(model, batch),
                                         art.manifest["data_config"], str(images), lambda message: None, scratch)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        held = described.get("held_out_images", 0)
        assert len(found) == len(inputs) + 2 * described["photos"] + count and described["calibration_images"] + held == count
        assert held == count // 4  # every 4th readable image is held out of the searches
    assert peaks[48] < 1.5 * peaks[16], peaks


def test_the_int8_search_leaves_the_outlier_module_in_float_and_every_entry_is_needed(outlier_weights, tmp_path, capsys):
    from exporter.variants import write_int8

    code, out, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--weights", str(outlier_weights),
                          "--variant", "int8")
    assert code == 0, err
    art = artifact.load(tmp_path, TINY)
    record = variants.precision_variants(art.manifest)["int8"]
    host = environment.cpu()
    assert record["verify"]["host"] == host  # the instruction set of the verifying host, recorded
    # 8-bit weights on every host: where u8s8 saturates (x86 without VNNI) the verifying session ran u8u8, recorded
    assert record["recipe"]["options"]["reduce_range"] is False
    assert record["verify"]["session_config"] == runtime.session_config(host)
    entries = record["search"]["keep_fp32"]
    trials = record["search"]["trials"]
    assert not trials[0]["passed"] and trials[0]["keep_fp32"] == [], "the plain recipe failed first"
    assert f"blocks.{OUTLIER_BLOCK}.mlp.fc2" in entries, entries
    assert record["recipe"]["keep_float"]["entries"] == entries and "must stay in float in the int8 graph" in out
    graph = onnx.load(str(art.path("model.onnx"))).graph
    module = {n.name: variants.module_of(n) for n in graph.node if n.op_type in variants.INT8_OPS}
    inputs = verify_set(art, tmp_path, searched=True)

    def passes(kept):
        names = sorted(name for name, found in module.items() if found in kept)
        write_int8(art.path("model.onnx"), tmp_path / "trial.onnx", exclude=names,
                   reduce_range=record["recipe"]["options"]["reduce_range"])
        return check_variant(tmp_path / "trial.onnx", inputs, None, aim(record))[0]

    assert passes(set(entries))
    for entry in entries:
        assert not passes(set(entries) - {entry}), f"{entry} is not needed"


def test_the_fused_graph_is_verified_and_hashed_like_any_variant_and_int8_is_made_from_it(artifacts_root, tmp_path, capsys):
    shutil.copytree(artifacts_root / TINY, tmp_path / TINY)
    code, out, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--if-missing",
                          "--variant", "int8-fused", "--variant", "fused")  # the order given does not matter
    assert code == 0, err
    art = artifact.load(tmp_path, TINY)  # every hash checked
    found = variants.precision_variants(art.manifest)
    fused, int8 = found["fused"], found["int8-fused"]
    assert fused["class"] == "same-host" and fused["recipe"]["call"] == "optimize_model"
    assert fused["recipe"]["fused"].get("BiasGelu", 0) > 0
    assert fused["verify"]["cosine"] >= TOLERANCES["same-host"].min_cosine
    ops = Counter(n.op_type for n in onnx.load(str(art.path("model.fused.onnx"))).graph.node)
    assert ops["BiasGelu"] == fused["recipe"]["fused"]["BiasGelu"]
    # no SkipLayerNormalization (variants.FUSED_WITHOUT: slower on the CPU than the LayerNorm and Add it replaces),
    # and the recipe says so
    source = Counter(n.op_type for n in onnx.load(str(art.path("model.onnx"))).graph.node)
    assert ops["SkipLayerNormalization"] == fused["recipe"]["fused"].get("SkipLayerNormalization", 0) == 0
    assert ops["LayerNormalization"] == source["LayerNormalization"] > 0
    assert fused["recipe"]["options"]["enable_skip_layer_norm"] is False
    # every block's attention is one MultiHeadAttention (exporter/attention.py): none is left as Softmax and MatMuls
    import timm

    depth = len(timm.create_model(TINY, pretrained=False).blocks)
    assert ops["MultiHeadAttention"] == fused["recipe"]["fused"]["MultiHeadAttention"] == depth and ops["Softmax"] == 0
    int8_ops = Counter(n.op_type for n in onnx.load(str(art.path("model.int8-fused.onnx"))).graph.node)
    assert int8_ops["MultiHeadAttention"] == depth
    assert int8["from"] == "model.fused.onnx" and int8["class"] == "int8"
    assert art.manifest["files"]["model.fused.onnx"]["sha256"] == artifact.sha256(art.path("model.fused.onnx"))


def test_int8_fused_without_the_fused_graph_is_one_line(artifacts_root, tmp_path, capsys):
    shutil.copytree(artifacts_root / TINY, tmp_path / TINY)
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--if-missing", "--variant", "int8-fused")
    assert code == 2 and "add --variant fused too" in one_line_error(err.split("\n", 1)[1] if err.startswith(TINY) else err)


def test_fp16_is_made_from_the_layernorm_decomposed_graph_when_the_artifact_has_one(tmp_path, capsys):
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--weights", "random", "--decompose-layernorm",
                        "--variant", "fp16")
    assert code == 0, err
    art = artifact.load(tmp_path, TINY)
    record = variants.precision_variants(art.manifest)["fp16"]
    assert record["from"] == variants.LN_DECOMPOSED
    ops = Counter(n.op_type for n in onnx.load(str(art.path("model.fp16.onnx"))).graph.node)
    assert ops["LayerNormalization"] == 0 and ops["ReduceMean"] > 0  # the norms as primitives, kept fp32 by the rules


def test_a_search_started_from_another_graphs_list_only_removes_and_keeps_every_entry_needed():
    """int8-fused starts from what int8 needed (exporter/precision.py): the same modules. The search then only tries
    removals, so it takes about one trial per entry, and what it returns is still minimal; a start that does not pass
    here falls back to the search from scratch."""
    from exporter import keep_fp32

    nodes = [(f"n{b}{m}", f"blocks.{b}", f"blocks.{b}.{m}") for b in range(6) for m in ("qkv", "proj", "fc1", "fc2")]
    needed = {"blocks.1.fc2", "blocks.4.qkv"}
    names = {name: unit for name, _, unit in nodes}

    def judge(kept):
        return needed <= {names[n] for n in kept}, {"cosine": 1.0, "rel_error": 0.0, "worst_output": "pooled"}

    plain = keep_fp32.search(nodes, judge, label=lambda scope, unit: unit)
    start = ["blocks.1.fc2", "blocks.4.qkv", "blocks.2.fc1", "blocks.9.qkv"]  # one more, one this graph lacks
    started = keep_fp32.search(nodes, judge, label=lambda scope, unit: unit, start=start)
    assert set(plain["keep_fp32"]) == set(started["keep_fp32"]) == needed
    assert started["started_from"] == start[:3] and len(started["trials"]) < len(plain["trials"])
    wrong = keep_fp32.search(nodes, judge, label=lambda scope, unit: unit, start=["blocks.2.fc1"])
    assert set(wrong["keep_fp32"]) == needed and "started_from" not in wrong
