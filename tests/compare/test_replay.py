"""--replay: each block run on the reference's input to it, so that the error a block makes shows apart from the
error it is given; the block whose own error is largest opened part by part; and one line of what to try that,
applied, works. Faults are seeded in a device stand-in (tests/helpers.py FaultyCpu, LowPrecisionCpu)."""
from __future__ import annotations

import json
import shutil

import pytest

from compare.backends import BACKENDS
from compare.cli import main
from tests.helpers import TINY, FaultyCpu, FaultyQkv, LowPrecisionCpu, rewrite_weights


def _replay(capsys, tmp_path, model, root, *extra):
    code = main([model, "--artifacts", str(root), "--replay", "--no-latency", "--json", str(tmp_path / "r.json"),
                 "--report", str(tmp_path / "r.md"), *extra])
    out = capsys.readouterr().out
    return code, out, json.loads((tmp_path / "r.json").read_text())["reports"][0], (tmp_path / "r.md").read_text()


@pytest.fixture
def faulty(monkeypatch):
    monkeypatch.setitem(BACKENDS, FaultyCpu.name, FaultyCpu)
    monkeypatch.setitem(BACKENDS, FaultyQkv.name, FaultyQkv)

    def seed(block: int, part: str) -> None:
        monkeypatch.setenv("FAULT_BLOCK", str(block))
        monkeypatch.setenv("FAULT_PART", part)

    return seed


def test_dinov3_a_faulty_fc1_in_block_5_and_a_perturbed_register_token_are_each_named(dinov3_root, capsys, tmp_path,
                                                                                      faulty):
    """One dinov3 run, two findings. A faulty device whose block 5 fc1 is off: its own error is largest at block 5,
    and fc1 drifts first inside it. The eager register token scaled by 1.2 (so ort-cpu, running the exported graph,
    differs from torch-cpu in the registers only): the registers are the token group with the largest error, and
    the first to drift, at block 0."""
    root = tmp_path / "artifacts"
    shutil.copytree(dinov3_root / "dinov3", root / "dinov3")

    def perturb(state):
        state["reg_token"] = state["reg_token"] * 1.2

    rewrite_weights(root / "dinov3", perturb)
    faulty(5, "mlp.fc1")
    code, out, report, markdown = _replay(capsys, tmp_path, "dinov3", root, "--backends", f"torch-cpu,ort-cpu,{FaultyCpu.name}")
    assert code == 1
    _assert_fault_named(report, FaultyCpu.name, 5, "mlp.fc1", out, markdown)
    groups = {r["group"]: r for r in report["accuracy"] if r["backend"] == "ort-cpu" and r["output"] == "tokens" and r["group"]}
    assert set(groups) == {"cls", "registers", "patches"}
    assert max(groups, key=lambda g: groups[g]["rel_error"]) == "registers"
    assert all({"cosine", "rel_error", "max_abs", "nonfinite"} <= set(row) for row in groups.values())
    assert "tokens[registers]" in out
    assert "first token group to drift: registers at block 0" in report["drift"]["ort-cpu"]


def _assert_fault_named(report, backend, block, part, out, markdown):
    """The backend's own error is largest at the seeded block, carried (not made) after it; inside that block the
    seeded part drifts first; the drift line, the advice, the terminal and the report all name it."""
    rows = {r["layer"]: r for r in report["layers"] if r["backend"] == backend}
    local = {layer: row["local_rel_error"] for layer, row in rows.items() if row["local_rel_error"] is not None}
    assert max(local, key=local.get) == f"block_{block}", local
    after = [f"block_{i}" for i in range(block + 1, len(local))]
    # Made at the seeded block, carried after it: the blocks after it make no error of their own, yet their
    # accumulated error is the one they were given.
    assert all(rows[layer]["rel_error"] > 1e-3 and local[layer] < 1e-6 for layer in after), {k: rows[k] for k in after}
    parts = [p for p in report["parts"] if p["backend"] == backend]
    assert {p["layer"] for p in parts} == {f"block_{block}"}
    first = next(p for p in parts if not p["passed"])
    assert first["part"] == part and all(p["passed"] for p in parts[:parts.index(first)])
    line = report["drift"][backend]
    assert f"blocks.{block} makes the largest error of its own" in line and f"{part} drifts first" in line
    assert report["advice"][backend].startswith(f"blocks.{block}.{part} differs in true fp32")
    for text in (out, markdown):  # the terminal and the report say the same
        assert f"blocks.{block}" in text and part in text and "differs in true fp32" in text
    assert "### Inside the block" in markdown and "### What to try" in markdown


def test_fp16_overflow_in_one_mlp_names_it_and_the_advised_flag_passes(tiny_copy, capsys, tmp_path, monkeypatch):
    def inflate(state):  # finite in fp32, past fp16's 65504 inside block 2's MLP
        state["blocks.2.mlp.fc1.weight"] *= 3e4

    rewrite_weights(tiny_copy / TINY, inflate)
    monkeypatch.setitem(BACKENDS, LowPrecisionCpu.name, LowPrecisionCpu)
    backends = ("--backends", f"torch-cpu,{LowPrecisionCpu.name}")
    code, _, report, _ = _replay(capsys, tmp_path, TINY, tiny_copy, *backends, "--dtype", "fp16")
    assert code == 1
    rows = {r["layer"]: r for r in report["layers"]}
    assert rows["block_1"]["passed"] and rows["block_1"]["nonfinite"] == 0 and rows["block_2"]["nonfinite"] > 0
    assert report["drift"][LowPrecisionCpu.name].startswith(f"{LowPrecisionCpu.name}: drift starts at block 2")
    advice = report["advice"][LowPrecisionCpu.name]
    assert advice.startswith("blocks.2.mlp.fc1 overflows fp16") and "--dtype bf16" in advice
    first = next(p for p in report["parts"] if not p["passed"])
    assert (first["layer"], first["part"]) == ("block_2", "mlp.fc1") and first["nonfinite"] > 0
    code, _, report, _ = _replay(capsys, tmp_path, TINY, tiny_copy, *backends, "--dtype", "bf16")  # the advice, applied
    assert code == 0 and report["verdict"] == "PASS" and not report["advice"]
    # Judged by the bf16 class, and really run in bf16 (fp32 would agree to ~1e-7); test_verdict does fp16.
    assert {r["tolerance"] for r in report["accuracy"]} == {"bf16"}
    assert all(1e-4 < r["rel_error"] < r["max_rel"] for r in report["accuracy"])
    assert next(b for b in report["backends"] if b["name"] == LowPrecisionCpu.name)["details"]["dtype"] == "bfloat16"


def test_a_row_that_fails_only_at_batch_3_is_found_by_the_batch_sizes(artifacts_root, capsys, tmp_path, monkeypatch):
    from tests.helpers import WrongAtThree

    monkeypatch.setitem(BACKENDS, WrongAtThree.name, WrongAtThree)
    common = [TINY, "--artifacts", str(artifacts_root), "--backends", f"torch-cpu,{WrongAtThree.name}", "--iters", "1",
              "--warmup", "0", "--json", str(tmp_path / "r.json")]
    # Right at 1 and 2, wrong at 3; that sizes whose judgement does not differ make no row: test_judge's size rows.
    code = main([*common, "--batch-sizes", "1,2,3"])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    assert code == 1 and report["verdict"] == "FAIL"
    at_three = [r for r in report["accuracy"] if r["batch"] == 3]
    assert at_three and all(not r["passed"] and r["backend"] == WrongAtThree.name for r in at_three)
    assert {r["batch"] for r in report["accuracy"]} == {None, 3}  # batch 2 is right: no row
    assert all(r["passed"] for r in report["accuracy"] if r["batch"] is None)  # the accuracy batch (1) passes
    assert "pooled @ batch 3" in out


def test_onnxruntime_blocks_are_replayed_from_their_own_graph_and_a_variants(tiny_copy, variants_root, capsys, tmp_path,
                                                                            faulty):
    """The graph an onnxruntime row ran, cut at each block's token stream and run on the reference's input to
    it: with the eager weights of block 2 perturbed, the ort-cpu row makes its own error at block 2 only, and its
    parts (from the nodes' module scopes) name fc1; an int8 graph's blocks are cut at the boundaries of the graph
    it was made from. In the same run, two faulty devices (fc1 of block 4, qkv of block 3) are each named at
    their own fault, apart from ort-cpu's."""
    def perturb(state):
        state["blocks.2.mlp.fc1.weight"] *= 1.05

    rewrite_weights(tiny_copy / TINY, perturb)
    faulty(4, "mlp.fc1")
    code, out, report, markdown = _replay(capsys, tmp_path, TINY, tiny_copy, "--backends",
                                          f"torch-cpu,ort-cpu,{FaultyCpu.name},{FaultyQkv.name}")
    assert code == 1
    _assert_fault_named(report, FaultyCpu.name, 4, "mlp.fc1", out, markdown)
    first = next(p for p in report["parts"] if p["backend"] == FaultyQkv.name and not p["passed"])
    assert (first["layer"], first["part"]) == ("block_3", "attn.qkv")
    assert "inside it, attn.qkv drifts first" in report["drift"][FaultyQkv.name]
    assert report["drift"]["ort-cpu"].startswith("ort-cpu: drift starts at block 2 (cos") and "drift starts at block 2" in out
    passed = {r["layer"]: r["passed"] for r in report["layers"] if r["backend"] == "ort-cpu"}
    assert passed["block_1"] and not passed["block_2"]
    local = {r["layer"]: r["local_rel_error"] for r in report["layers"] if r["backend"] == "ort-cpu" and r["layer"] != "norm"}
    assert max(local, key=local.get) == "block_2" and all(v < 1e-4 for k, v in local.items() if k != "block_2"), local
    assert "blocks.2 makes the largest error of its own" in report["drift"]["ort-cpu"]
    # Inside block 2, from the graph's own node scopes: every part up to fc1 agrees; fc1 is the first to drift.
    parts = [p for p in report["parts"] if p["backend"] == "ort-cpu"]
    assert {p["layer"] for p in parts} == {"block_2"}
    order = [p["part"] for p in parts]
    assert {"norm1", "attn.qkv", "attn.softmax", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"} <= set(order), order
    assert order.index("norm1") < order.index("attn.qkv") < order.index("attn.softmax") < order.index("mlp.fc1")
    assert next(p["part"] for p in parts if not p["passed"]) == "mlp.fc1"
    assert all(p["passed"] for p in parts[:order.index("mlp.fc1")])
    assert "inside it, mlp.fc1 drifts first" in report["drift"]["ort-cpu"]
    code, _, report, _ = _replay(capsys, tmp_path, TINY, variants_root, "--backends", "torch-cpu,ort-cpu", "--variants", "int8")
    int8 = [r for r in report["layers"] if r["backend"] == "ort-cpu:int8" and r["layer"].startswith("block_")]
    assert int8 and all(r["local_rel_error"] is not None and r["local_rel_error"] < 0.05 for r in int8), int8
