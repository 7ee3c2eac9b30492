"""One judgement from export to verdict: the exporter judges every variant over the rows compare judges (each
output and each token group, per item), searches with a margin and verifies on photos it held out; a failing int8
row's advice is a command that, run as written, gives a graph whose row passes."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest

from compare import judge
from compare.cli import main as compare_main
from exporter.precision import HELD_OUT, SEARCHED, VerifySet, check_variant, publish_added, linked_stage
from tests.helpers import ROOT, TINY
from vitparity import artifact, judging, runtime
from vitparity.tolerances import TOLERANCES


def test_a_graph_whose_whole_outputs_pass_but_whose_cls_token_fails_fails_the_exporters_verify_as_compares(variants_root):
    """The int8 graph against outputs whose cls token alone was moved: the whole tokens (1 of 101 tokens moved) and
    pooled pass, tokens[cls] fails. The exporter's check names that row, and compare's rows judge it the same."""
    art = artifact.load(variants_root, TINY)
    with np.load(art.path("sample.npz")) as sample:
        inputs = sample["pixel_values"]
    got = dict(zip(("pooled", "tokens"), runtime.session(art.path("model.int8.onnx")).run(None, {"pixel_values": inputs})))
    want = {name: np.array(value) for name, value in got.items()}
    rng = np.random.default_rng(0)
    want["tokens"][:, 0] += rng.normal(0, 0.2, want["tokens"][:, 0].shape) * np.abs(want["tokens"][:, 0]).mean()
    layout = art.manifest["token_layout"]
    passed, figures = check_variant(art.path("model.int8.onnx"), inputs, want, TOLERANCES["int8"], layout)
    assert not passed and figures["worst_output"] == "tokens[cls]", figures
    assert figures["outputs"]["tokens"]["passed"] and figures["outputs"]["pooled"]["passed"]
    assert figures["margin"] < 0 and figures["outputs"]["tokens"]["margin"] > 0
    rows = {row.label: row.passed for row in judge.compare_outputs("ort-cpu:int8", got, want, TOLERANCES["int8"], layout)}
    assert rows == {label: found["passed"] for label, found in figures["outputs"].items()}


def test_the_margin_is_the_share_of_the_budget_left_and_a_search_aims_for_less():
    tolerance = TOLERANCES["int8"]  # cosine >= 0.999, rel <= 0.05
    assert judging.margin(tolerance, 1.0, 0.0) == 1.0
    assert judging.margin(tolerance, 0.9995, 0.01) == pytest.approx(0.5)  # the cosine uses half its budget
    assert judging.margin(tolerance, 0.9999, 0.04) == pytest.approx(0.2)  # the rel err uses 80%
    assert judging.margin(tolerance, 0.9985, 0.01) < 0
    assert judging.margin(tolerance, float("nan"), 0.01) == -np.inf
    aim = judging.with_margin(tolerance, 0.5)
    assert aim.min_cosine == pytest.approx(0.9995) and aim.max_rel == pytest.approx(0.025)


def test_every_variant_is_searched_on_some_photos_and_verified_on_others_too(variants_root):
    manifest = artifact.load(variants_root, TINY).manifest
    for record in manifest["variants"].values():
        if "verify" not in record or "class" not in record:
            continue
        verify = record["verify"]
        assert verify["inputs"]["held_out_photos"] == verify["inputs"]["photos"] > 0
        assert set(verify["searched_on"]) <= set(SEARCHED) and not set(verify["searched_on"]) & set(HELD_OUT)
        assert verify["held_out"]["cosine"] >= verify["thresholds"]["min_cosine"] and verify["margin"] >= 0
        # the rows compare judges: token groups included
        assert {"pooled", "tokens", "tokens[cls]", "tokens[patches]"} <= set(verify["outputs"])


def test_a_verify_set_views_its_rows_by_role(tmp_path):
    inputs = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
    outputs = {"pooled": inputs * 2, "tokens": inputs[:, None, :] * 3}
    found = VerifySet(inputs, outputs, tmp_path)
    found.append(inputs + 10, {k: v + 10 for k, v in outputs.items()}, "photos")
    found.append(inputs + 20, {k: v + 20 for k, v in outputs.items()}, "held_out_photos")
    assert found.counts() == {"sample": 2, "photos": 2, "held_out_photos": 2}
    held = found.only(*HELD_OUT)
    assert len(held) == 2 and next(held.chunks())[0].tolist() == (inputs + 20).tolist()
    searched = found.without(*HELD_OUT)
    rows = np.concatenate([batch for batch, _ in searched.chunks(3)])
    assert rows.tolist() == np.concatenate([inputs, inputs + 10]).tolist()


def test_a_failing_int8_row_names_its_block_and_group_and_its_advised_command_makes_it_pass(outlier_artifact, tmp_path):
    """An int8 graph made by the plain recipe (as an older exporter published it, called verified) on test_vit with an
    outlier channel in block 2's MLP: compare fails it; --replay names the block where it drifts, and advises an
    exporter command that keeps a module in float. That command, run as written (python as this interpreter: the
    one documented substitution), remakes the graph, and the row passes."""
    root, record = outlier_artifact
    run = lambda *extra: compare_main([TINY, "--artifacts", str(root), "--backends", "torch-cpu,ort-cpu", "--variants", "int8",  # noqa: E731
                                       "--no-latency", "--json", str(tmp_path / "r.json"), *extra])
    assert run("--replay") == 1
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    failing = [r for r in report["accuracy"] if r["backend"] == "ort-cpu:int8" and not r["passed"]]
    assert failing, report["accuracy"]
    line = report["drift"]["ort-cpu:int8"]
    assert "drift starts at block" in line and "no drift" not in line, line
    advice = report["advice"]["ort-cpu:int8"]
    command = shlex.split(advice.split(": ")[-1])
    assert command[:3] == ["python", "-m", "exporter"] and "--int8-keep" in command, advice
    done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    remade = artifact.load(root, TINY).manifest["variants"]["model.int8.onnx"]
    assert remade["recipe"]["keep_float"]["entries"] != record["recipe"]["keep_float"].get("entries", [])
    assert run() == 0
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    assert all(r["passed"] for r in report["accuracy"] if r["backend"] == "ort-cpu:int8")


@pytest.fixture
def outlier_artifact(outlier_weights, tmp_path):
    """test_vit with the outlier weights and a plain dynamic int8 graph published beside it with a record, as an
    exporter that judged only the whole outputs on the sample published one."""
    from exporter.cli import main as export_main
    from exporter.variants import write_int8

    root = tmp_path / "artifacts"
    assert export_main([TINY, "--artifacts", str(root), "--weights", str(outlier_weights)]) == 0
    art = artifact.load(root, TINY)
    with linked_stage(art, ["model.int8.onnx"]) as stage:
        recipe = write_int8(stage / "model.onnx", stage / "model.int8.onnx")
        record = {"variant": "int8", "class": "int8", "from": "model.onnx", "recipe": recipe,
                  "verify": {"cosine": 0.9991, "rel_error": 0.04, "worst_output": "pooled", "outputs": {}}}
        publish_added(art, stage, {"model.int8.onnx": record})
    return root, record
