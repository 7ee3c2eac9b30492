"""One graph for every input size (--dynamic-size): verified at the native, a smaller, a larger and a non-square size
with its variants; compared at any size with the token groups recomputed; its position-embedding resample checked on
its own, so that a Resize written with other attributes than eager's is named; sizes it cannot take are one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from compare.cli import main as compare_main
from exporter.cli import main as export_main
from tests.helpers import TINY, TINY_INT8_KEEP, call, one_line_error, shared
from vitparity import artifact, resample, sizes
from vitparity.eager import rebuild_model


@pytest.fixture(scope="session")
def dynamic_root(tmp_path_factory, worker_id):
    """test_vit exported once with --dynamic-size and its int8 variant (learned position table: bicubic, antialiased)."""
    def make(root):
        assert export_main([TINY, "--weights", "random", "--artifacts", str(root), "--dynamic-size", "--variant", "int8",
                            "--int8-keep", TINY_INT8_KEEP, "--verify-size", "64"]) == 0

    return shared(tmp_path_factory, worker_id, "dynamic", make)


def test_a_dynamic_graph_is_verified_at_four_sizes_and_more_and_its_variant_at_each(dynamic_root):
    manifest = artifact.load(dynamic_root, TINY).manifest
    record = manifest["sizes"]
    assert record["dynamic"] and record["patch"] == [16, 16] and record["native"] == [160, 160]
    # native, half, 1.25x and a narrower one, rounded to the patch; then the one asked for
    assert [tuple(s) for s in record["verified"]] == [(160, 160), (80, 80), (192, 192), (160, 128), (64, 64)]
    graph = onnx.load(str(dynamic_root / TINY / "model.onnx"), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) and d for d in (dims[0], dims[2], dims[3])), dims
    for label, check in record["checks"].items():
        assert check["resample"]["passed"] and check["resample"]["max_abs"] < 1e-6, (label, check)
        assert label == "160x160" or check["cosine"] > 0.99999
    int8 = manifest["variants"]["model.int8.onnx"]["verify"]["sizes"]
    assert set(int8) == {"80x80", "192x192", "160x128", "64x64"} and all(v["cosine"] > 0.999 for v in int8.values())


def test_compare_runs_every_backend_at_a_non_square_size_with_the_token_groups_of_that_grid(dynamic_root, tmp_path, capsys,
                                                                                          monkeypatch):
    from rich.console import Console

    monkeypatch.setattr("compare.cli.console", lambda stderr=False: Console(width=100, stderr=stderr, markup=False,
                                                                          log_path=False))
    code, out, err = call(compare_main, capsys, TINY, "--artifacts", str(dynamic_root), "--size", "96x144,160",
                          "--backends", "torch-cpu,ort-cpu", "--no-latency", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    first, native = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert first["size"] == "96x144" and first["input"]["shape"] == [1, 3, 96, 144] and native["size"] == ""
    assert "test_vit at 96x144: PASS" in out and "test_vit: PASS" in out
    rows = {(r["backend"], r["output"], r["group"]) for r in first["accuracy"]}
    assert {("ort-cpu:int8", "tokens", "patches"), ("ort-cpu", "tokens", "cls")} <= rows
    # 1 cls token, then a 6x9 grid of patches
    assert next(r for r in first["accuracy"] if r["group"] == "patches")["shape"] == [1, 54, 64]
    assert first["resample"]["passed"] and "Resize (mode cubic, a -0.5, antialias 1" in out
    # where each onnxruntime row ran the graph's Resize, from its profile
    assert first["resample"]["resize_ran_on"] == {"ort-cpu": ["CPU"], "ort-cpu:int8": ["CPU"]}
    assert max(len(line) for line in out.splitlines()) <= 100 and "…" not in out, out


def test_a_resample_written_without_antialias_is_caught_and_named(dynamic_root, tmp_path, capsys):
    root = tmp_path / "artifacts"
    shutil.copytree(dynamic_root / TINY, root / TINY)
    path = root / TINY / "model.onnx"
    graph = onnx.load(str(path))
    [node] = [n for n in graph.graph.node if n.op_type == "Resize"]
    for attribute in node.attribute:  # what a exporter without antialias writes: plain bicubic
        if attribute.name == "antialias":
            attribute.i = 0
        if attribute.name == "cubic_coeff_a":
            attribute.f = -0.75
    onnx.save(graph, str(path))
    model = rebuild_model(artifact.Artifact(root / TINY, artifact.read_manifest(root / TINY)))
    found = resample.check(model, path, (80, 80), tmp_path)
    assert not found["passed"] and "antialias 0" in found["reason"] and "a -0.75" in found["reason"]
    assert resample.check(model, dynamic_root / TINY / "model.onnx", (80, 80), tmp_path)["passed"]
    # The same graph through compare (its hash re-recorded, as a user's own edited graph would be): the resample is
    # the failing row, named, and the verdict fails.
    manifest = artifact.read_manifest(root / TINY)
    manifest["files"]["model.onnx"] = {"sha256": artifact.sha256(path), "bytes": path.stat().st_size}
    (root / TINY / artifact.MANIFEST).write_text(json.dumps(manifest))
    code, out, _ = call(compare_main, capsys, TINY, "--artifacts", str(root), "--size", "80", "--backends",
                        "torch-cpu,ort-cpu", "--variants", "none", "--no-latency")
    assert code == 1 and "position-embedding resample: FAIL" in out and "antialias 0" in out


@pytest.mark.parametrize("size,message", [
    ("100", "multiples of its 16x16 patch; e.g. 96x96"),
    ("12x", "write a size as H or HxW"),
])
def test_a_size_the_graph_cannot_take_is_one_line(dynamic_root, capsys, size, message):
    code, _, err = call(compare_main, capsys, TINY, "--artifacts", str(dynamic_root), "--size", size, "--no-latency")
    assert code == 2 and message in one_line_error(err)


def test_a_fixed_size_artifact_says_how_to_get_one_for_every_size(artifacts_root, capsys):
    code, _, err = call(compare_main, capsys, TINY, "--artifacts", str(artifacts_root), "--size", "80", "--no-latency")
    line = one_line_error(err)
    assert code == 2 and "takes 160x160 only" in line and f"python -m exporter {TINY} --dynamic-size" in line
    assert sizes.check(artifact.load(artifacts_root, TINY).manifest, (160, 160)) == (160, 160)


def test_the_layout_at_a_size_keeps_the_prefix_tokens_and_recomputes_the_grid():
    layout = {"cls": 1, "registers": 4, "patches": 1369, "grid": [37, 37]}
    assert sizes.layout_at(layout, (518, 392), (14, 14)) == {"cls": 1, "registers": 4, "patches": 37 * 28, "grid": [37, 28]}
    assert sizes.checked_sizes((518, 518), (14, 14), [(224, 224)]) == [(518, 518), (252, 252), (644, 644), (518, 392), (224, 224)]
    assert np.prod(sizes.parse("518x392")) == 518 * 392 and sizes.parse(" 448 ") == (448, 448)
