"""What the environment module reads about this host: the CPU's int8 features from /proc/cpuinfo, as py-cpuinfo
would report them."""
from __future__ import annotations

import platform
from pathlib import Path

import pytest

from vitparity import environment

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480C
flags\t\t: fpu sse2 avx2 avx512f avx512vnni amx_int8

processor\t: 1
model name\t: another
flags\t\t: fpu
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd asimddp i8mm
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text,model,features", [
    (X86, "Intel(R) Xeon(R) Platinum 8480C", ["avx2", "avx512f", "avx512_vnni", "amx_int8"]),  # the first processor's
    (ARM, "", ["asimddp", "i8mm"]),
])
def test_the_int8_features_are_read_from_proc_cpuinfo_on_x86_and_arm(tmp_path, monkeypatch, text, model, features):
    (tmp_path / "cpuinfo").write_text(text)
    info = environment._proc_cpuinfo(str(tmp_path / "cpuinfo"))
    assert info["brand_raw"] == model
    monkeypatch.setattr(environment, "_proc_cpuinfo", lambda: info)
    environment.cpu.cache_clear()
    try:
        assert environment.cpu()["int8_features"] == features
    finally:
        environment.cpu.cache_clear()


def test_a_missing_or_flagless_cpuinfo_falls_back_to_py_cpuinfo(tmp_path):
    assert environment._proc_cpuinfo(str(tmp_path / "missing")) == {}
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: x\n")
    assert environment._proc_cpuinfo(str(tmp_path / "cpuinfo")) == {}


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo on this host")
def test_this_hosts_int8_features_are_among_those_py_cpuinfo_reports():
    """The kernel lists a feature only where the CPU has it (it may hide one the CPU has, e.g. clearcpuid), so what
    /proc/cpuinfo gives is a subset of what py-cpuinfo reads with CPUID; on this project's hosts, the same."""
    pytest.importorskip("cpuinfo")
    info = environment._py_cpuinfo()
    flags = {flag.lower().replace("_", "") for flag in info["flags"]}
    found = environment.cpu()["int8_features"]
    assert found is not None and set(found) <= {f for f in environment.INT8_FEATURES if f.replace("_", "") in flags}
    assert environment.cpu()["machine"] == platform.machine()


def test_a_distribution_without_top_level_txt_is_matched_by_the_files_its_record_lists(tmp_path, monkeypatch):
    # torch ships no top_level.txt: its RECORD (17,000 lines) is read as text, never as 17,000 path objects.
    info = tmp_path / "fake_provider-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-provider\nVersion: 1.0\n")
    (info / "RECORD").write_text("fakemod/__init__.py,sha256=x,1\nfakemod/core.py,sha256=y,2\nsingle.py,,\n"
                                 "fake_provider-1.0.dist-info/RECORD,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert environment._provides("fake-provider", "fakemod") and environment._provides("fake-provider", "single")
    assert not environment._provides("fake-provider", "fake") and not environment._provides("fake-provider", "core")
    assert not environment._provides("no-such-distribution", "fakemod")


AVX2_ONLY = {"model": "AMD EPYC 7B12", "machine": "x86_64", "int8_features": ["avx2"]}


def test_u8s8_saturates_on_x86_without_vnni_only():
    assert environment.u8s8_saturates(AVX2_ONLY) and environment.u8s8_saturates({**AVX2_ONLY, "int8_features": ["avx512f"]})
    assert not environment.u8s8_saturates({**AVX2_ONLY, "int8_features": ["avx2", "avx512_vnni"]})
    assert not environment.u8s8_saturates({**AVX2_ONLY, "int8_features": ["avx2", "avx_vnni"]})
    assert not environment.u8s8_saturates({**AVX2_ONLY, "machine": "aarch64", "int8_features": []})
    assert not environment.u8s8_saturates({**AVX2_ONLY, "int8_features": None})  # unknown: not assumed


def _saturating_matmul(folder: Path):
    """MatMulInteger of u8 255 by s8 127 (and -128): onnxruntime's u8s8 kernels without VNNI sum each pair of these
    products in 16 bits, 2 * 255 * 127 = 64770 > 32767, and saturate; the exact sums are 64 times 255 * 127."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.full((64, 8), 127, np.int8)
    weights[:, 1] = -128
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "saturating",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 8])],
                              [numpy_helper.from_array(weights, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(folder / "saturating.onnx"))
    a = np.full((4, 64), 255, np.uint8)
    return folder / "saturating.onnx", a, a.astype(np.int64) @ weights.astype(np.int64)


def test_every_session_sums_int8_products_exactly_and_takes_the_u8u8_mode_where_u8s8_saturates(tmp_path, monkeypatch):
    """Here, whatever this host has: runtime.session computes the saturating products exactly (on a host without
    VNNI only because it turns onnxruntime's U8U8 mode on). Then, with the CPU read as AVX2-only: the session has
    that mode, and onnxruntime acts on it, turning the s8 weights into u8 in the graph it runs."""
    import numpy as np
    import onnx

    from vitparity import runtime

    path, a, exact = _saturating_matmul(tmp_path)
    here = runtime.session(path)
    assert np.array_equal(here.run(None, {"a": a})[0], exact)
    assert bool(runtime.session_config()) == (platform.machine().lower() in ("x86_64", "amd64")
                                              and environment.u8s8_saturates(environment.cpu()))

    monkeypatch.setattr(environment, "cpu", lambda: AVX2_ONLY)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert runtime.session_config() == {}  # an AVX2 reading on another machine: nothing to turn on
        return
    assert runtime.session_config() == {runtime.X64_PRECISION: "1"}
    taken = runtime.session(path)
    assert taken.get_session_options().get_session_config_entry(runtime.X64_PRECISION) == "1"
    assert np.array_equal(taken.run(None, {"a": a})[0], exact)
    ort = runtime.load_onnxruntime()
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "as-run.onnx")
    options.log_severity_level = 3
    for key, value in runtime.session_config().items():
        options.add_session_config_entry(key, value)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    kinds = {i.name: i.data_type for i in onnx.load(str(tmp_path / "as-run.onnx")).graph.initializer}
    assert kinds and all(kind == onnx.TensorProto.UINT8 for kind in kinds.values()), kinds
