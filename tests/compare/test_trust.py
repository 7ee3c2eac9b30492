"""A device row is only as good as its proof: the provider really in use, where each node ran, and
the precision switches in force. Vendor libraries are stood in for where this host has no device."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from compare.backends.onnxruntime import OrtCann, OrtCpu
from compare.backends.profile import placement, placement_summary
from tests.helpers import (
    FAKE_TORCH_NPU,
    LYING_ONNXRUNTIME,
    NUMPY1_ONNXRUNTIME,
    ROOT,
    TINY,
    has_row,
    run_cli,
    stand_in,
)
from vitparity import artifact


def _lying(tmp_path, *providers):
    env = stand_in(tmp_path / "site", "onnxruntime", LYING_ONNXRUNTIME)
    env["STANDIN_PROVIDERS"] = json.dumps(list(providers))
    env["STANDIN_LOG"] = str(tmp_path / "sessions.jsonl")
    return env


def _sessions(tmp_path) -> list:
    return [json.loads(line) for line in (tmp_path / "sessions.jsonl").read_text().splitlines()]


def test_a_provider_that_falls_back_to_the_cpu_is_skipped_with_the_reason_never_passed(artifacts_root, tmp_path):
    env = _lying(tmp_path, "CUDAExecutionProvider")
    result = run_cli("compare", TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu,ort-cpu,ort-cuda",
                     "--no-latency", "--json", str(tmp_path / "r.json"), env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    status = {b["name"]: b for b in report["backends"]}
    assert status["ort-cuda"]["status"] == "skipped"
    assert "onnxruntime fell back to the CPU" in status["ort-cuda"]["reason"]
    assert "CUDAExecutionProvider" in status["ort-cuda"]["reason"]  # onnxruntime's own words are kept
    assert "ort-cuda" not in {r["backend"] for r in report["accuracy"]}
    assert "not run: ort-cuda: onnxruntime fell back to the CPU" in result.stdout
    # The session really was asked for CUDA first, with TF32 off: the fallback was onnxruntime's.
    assert ["CUDAExecutionProvider", {"use_tf32": "0"}] in [s[0] for s in _sessions(tmp_path)]


def test_require_a_provider_that_fell_back_exits_2(artifacts_root, tmp_path):
    env = _lying(tmp_path, "CANNExecutionProvider")
    result = run_cli("compare", TINY, "--artifacts", str(artifacts_root), "--backends", "ort-cpu,ort-cann", "--reference", "ort-cpu",
                     "--input", "random", "--require", "ort-cann", "--no-latency", env=env)
    assert result.returncode == 2
    assert "required backend ort-cann is unavailable: onnxruntime fell back to the CPU" in result.stderr
    assert "Traceback" not in result.stderr


PROVIDER_OPTIONS = '''
import json, sys
from compare.backends import BACKENDS, BackendUnavailable
from vitparity import artifact
art = artifact.load(sys.argv[1], sys.argv[2])
for name in ("ort-cann", "ort-cuda"):
    for precision in ("fp32", "fp16", "bf16", "fast-math"):
        try:
            BACKENDS[name]().load(art, precision)
        except BackendUnavailable as why:
            print(json.dumps([name, precision, str(why)[:40]]))
'''


def test_each_precision_reaches_the_execution_provider_as_its_own_switch(artifacts_root, tmp_path):
    env = _lying(tmp_path, "CANNExecutionProvider", "CUDAExecutionProvider")
    result = subprocess.run([sys.executable, "-c", PROVIDER_OPTIONS, str(artifacts_root), TINY], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    asked = [session[0] for session in _sessions(tmp_path)]
    fp32_cann = {"precision_mode": "must_keep_origin_dtype", "op_select_impl_mode": "high_precision"}
    assert asked == [
        ["CANNExecutionProvider", fp32_cann],
        ["CANNExecutionProvider", {"precision_mode": "force_fp16"}],
        ["CANNExecutionProvider", fp32_cann],  # no bf16 switch in the CANN provider: true fp32, judged as fp32
        ["CANNExecutionProvider", {}],  # fast-math: CANN's own default precision_mode
        ["CUDAExecutionProvider", {"use_tf32": "0"}],
        ["CUDAExecutionProvider", {"use_tf32": "0"}],  # an fp32 graph: no fp16 switch on CUDA
        ["CUDAExecutionProvider", {"use_tf32": "0"}],
        ["CUDAExecutionProvider", {}],  # fast-math: TF32 as shipped (use_tf32=1)
    ]
    assert all("fell back to the CPU" in line for line in result.stdout.splitlines())


TORCH_NPU_SWITCHES = '''
import json
from compare.backends.torch_npu import TorchNpu
npu = TorchNpu()
facts = npu.open_device()
shipped = npu.set_precision("fast-math")
print(json.dumps({"device_name": facts["device_name"], "fast-math": shipped, "fp32": npu.set_precision("fp32")}))
'''


def test_torch_npu_turns_hf32_off_for_fp32_and_leaves_the_shipped_defaults_for_fast_math(tmp_path):
    env = stand_in(tmp_path / "site", "torch_npu", FAKE_TORCH_NPU)
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    result = subprocess.run([sys.executable, "-c", TORCH_NPU_SWITCHES], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["device_name"] == "unknown Ascend NPU"  # get_device_name's AssertionError is caught
    assert found["fast-math"] == {"torch.npu.matmul.allow_hf32": False, "torch.npu.conv.allow_hf32": True}
    assert found["fp32"] == {"torch.npu.matmul.allow_hf32": False, "torch.npu.conv.allow_hf32": False}


def test_torch_cuda_turns_tf32_off_for_fp32():
    import torch

    from compare.backends.torch_cuda import TorchCuda

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert set(TorchCuda().set_precision("fast-math").values()) == {True}
        assert set(TorchCuda().set_precision("fp32").values()) == {False}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_a_broken_onnxruntime_skips_the_ort_rows_with_the_fix_and_torch_still_runs(artifacts_root, tmp_path):
    env = stand_in(tmp_path / "site", "onnxruntime", NUMPY1_ONNXRUNTIME)
    result = run_cli("compare", TINY, "--artifacts", str(artifacts_root), "--no-latency", "--json", str(tmp_path / "r.json"), env=env)
    # Only the reference could run here, so nothing was compared: no PASS, exit 2, after the tables and JSON.
    assert result.returncode == 2 and "nothing was compared against torch-cpu" in result.stderr
    assert "Traceback" not in result.stderr and "NumPy 1.x cannot be run" not in result.stderr + result.stdout
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    status = {b["name"]: b for b in report["backends"]}
    assert status["torch-cpu"]["status"] == "ran"
    # A command that runs one torch worker starts it fresh: a warm-start server would cost the same import, and more.
    assert status["torch-cpu"]["details"]["started"] == "fresh"
    for name in ("ort-cpu", "ort-cann", "ort-cuda"):
        assert status[name]["status"] == "skipped" and "built for NumPy 1.x" in status[name]["reason"]
        assert "pip install 'numpy<2'" in status[name]["reason"]


def test_placement_counts_every_node_of_a_real_profile_by_provider(artifacts_root, tmp_path):
    import onnxruntime as ort

    art = artifact.load(artifacts_root, TINY)
    backend = OrtCpu()
    backend.load(art, "fp32")
    backend.run(np.load(art.path("sample.npz"))["pixel_values"])
    where = backend.observed()["placement"]
    # The optimised graph onnxruntime ran has exactly the nodes the profile counts.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(art.path("model.onnx")), options, providers=["CPUExecutionProvider"])
    import onnx

    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert list(where) == ["CPUExecutionProvider"]
    assert sum(where["CPUExecutionProvider"].values()) == len(optimized.graph.node)
    assert backend.observed()["placement_summary"] == f"CPU {len(optimized.graph.node)}"


def test_placement_summary_names_what_fell_back_to_the_cpu():
    profile = [{"cat": "Node", "name": f"n{i}_kernel_time", "args": {"op_name": op, "provider": provider}}
               for i, (op, provider) in enumerate([("fused", "CANNExecutionProvider")] * 26 + [("LayerNormalization", "CPUExecutionProvider")] * 25)]
    profile.append({"cat": "Node", "name": "n0_fence_before", "args": {"op_name": "fused"}})
    assert placement_summary(placement(profile), "CANNExecutionProvider") == "CANN 26 / CPU 25: LayerNormalization x25"


def test_layernorm_decomposed_variant_is_verified_hashed_and_picked_by_ort_cann(decomposed_root):
    import onnx
    import onnxruntime as ort

    art = artifact.load(decomposed_root, TINY)  # every file's hash checks out, the variant's included
    variant = art.path("model.ln-decomposed.onnx")
    assert "model.ln-decomposed.onnx" in art.manifest["files"]
    assert art.manifest["variants"]["model.ln-decomposed.onnx"]["layernorms_decomposed"] > 0
    ops = {node.op_type for node in onnx.load(str(variant)).graph.node}
    assert "LayerNormalization" not in ops and {"ReduceMean", "Sqrt", "Div"} <= ops
    # With every graph optimisation off, onnxruntime cannot fuse the LayerNorms back: the primitive ops
    # themselves reproduce the eager outputs.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sample = np.load(art.path("sample.npz"))
    got = ort.InferenceSession(str(variant), options, providers=["CPUExecutionProvider"]).run(None, {"pixel_values": sample["pixel_values"]})
    assert np.abs(got[1] - sample["tokens"]).max() < 1e-4
    assert OrtCann().model_file(art) == variant


@pytest.mark.parametrize("flags,message", [
    (("--fast-math", "--dtype", "fp16"), "does not combine with --dtype fp16"),
    (("--timeout", "0"), "--timeout must be a positive number"),
])
def test_precision_and_timeout_flags_are_checked(artifacts_root, flags, message):
    result = run_cli("compare", TINY, "--artifacts", str(artifacts_root), *flags)
    assert result.returncode == 2 and message in result.stderr
