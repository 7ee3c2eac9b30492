"""One verdict, in every output: the terminal, the JSON, the Markdown and the sweep read Report.verdict;
thresholds are data (range-checked, overrides named); the reference is always fp32."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from compare import markdown, render
from compare.backends import BACKENDS
from compare.cli import main
from compare.results import BackendStatus, OutputComparison, Report
from tests.helpers import (
    TINY,
    LowPrecisionCpu,
    SecondLowPrecisionCpu,
    call,
    one_line_error,
)
from vitparity import artifact

FAST = ["--iters", "1", "--warmup", "0"]


def _row(backend: str, passed: bool) -> OutputComparison:
    return OutputComparison(backend, "pooled", [1, 4], [1, 4], True, 0.9 if not passed else 1.0, 1.0, 0.0, 0.0, 0.0, 0,
                            "same-host fp32", 0.99999, 1e-4, passed)


def _report(backends: list[BackendStatus], accuracy: list[OutputComparison], **extra) -> Report:
    return Report(model="m", timm_name="t", artifact="a", weights_source="w", weights_sha256="0" * 64,
                  input={"kind": "random", "source": "s", "shape": [1, 3, 4, 4], "sha256": "x"}, reference="torch-cpu",
                  dtype="fp32", versions={}, warnings=[], backends=backends, accuracy=accuracy, latency=[], **extra)


REF = BackendStatus("torch-cpu", "ran")
CASES = {
    "PASS": ([REF, BackendStatus("ort-cpu", "ran")], [_row("ort-cpu", True)], {}, 0),
    "FAIL": ([REF, BackendStatus("ort-cpu", "ran")], [_row("ort-cpu", False)], {}, 1),
    "FAIL, error row": ([REF, BackendStatus("ort-cpu", "ran"), BackendStatus("torch-npu", "error", "SIGSEGV")],
                        [_row("ort-cpu", True)], {}, 1),
    "NOT COMPARED": ([REF, BackendStatus("torch-npu", "skipped", "no torch_npu")], [], {}, 2),
    "NOT COMPARED, reference saved": ([REF, BackendStatus("torch-npu", "skipped", "no torch_npu")], [],
                                      {"saved_reference": True}, 0),
}


@pytest.mark.parametrize("case", CASES)
def test_terminal_json_and_markdown_state_the_same_verdict_and_exit_code(case):
    backends, accuracy, extra, code = CASES[case]
    report = _report(backends, accuracy, **extra)
    status = case.split(",")[0]
    assert (report.verdict.status, report.exit_code) == (status, code)
    data = report.to_dict()
    assert (data["verdict"], data["exit_code"], data["passed"]) == (status, code, status == "PASS")
    console = Console(file=io.StringIO(), width=300)
    console.print(render.verdict_text(report))
    assert f"m: {status}" in console.file.getvalue()
    assert markdown.verdict(report).startswith(f"**{status}**")


def test_an_empty_report_is_never_a_pass():
    # Report.passed used to be all([]) == True: a run that compared nothing read as a pass in the JSON.
    report = _report([REF], [])
    assert not report.passed and report.to_dict()["exit_code"] == 2 and report.to_dict()["verdict"] == "NOT COMPARED"


def test_a_stored_reference_whose_outputs_were_tampered_with_fails(artifacts_root, capsys, tmp_path, ort_only):
    saved, tampered = tmp_path / "ref.npz", tmp_path / "tampered.npz"
    assert call(main, capsys, TINY, "--artifacts", str(artifacts_root), *ort_only, "--no-latency", "--save-reference", str(saved))[0] == 0
    with np.load(saved, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    key = "outputs/ort-cpu-2/pooled"
    arrays[key] = arrays[key] * 1.05  # 5% off: far outside same-host fp32
    np.savez(tampered, **arrays)
    code, out, _ = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "ort-cpu", *ort_only[2:], "--no-latency",
                        "--against", str(tampered), "--json", str(tmp_path / "r.json"))
    [report] = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert code == 1 and report["verdict"] == "FAIL" and "FAIL" in out
    failing = {(r["backend"].split("@")[0], r["output"]) for r in report["accuracy"] if not r["passed"]}
    assert failing == {("ort-cpu-2", "pooled")}


@pytest.mark.parametrize("flags,message", [
    (("--min-cosine", "inf"), "--min-cosine must be in (0, 1]"),
    (("--min-cosine", "1.5"), "--min-cosine must be in (0, 1]"),
    (("--min-cosine", "0"), "--min-cosine must be in (0, 1]"),
    (("--min-cosine", "nan"), "--min-cosine must be in (0, 1]"),
    (("--max-rel", "nan"), "--max-rel must be a relative error above 0 and finite"),
    (("--max-rel", "0"), "--max-rel must be a relative error above 0 and finite"),
    (("--max-rel", "inf"), "--max-rel must be a relative error above 0 and finite"),
])
def test_thresholds_outside_their_range_are_usage_errors_not_failed_checks(artifacts_root, capsys, flags, message):
    code, _, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), *flags)
    assert code == 2 and message in one_line_error(err)


def test_exporter_thresholds_are_range_checked_too(capsys):
    from exporter.cli import main as export_main

    code, _, err = call(export_main, capsys, TINY, "--max-abs", "-1")
    assert code == 2 and "--max-abs must be an absolute difference above 0" in one_line_error(err)


def test_an_override_is_named_in_the_verdict_line_and_the_json_and_repeated_backends_run_once(artifacts_root, capsys, tmp_path,
                                                                                            ort_only):
    code, out, _ = call(main, capsys, TINY, "--artifacts", str(artifacts_root), *ort_only, "--no-latency", "--min-cosine", "0.9",
                        "--json", str(tmp_path / "r.json"), "--backends", "ort-cpu-2,ort-cpu,ort-cpu-2")
    [report] = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert code == 0 and report["overrides"] == {"min_cosine": 0.9}
    verdict_line = [line for line in out.splitlines() if line.startswith(f"{TINY}: PASS")]
    assert verdict_line and "thresholds overridden for every class, same-host fp32 included: --min-cosine 0.9" in verdict_line[0]
    assert all(r["tolerance"].endswith("(overridden)") for r in report["accuracy"])
    # ort-cpu-2 named twice runs once, after the reference named after it, and each of its rows appears once.
    assert [b["name"] for b in report["backends"]] == ["ort-cpu", "ort-cpu-2"]
    assert {r["backend"] for r in report["accuracy"]} == {"ort-cpu-2"}
    assert len(report["accuracy"]) == len({(r["output"], r["group"]) for r in report["accuracy"]})


def test_the_reference_runs_in_fp32_whatever_dtype_and_each_row_is_judged_by_the_precision_it_ran(artifacts_root, capsys,
                                                                                                   monkeypatch, tmp_path):
    """--dtype fp16 with an accelerator code path (run on the CPU) as the reference: the reference runs fp32; a
    second accelerator row runs fp16 and is judged by the fp16 class (bf16: test_replay's overflow test, whose
    advised --dtype bf16 run passes by its class); torch-cpu, fp32 on the same host, by the strict class."""
    monkeypatch.setitem(BACKENDS, LowPrecisionCpu.name, LowPrecisionCpu)
    monkeypatch.setitem(BACKENDS, SecondLowPrecisionCpu.name, SecondLowPrecisionCpu)
    code, out, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends",
                          f"{LowPrecisionCpu.name},torch-cpu,{SecondLowPrecisionCpu.name}", "--reference", LowPrecisionCpu.name,
                          "--dtype", "fp16", "--no-latency", "--json", str(tmp_path / "r.json"))
    [report] = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert code == 0, out + err
    status = {b["name"]: b for b in report["backends"]}
    assert (status[LowPrecisionCpu.name]["details"]["precision"], status[LowPrecisionCpu.name]["details"]["dtype"]) == ("fp32", "float32")
    assert status[SecondLowPrecisionCpu.name]["details"]["dtype"] == "float16"
    classes = {r["backend"]: r["tolerance"] for r in report["accuracy"]}
    assert classes == {"torch-cpu": "same-host fp32", SecondLowPrecisionCpu.name: "fp16"}
    # Really ran in fp16: fp32 would agree to ~1e-7.
    assert all(1e-4 < r["rel_error"] < r["max_rel"] for r in report["accuracy"] if r["backend"] == SecondLowPrecisionCpu.name)


def test_a_path_that_is_not_a_regular_file_gets_its_own_message(artifacts_root, capsys):
    code, _, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--image", "/dev/zero")
    assert code == 2 and "/dev/zero is not a regular file" in one_line_error(err)


@pytest.mark.parametrize("key,value,message", [
    ("input_size", [3, -5, 256], "data_config.input_size is [3, -5, 256], not 3 positive integers"),
    ("input_size", [3, 160], "not 3 positive integers"),
    ("mean", [0.5, 0.5], "data_config.mean is [0.5, 0.5], not 3 finite numbers (one per channel)"),
    ("std", [0.5, 0.0, 0.5], "not 3 finite numbers above 0"),
])
def test_a_malformed_data_config_is_refused_when_the_manifest_loads(tiny_copy, capsys, key, value, message):
    path = tiny_copy / TINY / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["data_config"][key] = value
    path.write_text(json.dumps(manifest))
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tiny_copy), "--no-latency")
    assert code == 2 and message in one_line_error(err) and "is malformed" in err


def test_the_manifest_records_the_verify_thresholds_and_looser_ones_are_warned(tiny_copy, capsys, artifacts_root, ort_only):
    recorded = json.loads((artifacts_root / TINY / "manifest.json").read_text())["verify"]["thresholds"]
    assert recorded == artifact.VERIFY_DEFAULTS
    path = tiny_copy / TINY / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["verify"]["thresholds"]["max_abs"] = 1.0  # as `python -m exporter --max-abs 1` records it
    path.write_text(json.dumps(manifest))
    from exporter.cli import main as export_main

    code, _, err = call(export_main, capsys, TINY, "--artifacts", str(tiny_copy), "--if-missing")
    assert code == 0 and "verified looser than the defaults: --max-abs 1 (default 0.0001)" in err
    code, out, _ = call(main, capsys, TINY, "--artifacts", str(tiny_copy), *ort_only, "--no-latency")
    assert code == 0 and "verified looser than the defaults" in out


def _one_step_stricter(error: float) -> float:
    """The next smaller 2-significant-digit value: 3.1e-3 -> 3.0e-3, 1.0e-3 -> 9.9e-4."""
    import math

    exponent = math.floor(math.log10(error))
    mantissa = round(error / 10 ** exponent, 6)
    return 9.9 * 10 ** (exponent - 1) if mantissa == 1.0 else (mantissa - 0.1) * 10 ** exponent


def test_perturbed_weights_fail_with_exit_1_and_would_pass_at_is_printed_for_every_failing_row(tiny_copy, capsys, tmp_path):
    from tests.helpers import rewrite_weights

    def perturb(state):
        state["blocks.2.mlp.fc1.weight"] *= 1.02

    rewrite_weights(tiny_copy / TINY, perturb)
    code, out, _ = call(main, capsys, TINY, "--artifacts", str(tiny_copy), "--backends", "torch-cpu,ort-cpu", "--no-latency",
                        "--json", str(tmp_path / "r.json"))
    [report] = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert code == 1 and not all(r["passed"] for r in report["accuracy"])
    assert f"{TINY}: FAIL (ort-cpu disagree" in out and report["verdict"] == "FAIL"  # perturbed weights fail, exit 1
    assert all(f"{r['backend']} {r['output']}: FAIL, would pass at" in out for r in report["accuracy"] if not r["passed"])
    assert all(r["error_p50"] <= r["error_p99"] <= r["max_abs"] for r in report["accuracy"])


def test_would_pass_at_fed_back_passes_and_one_step_stricter_fails():
    """In-process on arrays 2% apart: the thresholds a failing row says it would pass at, given back as the
    overrides (as --min-cosine/--max-rel give them), pass; one step stricter on either fails."""
    from compare.judge import compare_outputs
    from vitparity.tolerances import TOLERANCES, tolerance_for

    rng = np.random.default_rng(0)
    want = {"pooled": rng.standard_normal((2, 32)), "tokens": rng.standard_normal((2, 9, 32))}
    got = {name: array + 0.02 * rng.standard_normal(array.shape) for name, array in want.items()}
    rows = compare_outputs("ort-cpu", got, want, TOLERANCES["same-host"], {"cls": 1, "registers": 0, "patches": 8})
    assert not any(r.passed for r in rows)
    cos = min(r.would_pass_min_cosine for r in rows)
    rel = max(r.would_pass_max_rel for r in rows)

    def passes(min_cosine: float, max_rel: float) -> bool:
        return all(r.passed for r in compare_outputs("ort-cpu", got, want, tolerance_for("same-host", "fp32", min_cosine, max_rel)))

    assert passes(cos, rel)
    assert not passes(1 - _one_step_stricter(1 - cos), rel)
    assert not passes(cos, _one_step_stricter(rel))
