"""The worker boundary: each backend in its own process; a crash or a hang is that backend's error row.

The misbehaving backends are onnxruntime rows against an ort-cpu reference on a seeded input
(tests/helpers.py ORT_ONLY): what is tested is the process boundary, and no worker imports torch."""
from __future__ import annotations

import json

from compare.backends import BACKENDS
from compare.cli import main
from tests.helpers import TINY, Hangs, ReportsCwd, Segfaults


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
