"""Beyond agreement on one batch: each backend against itself (--stability: run twice, and an item alone against
among companions), neighbour margins (how many rankings the error can flip), judged like every other row."""
from __future__ import annotations

import json

import numpy as np

from compare.cli import main
from tests.helpers import TINY, RestlessOrtCpu, call
from vitparity import metrics


def test_dynamic_int8_depends_on_its_companions_and_the_fp32_graph_does_not(variants_root, tmp_path, capsys):
    code, out, err = call(main, capsys, TINY, "--artifacts", str(variants_root), "--backends", "ort-cpu",
                          "--reference", "ort-cpu", "--variants", "int8", "--stability", "--no-latency",
                          "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    rows = {(r["backend"], r["check"]): r for r in json.loads((tmp_path / "r.json").read_text())["reports"][0]["stability"]}
    assert set(rows) == {(b, c) for b in ("ort-cpu", "ort-cpu:int8") for c in ("repeat", "batch")}
    # Derived from the graphs, not the host: onnxruntime's fp32 MatMul computes each row on its own, so what its
    # companions hold cannot change an item; DynamicQuantizeLinear takes one scale over the whole batch, so it must.
    import onnx

    graph = onnx.load(str(variants_root / TINY / "model.int8.onnx"), load_external_data=False)
    assert any(n.op_type == "DynamicQuantizeLinear" for n in graph.graph.node)
    assert rows[("ort-cpu", "batch")]["companions_max_abs"] == 0.0
    assert rows[("ort-cpu:int8", "batch")]["companions_max_abs"] > 1e-4
    assert "ort-cpu:int8 depends on the other inputs of its batch" in out
    assert rows[("ort-cpu", "repeat")]["identical"] and rows[("ort-cpu:int8", "repeat")]["identical"]


def test_a_backend_that_is_not_deterministic_is_caught_and_fails(artifacts_root, tmp_path, capsys, monkeypatch):
    from compare.backends import BACKENDS

    monkeypatch.setitem(BACKENDS, RestlessOrtCpu.name, RestlessOrtCpu)
    code, out, _ = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends", f"ort-cpu,{RestlessOrtCpu.name}",
                        "--reference", "ort-cpu", "--input", "random", "--stability", "--no-latency", "--min-cosine", "0.9",
                        "--max-rel", "0.5", "--json", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    repeat = next(r for r in report["stability"] if r["backend"] == RestlessOrtCpu.name and r["check"] == "repeat")
    assert not repeat["identical"] and repeat["max_abs"] > 0 and "ort-restless is not deterministic" in out
    # Its accuracy rows pass under these loose thresholds; run twice it differs past them: the verdict fails on it.
    strict = next(r for r in report["stability"] if r["backend"] == "ort-cpu" and r["check"] == "repeat")
    assert strict["identical"] and strict["passed"]


def test_neighbour_margins_count_the_rankings_an_error_can_flip_on_a_known_near_tie():
    # Query 0's nearest (cos 0.90) and second nearest (0.8999) are a near tie; the other rows are far apart.
    angle = np.arccos([0.90, 0.8999, 0.2])
    reference = np.array([[1.0, 0, 0, 0], [np.cos(angle[0]), np.sin(angle[0]), 0, 0],
                          [np.cos(angle[1]), 0, np.sin(angle[1]), 0], [np.cos(angle[2]), 0, 0, np.sin(angle[2])]])
    exact = metrics.neighbour_margins(reference, reference, k=1)
    assert exact["flippable"] == 0 and exact["min_margin_query"] == 0
    assert abs(exact["min_margin"] - 1e-4) < 1e-9 and exact["min_margin_error"] == 0.0
    moved = reference.copy()
    moved[2] = reference[2] + 2e-3 * np.array([1, 0, 0, 0])  # query 0's second neighbour a little closer
    found = metrics.neighbour_margins(reference, moved, k=1)
    assert found["flippable"] >= 1 and found["min_margin_query"] == 0 and found["min_margin_error"] > 5e-5
    assert metrics.neighbours(reference, moved, 1)["nearest_unchanged"] < 1.0  # it did flip
    # A change smaller than half the gap cannot flip query 0.
    slight = reference.copy()
    slight[2] = reference[2] + 1e-6 * np.array([1, 0, 0, 0])
    assert metrics.neighbour_margins(reference, slight, k=1)["flippable"] == 0


def test_the_hunt_finds_a_planted_bad_image_and_its_written_file_reproduces_the_figure(artifacts_root, tmp_path, capsys,
                                                                                      monkeypatch):
    import shlex

    from PIL import Image

    from compare.backends import BACKENDS
    from tests.helpers import GlareOrtCpu, real_photos

    monkeypatch.setitem(BACKENDS, GlareOrtCpu.name, GlareOrtCpu)
    photos = real_photos(tmp_path / "photos", ("camera.png", "coffee.png"))
    Image.new("RGB", (200, 150), (235, 235, 228)).save(photos / "white-wall.png")  # the planted one
    code, out, _ = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends", f"ort-cpu,{GlareOrtCpu.name}",
                        "--reference", "ort-cpu", "--hunt", str(photos), "--hunt-out", str(tmp_path / "worst"),
                        "--no-latency", "--json", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    assert code == 1 and report["input"]["count"] == 3 * 7  # every image and its 6 variations
    worst = next(w for w in report["hunt"] if w["backend"] == GlareOrtCpu.name)
    assert worst["source"].endswith("white-wall.png") and not worst["passed"], worst
    assert (tmp_path / "worst" / f"worst-{TINY}-{GlareOrtCpu.name}.png").is_file() and worst["command"] in out
    # The written file, given with --image as the printed command says, gives the same figure.
    argv = shlex.split(worst["command"])[3:]
    code, _, _ = call(main, capsys, *argv, "--json", str(tmp_path / "again.json"))
    again = json.loads((tmp_path / "again.json").read_text())["reports"][0]
    row = next(r for r in again["accuracy"] if r["backend"] == GlareOrtCpu.name
               and (f"{r['output']}[{r['group']}]" if r["group"] else r["output"]) == worst["label"])
    assert code == 1 and abs(row["cosine"] - worst["cosine"]) < 1e-6, (row["cosine"], worst["cosine"])
