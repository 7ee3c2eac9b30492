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
