"""Variant rows: each reduced-precision graph of an artifact runs on every onnxruntime backend, judged by its class."""
from __future__ import annotations

import json
import shutil

import pytest

from compare.plan import CompareOptions, check_names, rows
from compare.run import compare, host_warnings
from tests.helpers import TINY, runnable
from vitparity import artifact, environment, runtime
from vitparity.errors import UserError


def test_each_variant_is_a_row_of_every_onnxruntime_backend_with_its_class_latency_and_layers(variants_root):
    here = runnable("ort-cpu", "ort-cuda", "ort-cann")  # the onnxruntime backends this host has
    options = CompareOptions(artifacts=str(variants_root), backends=("torch-cpu", *here), iters=2, warmup=0, layers=True)
    report, _ = compare(TINY, options)
    ran = {s.name: s for s in report.backends if s.status == "ran"}
    expected = {f"{b}:{v}" for b in ran if b.startswith("ort-") and ":" not in b for v in ("int8", "fp16")}
    assert "ort-cpu:int8" in expected and expected <= set(ran)
    assert ran["ort-cpu:int8"].details["graph"] == "model.int8.onnx" and ran["ort-cpu:fp16"].details["variant_class"] == "fp16"
    classes = {r.backend: r.tolerance for r in report.accuracy}
    assert all(classes[name] == name.rsplit(":", 1)[1] for name in expected)
    assert classes["ort-cpu"] == "same-host fp32"
    timed = {r.backend: r for r in report.latency}
    assert all(timed[name].graph_speedup is not None for name in expected) and timed["ort-cpu"].graph_speedup is None
    assert {r.backend for r in report.layers} >= expected  # per-block drift of the variant graphs too
    assert report.verdict.status == "PASS", report.verdict
    # Verified here, run here: the same int8 features, so no warning; the CPU's features are in the environment.
    assert not any("int8 numerics" in w for w in report.warnings), report.warnings
    assert report.versions["cpu"] == environment.cpu()["model"] and "cpu int8 features" in report.versions
    written = json.loads(json.dumps(report.to_dict()))  # what --json writes: the same rows and the same verdict
    assert written["verdict"] == "PASS" and written["exit_code"] == 0
    assert {r["backend"] for r in written["accuracy"] if r["tolerance"] in ("int8", "fp16")} == expected


def test_the_variants_option_picks_rows_and_names_a_missing_variant(variants_root):
    manifest = artifact.load(variants_root, TINY).manifest
    base = CompareOptions(backends=("torch-cpu", "ort-cpu", "torch-npu"))
    assert rows(base, manifest) == ["torch-cpu", "ort-cpu", "ort-cpu:int8", "ort-cpu:fp16", "torch-npu"]
    assert rows(CompareOptions(backends=base.backends, variants=()), manifest) == ["torch-cpu", "ort-cpu", "torch-npu"]
    assert rows(CompareOptions(backends=base.backends, variants=("fp16",)), manifest)[2:4] == ["ort-cpu:fp16", "torch-npu"]
    with pytest.raises(UserError, match="has no int8-qdq variant; add it with make export MODEL=test_vit ARGS='--if-missing --variant int8-qdq'"):
        rows(CompareOptions(backends=base.backends, variants=("int8-qdq",)), manifest)
    for bad in ("torch-cpu:int8", "ort-cpu:int9"):
        with pytest.raises(UserError, match="variants .* run on the onnxruntime backends only"):
            check_names(CompareOptions(backends=(bad,)))


def test_an_int8_row_says_when_this_host_has_other_int8_features_than_the_verifying_one(variants_root, tmp_path):
    # Verified on an ARM CPU (other int8 kernels): the row says so. Between two x86 hosts dynamic int8 is summed
    # exactly on both, VNNI or not, and gets no warning (the next test).
    shutil.copytree(variants_root / TINY, tmp_path / TINY)
    manifest_path = tmp_path / TINY / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    here = environment.cpu()
    other = ["asimddp"] if here["int8_features"] != ["asimddp"] else ["asimddp", "i8mm"]
    manifest["variants"]["model.int8.onnx"]["verify"]["host"] = {"model": "Some Other CPU", "machine": "aarch64",
                                                                 "int8_features": other}
    manifest_path.write_text(json.dumps(manifest))
    report, _ = compare(TINY, CompareOptions(artifacts=str(tmp_path), backends=("torch-cpu", "ort-cpu"), variants=("int8",),
                                             latency=False))
    [warning] = [w for w in report.warnings if "int8 numerics" in w]
    assert warning.startswith("ort-cpu:int8: verified on Some Other CPU") and here["model"] in warning
    # The config the int8 row ran with here is in the environment: u8u8 where u8s8 saturates, nothing elsewhere.
    config = runtime.session_config()
    assert report.versions.get("onnxruntime session config") == (f"{runtime.X64_PRECISION}=1" if config else None)


def test_host_warnings_name_unrecorded_and_differing_hosts_only():
    def manifest(host):
        verify = {"host": host} if host is not None else {}
        return {"files": {"model.int8.onnx": {}}, "variants": {"model.int8.onnx": {"variant": "int8", "verify": verify}}}

    here = {"model": "CPU A", "machine": "x86_64", "int8_features": ["avx2", "avx512_vnni"]}
    assert host_warnings(manifest({**here, "model": "CPU B"}), ["ort-cpu:int8"], here) == []
    [unrecorded] = host_warnings(manifest(None), ["ort-cpu:int8"], here)
    assert "not recorded" in unrecorded
    [differs] = host_warnings(manifest({"model": "CPU C", "int8_features": ["avx2"]}), ["ort-cpu:int8"], here)
    assert "verified on CPU C (avx2), but this host's CPU A has avx2, avx512_vnni" in differs
    # Dynamic int8 between x86 hosts, VNNI or not: summed exactly on both (u8u8 where u8s8 saturates), no warning.
    # Calibrated int8 (s8 activations) or a non-x86 side keeps it.
    def recorded(call, host):
        found = manifest(host)
        found["variants"]["model.int8.onnx"]["recipe"] = {"call": call}
        return found

    avx2 = {"model": "CPU C", "machine": "x86_64", "int8_features": ["avx2"]}
    assert host_warnings(recorded("quantize_dynamic", avx2), ["ort-cpu:int8"], here) == []
    assert host_warnings(recorded("quantize_dynamic", avx2), ["ort-cpu:int8"], {**here, "int8_features": ["avx512f"]}) == []
    assert len(host_warnings(recorded("quantize_static", avx2), ["ort-cpu:int8"], here)) == 1
    assert len(host_warnings(recorded("quantize_dynamic", {**avx2, "machine": "aarch64"}), ["ort-cpu:int8"], here)) == 1
    assert len(host_warnings(recorded("quantize_dynamic", None), ["ort-cpu:int8"], here)) == 1  # not recorded
