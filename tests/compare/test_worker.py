"""The worker boundary: each backend in its own process; a crash or a hang is that backend's error row.

The misbehaving backends are onnxruntime rows against an ort-cpu reference on a seeded input
(tests/helpers.py ORT_ONLY): what is tested is the process boundary, and no worker imports torch. The torch-cpu
workers that are warm-started (forked from a server that imported torch and timm: vitparity/warm.py) are tested
at the same boundary, with torch stand-ins that crash and hang."""
from __future__ import annotations

import json

import numpy as np
import pytest

from compare.backends import BACKENDS
from compare.backends.torch_cpu import TorchCpu
from compare.cli import main
from tests.helpers import TINY, Hangs, HangsEager, ReportsCwd, Segfaults, SegfaultsEager, gone
from vitparity import warm


def _run(capsys, monkeypatch, tmp_path, root, ort_only, *backends, extra=()):
    for cls in backends:
        monkeypatch.setitem(BACKENDS, cls.name, cls)
    ort_only[1] += "".join(f",{cls.name}" for cls in backends)
    code = main([TINY, "--artifacts", str(root), *ort_only, "--iters", "2", "--warmup", "0",
                 "--json", str(tmp_path / "r.json"), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, json.loads((tmp_path / "r.json").read_text())["reports"][0]


def test_a_worker_killed_by_sigsegv_is_an_error_row_and_the_rest_of_the_report_is_intact(artifacts_root, capsys, monkeypatch,
                                                                                        tmp_path, ort_only):
    code, out, err, report = _run(capsys, monkeypatch, tmp_path, artifacts_root, ort_only, Segfaults)
    assert code == 1 and "Traceback" not in err
    status = {b["name"]: b for b in report["backends"]}
    assert status["segfaults"]["status"] == "error"
    assert status["segfaults"]["reason"].startswith("worker killed by SIGSEGV")
    assert {(r["backend"], r["passed"]) for r in report["accuracy"]} == {("ort-cpu-2", True)}
    assert [r["backend"] for r in report["latency"]] == ["ort-cpu", "ort-cpu-2"]
    assert "worker killed by SIGSEGV" in out and "segfaults" in out


def test_a_worker_that_hangs_past_the_time_limit_is_stopped_and_reported(artifacts_root, capsys, monkeypatch, tmp_path, ort_only):
    code, out, _, report = _run(capsys, monkeypatch, tmp_path, artifacts_root, ort_only, Hangs, extra=("--timeout", "6"))
    assert code == 1
    status = {b["name"]: b for b in report["backends"]}
    assert status["hangs"]["status"] == "error" and status["hangs"]["reason"].startswith("no answer in 6 s")
    assert status["ort-cpu-2"]["status"] == "ran" and all(r["passed"] for r in report["accuracy"])


def test_workers_run_in_a_compile_cache_keyed_by_the_model_hash_and_precision(tiny_copy, capsys, monkeypatch, tmp_path, ort_only):
    code, _, _, report = _run(capsys, monkeypatch, tmp_path, tiny_copy, ort_only, ReportsCwd, extra=("--no-latency",))
    assert code == 0
    manifest = json.loads((tiny_copy / TINY / "manifest.json").read_text())
    cwd = next(b for b in report["backends"] if b["name"] == "reports-cwd")["details"]["cwd"]
    expected = (tiny_copy / TINY / ".compile-cache" / manifest["files"]["model.onnx"]["sha256"] / "fp32").resolve()
    assert cwd == str(expected)


def test_a_warm_started_torch_worker_that_crashes_or_hangs_is_an_error_row_and_is_gone(artifacts_root, capsys, monkeypatch,
                                                                                     tmp_path, ort_only):
    pid_file = tmp_path / "hangs.pid"
    monkeypatch.setenv("HANGS_PID_FILE", str(pid_file))
    code, out, _, report = _run(capsys, monkeypatch, tmp_path, artifacts_root, ort_only, TorchCpu, SegfaultsEager, HangsEager,
                                extra=("--timeout", "8", "--no-latency"))
    assert code == 1
    status = {b["name"]: b for b in report["backends"]}
    assert status["segfaults-eager"]["reason"].startswith("worker killed by SIGSEGV")
    assert status["hangs-eager"]["reason"].startswith("no answer in 8 s")
    assert gone(int(pid_file.read_text()), 10), "the hanging worker outlived its time limit"
    # Warm where this host allows it (Linux, no device runtime that `import torch` would load) and three torch workers
    # are planned, fresh otherwise; the onnxruntime workers are always fresh.
    assert status["torch-cpu"]["details"]["started"] == ("warm" if warm.enabled() else "fresh")
    assert {status[name]["details"]["started"] for name in ("ort-cpu", "ort-cpu-2")} == {"fresh"}
    assert status["torch-cpu"]["status"] == "ran" and all(r["passed"] for r in report["accuracy"])


@pytest.mark.parametrize("backend", ["torch-cpu", "ort-cpu"])
def test_a_warm_started_worker_computes_bit_for_bit_what_a_fresh_one_does(artifacts_root, capsys, monkeypatch, tmp_path,
                                                                         backend):
    """torch-cpu, and an onnxruntime reference that makes the input from the bundled photo (it imports torch and timm
    for timm's transform, so it is forked from the same server; onnxruntime is imported after the fork)."""
    saved, started = {}, {}
    # VIT_PARITY_WARM=0: every worker fresh. Warm: a process's first torch worker is fresh (a server pays off from the
    # second), so the warm figures are the second run's.
    for run, mode in enumerate(("1", "1", "0")):
        monkeypatch.setenv("VIT_PARITY_WARM", mode)
        code = main([TINY, "--artifacts", str(artifacts_root), "--backends", backend, "--reference", backend, "--no-latency",
                     "--save-reference", str(tmp_path / f"{run}.npz"), "--json", str(tmp_path / f"{run}.json")])
        capsys.readouterr()
        assert code == 0
        details = json.loads((tmp_path / f"{run}.json").read_text())["reports"][0]["backends"][0]["details"]
        started[mode] = details["started"]
        if mode == "1":
            expected = "warm" if warm.enabled() else "fresh"
        # A fork's peak memory is not a process's own (its server's imports touched the library pages): never
        # reported as one.
        assert ("peak_rss_mb" in details) == (details["started"] == "fresh") != ("peak_rss_mb_since_fork" in details)
        with np.load(tmp_path / f"{run}.npz") as arrays:
            saved[mode] = {key: arrays[key] for key in arrays.files if arrays[key].dtype.kind == "f"}
    assert started == {"1": expected, "0": "fresh"}
    assert saved["1"] and saved["1"].keys() == saved["0"].keys()
    for key, value in saved["1"].items():
        assert np.array_equal(value, saved["0"][key]), key


def test_only_cpu_workers_are_forked_and_a_device_backend_that_makes_the_input_starts_fresh():
    """The worker that makes the input imports torch and timm whatever its backend; forked from the server that has
    them only on the CPU: a device backend's worker starts fresh, its device runtime with it."""
    from compare.backends import BACKENDS
    from compare.launch import _warm_imports

    torch_and_timm = _warm_imports(TorchCpu)
    assert "torch" in torch_and_timm and "timm" in torch_and_timm
    assert _warm_imports(BACKENDS["ort-cpu"]) == ()  # its own imports start a thread: fresh unless it makes the input
    assert _warm_imports(BACKENDS["ort-cpu"], True) == torch_and_timm  # the same server as torch-cpu's
    for name in ("torch-npu", "torch-cuda", "ort-cann", "ort-cuda"):
        assert _warm_imports(BACKENDS[name], True) == (), name
