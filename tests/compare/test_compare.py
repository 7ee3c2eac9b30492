"""The comparator end to end on real artifacts: tables, verdicts, exit codes, input handling."""
from __future__ import annotations

import json
import socket

import pytest

from compare.backends import BACKENDS
from compare.cli import main
from tests.helpers import TINY, has_row, runnable
from vitparity import artifact

FAST = ["--iters", "2", "--warmup", "0"]


def _main(capsys, *args):
    code = main([*args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_default_run(code, out, err, report, model, tokens):
    """What every default run (every backend this host has, latency on) shows."""
    assert code == 0, out + err
    assert "Accuracy against torch-cpu" in out and "Latency" in out
    assert has_row(out, "ort-cpu", "tokens")  # the default view: backend, output, cosine, rel err, verdict
    assert [1, *tokens] in [r["shape"] for r in report["accuracy"] if r["backend"] == "ort-cpu" and r["group"] == ""]
    assert "PASS" in out and "FAIL" not in out
    assert report["model"] == model and report["exit_code"] == 0 and report["verdict"] == "PASS"
    assert report["input"]["kind"] == "image" and report["input"]["source"].endswith("grace_hopper.jpg")
    # What runs depends on the host: every backend whose probe passes here (the accelerators on theirs).
    here = runnable()
    ran = {b["name"] for b in report["backends"] if b["status"] == "ran"}
    assert {"torch-cpu", "ort-cpu"} <= ran <= set(here)
    assert {(r["backend"], r["output"]) for r in report["accuracy"]} == {(b, o) for b in ran - {"torch-cpu"} for o in ("pooled", "tokens")}
    same_host = [r for r in report["accuracy"] if r["backend"] == "ort-cpu"]
    assert all(r["rel_error"] < 1e-4 for r in same_host)
    latency = {r["backend"]: r for r in report["latency"]}
    assert set(latency) == ran and latency["ort-cpu"]["iters"] == 2
    assert latency["torch-cpu"]["speedup"] == pytest.approx(1.0)
    skipped = {b["name"]: b["reason"] for b in report["backends"] if b["status"] == "skipped"}
    assert set(skipped) >= set(BACKENDS) - set(here)
    if "torch-npu" not in here:
        assert "torch_npu is not installed" in skipped["torch-npu"] and "not run: torch-npu: torch_npu is not installed" in out


def test_dinov2_compare_prints_both_tables_and_passes_in_a_100_column_terminal(dinov2_root, capsys, tmp_path, monkeypatch):
    from rich.console import Console

    # the terminal a person has: 100 columns (this CLI's own console factory, drawn at that width)
    monkeypatch.setattr("compare.cli.console", lambda stderr=False: Console(width=100, stderr=stderr, markup=False,
                                                                             log_path=False))
    code, out, err = _main(capsys, "dinov2", "--artifacts", str(dinov2_root), *FAST, "--json", str(tmp_path / "r.json"))
    _assert_default_run(code, out, err, json.loads((tmp_path / "r.json").read_text())["reports"][0], "dinov2", [1374, 384])
    # The default view fits: no line past 100 columns, no cut cell, no Python repr in a cell.
    assert max(len(line) for line in out.splitlines()) <= 100 and "…" not in out, out
    assert "{'" not in out and "['" not in out and "': " not in out, out  # a dict or a list printed as Python writes it


def test_dinov3_passes_at_every_block_and_its_saved_reference_passes_on_the_way_back(dinov3_root, capsys, tmp_path):
    """One default dinov3 run with --layers and --save-reference, then the saved file given back with --against."""
    saved = tmp_path / "dinov3.npz"
    code, out, err = _main(capsys, "dinov3", "--artifacts", str(dinov3_root), *FAST, "--layers", "--save-reference", str(saved),
                           "--json", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    _assert_default_run(code, out, err, report, "dinov3", [261, 384])
    rows = [r for r in report["layers"] if r["backend"] == "ort-cpu"]
    assert [r["layer"] for r in rows] == [f"block_{i}" for i in range(12)] + ["norm"]
    assert all(r["passed"] and r["cosine"] > 0.99999 for r in rows)
    assert report["drift"]["ort-cpu"].startswith("ort-cpu: no drift")
    assert has_row(out, "block_11") and "Per-block agreement" in out
    # blocks.onnx is cached next to the artifact and hashed in its manifest.
    art = artifact.load(dinov3_root, "dinov3")
    assert "blocks.onnx" in art.manifest["files"] and art.manifest["blocks"]["count"] == 12
    code, out, _ = _main(capsys, "dinov3", "--artifacts", str(dinov3_root), "--backends", "torch-cpu", "--no-latency",
                         "--against", str(saved), "--json", str(tmp_path / "back.json"))
    back = json.loads((tmp_path / "back.json").read_text())["reports"][0]
    host = socket.gethostname()
    assert code == 0 and f"ort-cpu@{host}" in out
    assert {f"ort-cpu@{host}", f"torch-cpu@{host}"} <= {r["backend"] for r in back["accuracy"] if r["passed"]}


def test_batch_sweep_random_input_and_another_reference(artifacts_root, capsys, tmp_path):
    code, out, _ = _main(capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu,ort-cpu",
                         "--reference", "ort-cpu", "--input", "random", "--seed", "3", "--batch-size", "2",
                         "--batch-sizes", "1,4", *FAST, "--json", str(tmp_path / "r.json"))
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    assert report["input"]["source"] == "seeded normal (seed 3)" and report["input"]["shape"][0] == 2
    # The reference runs first, whichever it is; the latency rows go by batch size, backends in run order.
    assert [(r["backend"], r["batch"]) for r in report["latency"]] == [
        ("ort-cpu", 1), ("torch-cpu", 1), ("ort-cpu", 4), ("torch-cpu", 4)]
    assert report["accuracy"] and all(r["worst_sample_cosine"] > 0.99999 for r in report["accuracy"])
    assert {r["backend"] for r in report["accuracy"]} == {"torch-cpu"} and report["reference"] == "ort-cpu"
    assert "Accuracy against ort-cpu" in out and has_row(out, "torch-cpu", "pooled")


def test_missing_image_and_non_image_are_clear_errors(artifacts_root, capsys, tmp_path):
    code, _, err = _main(capsys, TINY, "--artifacts", str(artifacts_root), "--image", str(tmp_path / "none.jpg"))
    assert code == 2 and "does not exist" in err
    (tmp_path / "fake.jpg").write_text("not a picture")
    code, _, err = _main(capsys, TINY, "--artifacts", str(artifacts_root), "--image", str(tmp_path / "fake.jpg"))
    assert code == 2 and "is not an image" in err and "Traceback" not in err


def test_missing_artifact_says_how_to_make_it(tmp_path, capsys):
    code, _, err = _main(capsys, "dinov3", "--artifacts", str(tmp_path))
    assert code == 2
    assert "no artifact for dinov3 under" in err and "run make export MODEL=dinov3" in err


def test_require_npu_without_one_exits_2(artifacts_root, capsys):
    code, _, err = _main(capsys, TINY, "--artifacts", str(artifacts_root), "--require", "torch-npu", *FAST)
    if runnable("torch-npu"):  # an Ascend host: the requirement is met
        assert code == 0, err
    else:
        assert code == 2 and "required backend torch-npu is unavailable" in err


def test_unknown_backend_exits_2(artifacts_root, capsys):
    code, _, err = _main(capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "torch-tpu")
    assert code == 2 and "backend 'torch-tpu' is not known" in err


def test_version_drift_since_export_is_warned(artifacts_root):
    from compare.run import version_warnings
    from vitparity import environment

    manifest = json.loads((artifacts_root / TINY / "manifest.json").read_text())
    assert version_warnings(manifest) == []  # exported here, read here
    here = environment.versions()["torch"]
    manifest["versions"]["torch"] = "1.0.0"
    assert version_warnings(manifest) == [f"torch is {here} here but the artifact was exported with 1.0.0"]
    manifest["versions"]["torch"] = here.split("+")[0] + "+cu130"  # another build of the same version: not drift
    assert version_warnings(manifest) == []


def _graph_that_fails_at_run(path, ir_version):
    """A graph with the artifact's input and outputs that onnxruntime cannot run: 76800 values per
    image do not reshape into rows of 7x13. An IR version newer than onnxruntime knows fails at load."""
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [-1, 7, 13])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["pixel_values", "shape"], ["tokens"]),
         helper.make_node("ReduceMean", ["tokens"], ["pooled"], axes=[1], keepdims=0)],
        "broken",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 160, 160])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("tokens", TensorProto.FLOAT, None)],
        [shape],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir_version), str(path))


@pytest.mark.parametrize("ir_version,stage", [(8, "failed while running"), (99, "failed to load the artifact")])
def test_a_backend_that_fails_on_the_artifact_is_an_error_row_and_exit_1(tiny_copy, capsys, tmp_path, ir_version, stage):
    from vitparity.artifact import sha256

    folder = tiny_copy / TINY
    _graph_that_fails_at_run(folder / "model.onnx", ir_version)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": sha256(folder / "model.onnx"), "bytes": (folder / "model.onnx").stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = _main(capsys, TINY, "--artifacts", str(tiny_copy), "--backends", "torch-cpu,ort-cpu", *FAST,
                           "--json", str(tmp_path / "r.json"))
    assert code == 1, err
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    status = next(b for b in report["backends"] if b["name"] == "ort-cpu")
    assert status["status"] == "error" and status["reason"].startswith(stage)
    assert [r["backend"] for r in report["latency"]] == ["torch-cpu"]
    assert "ort-cpu disagree" in out and "Traceback" not in err


def test_seed_without_random_input_is_a_usage_error(artifacts_root, capsys):
    code, _, err = _main(capsys, TINY, "--artifacts", str(artifacts_root), "--seed", "3")
    assert code == 2 and "--seed applies to --input random" in err
