"""Processes that never outlive their parent, temp folders that never stay, failures that can be debugged.

Real processes and real signals: `python -m compare` is started, a worker is seen running, the parent
gets SIGTERM or kill -9, and the worker must be gone within seconds. Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from compare import launch, protocol
from compare.backends import BACKENDS
from compare.backends.base import BackendUnavailable
from compare.backends.profile import kernel_share, prove_placement
from compare.cli import main
from tests.helpers import (
    LYING_ONNXRUNTIME,
    ROOT,
    TINY,
    BuggyLayers,
    DecomposedCpu,
    call,
    children,
    gone,
    run_cli,
    stand_in,
    wait_for,
)
from vitparity import artifact, warm

# `python -m compare` whose second backend hangs in load(), like a device stuck in a driver call.
HANGING_COMPARE = textwrap.dedent('''
    import sys
    from compare.backends import BACKENDS
    from tests.helpers import Hangs, HangsEager
    BACKENDS["hangs"] = Hangs
    BACKENDS["hangs-eager"] = HangsEager
    from vitparity import entry_point
    from compare.cli import main
    entry_point(lambda: lambda: main(sys.argv[1:]), "interrupted")
''')


def _start_hanging(root: Path, tmp: Path) -> tuple[subprocess.Popen, int, Path]:
    """A compare whose `hangs` worker is running: (parent process, worker pid, worker temp folder). The reference
    is ort-cpu on a seeded input: what is tested is the processes, and none of them imports torch."""
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", HANGING_COMPARE, TINY, "--artifacts", str(root), "--backends", "ort-cpu,hangs",
                               "--reference", "ort-cpu", "--input", "random", "--no-latency"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def hanging_worker():
        for pid in children(parent.pid):
            try:
                folder = Path(open(f"/proc/{pid}/cmdline").read().split("\0")[3])
                job = json.loads((folder / protocol.JOB).read_text())
            except (OSError, IndexError, ValueError):
                continue
            if job["backend"].endswith(":Hangs"):
                return pid, folder
        return None

    found = wait_for(hanging_worker, 120)
    if not found:
        parent.kill()
        pytest.fail(f"no hanging worker appeared: {parent.communicate()}")
    return parent, *found


def _left_in(scratch: Path) -> list[str]:
    """What is left in the TMPDIR a run was given, but onnxruntime's own `.ses`: its telemetry session file, written
    to $TMPDIR when onnxruntime is imported (1.32 here; microsoft/onnxruntime#32476), never by us."""
    return sorted(p.name for p in scratch.iterdir() if p.name != ".ses")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_or_sighup_stops_the_worker_and_removes_its_folder(artifacts_root, tmp_path, sig, code):
    parent, pid, folder = _start_hanging(artifacts_root, tmp_path)
    parent.send_signal(sig)
    out, err = parent.communicate(timeout=30)
    assert parent.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert gone(pid, 10), "the worker outlived its parent"
    assert not folder.exists() and not _left_in(tmp_path)


def test_kill_9_of_the_parent_takes_the_worker_down_and_the_next_run_removes_its_folder(artifacts_root, tmp_path):
    parent, pid, folder = _start_hanging(artifacts_root, tmp_path)
    parent.kill()
    parent.communicate(timeout=30)
    assert gone(pid, 10), "the worker outlived a parent killed with SIGKILL"
    assert folder.exists()  # nobody was left to remove it
    result = run_cli("compare", TINY, "--artifacts", str(artifacts_root), "--backends", "ort-cpu", "--reference", "ort-cpu",
                     "--input", "random", "--no-latency", "--save-reference", str(tmp_path / "ref.npz"),
                     env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert not folder.exists() and _left_in(tmp_path) == ["ref.npz"]


def test_kill_9_of_the_parent_takes_a_warm_started_worker_and_its_server_down(artifacts_root, tmp_path):
    pid_file = tmp_path / "hangs.pid"
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT), "HANGS_PID_FILE": str(pid_file)}
    parent = subprocess.Popen([sys.executable, "-c", HANGING_COMPARE, TINY, "--artifacts", str(artifacts_root), "--backends",
                               "ort-cpu,torch-cpu,hangs-eager", "--reference", "ort-cpu", "--input", "random", "--no-latency"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 120):
        parent.kill()
        pytest.fail(f"no hanging worker appeared: {parent.communicate()}")
    pid = int(pid_file.read_text())
    servers = children(parent.pid)
    # Forked from the warm-start server where this host allows it (two torch workers are planned: the server is then
    # its parent), else fresh.
    assert (pid not in servers) == warm.enabled()
    parent.kill()
    parent.communicate(timeout=30)
    assert gone(pid, 10), "the warm-started worker outlived a parent killed with SIGKILL"
    assert all(gone(server, 10) for server in servers), "the warm-start server outlived its parent"


def test_a_provider_fallback_leaves_no_profile_or_worker_folder(artifacts_root, tmp_path):
    env = stand_in(tmp_path / "site", "onnxruntime", LYING_ONNXRUNTIME)
    env.update(STANDIN_PROVIDERS=json.dumps(["CUDAExecutionProvider"]), STANDIN_LOG=str(tmp_path / "log.jsonl"))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env["TMPDIR"] = str(scratch)
    result = run_cli("compare", TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu,ort-cpu,ort-cuda",
                     "--no-latency", "--layers", env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "fell back to the CPU" in result.stdout
    assert list(scratch.glob("ort-profile-*")) == [] and list(scratch.glob(f"{launch.TEMP_PREFIX}*")) == []


def test_a_bug_in_our_code_is_an_error_row_with_its_traceback_kept_never_a_warning(artifacts_root, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(BACKENDS, BuggyLayers.name, BuggyLayers)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, out, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "ort-cpu,buggy-layers",
                          "--reference", "ort-cpu", "--input", "random", "--no-latency", "--layers", "--json", str(tmp_path / "r.json"))
    [report] = json.loads((tmp_path / "r.json").read_text())["reports"]
    status = {b["name"]: b for b in report["backends"]}["buggy-layers"]
    assert code == 1 and report["verdict"] == "FAIL"
    assert status["status"] == "error" and "internal error in the per-block outputs step (a bug" in status["reason"]
    assert not any("buggy-layers" in w for w in report["warnings"])
    [bug] = status["details"]["bugs"]
    assert "TypeError" in bug["traceback"] and "helpers.py" in bug["traceback"]
    log = Path(status["details"]["log"])
    assert log.is_file() and "TypeError" in log.read_text() and f"full log: {log}" in status["reason"]


def test_a_worker_refuses_an_artifact_that_is_not_the_one_the_parent_verified(artifacts_root, tmp_path):
    from compare.backends.onnxruntime import OrtCpu

    art = artifact.load(artifacts_root, TINY)
    batch = np.load(art.path("sample.npz"))["pixel_values"][:1]
    identity = protocol.artifact_identity(art)
    job = protocol.Job(backend="", artifacts=str(artifacts_root), key=TINY, precision="fp32")
    ok = launch.run_backend(OrtCpu, protocol.Job(**{**job.__dict__, "artifact_id": identity}), batch, 120, tmp_path)
    assert ok.status == "ran"
    swapped = {**identity, "inode": identity["inode"] + 1}  # what a publish in between looks like: a new folder
    outcome = launch.run_backend(OrtCpu, protocol.Job(**{**job.__dict__, "artifact_id": swapped}), batch, 120, tmp_path)
    # not a backend's failure (no FAIL): nothing was compared, the parent says run again (exit 2)
    assert outcome.status == "changed" and "changed while this run compared it" in outcome.reason


def test_layer_taps_come_from_the_graph_the_accuracy_row_ran_and_record_their_placement(decomposed_root, tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.setitem(BACKENDS, DecomposedCpu.name, DecomposedCpu)
    code, _, err = call(main, capsys, TINY, "--artifacts", str(decomposed_root), "--backends", "ort-cpu,ort-cpu-decomposed",
                        "--reference", "ort-cpu", "--input", "random", "--no-latency", "--layers", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    [report] = json.loads((tmp_path / "r.json").read_text())["reports"]
    details = {b["name"]: b for b in report["backends"]}["ort-cpu-decomposed"]["details"]
    assert details["graph"] == "model.ln-decomposed.onnx"
    assert details["layers_graph"] == "model.ln-decomposed.blocks.onnx"
    assert sum(details["layers_placement"]["CPUExecutionProvider"].values()) > 0
    import onnx

    taps_graph = onnx.load(str(decomposed_root / TINY / "model.ln-decomposed.blocks.onnx"))
    assert "LayerNormalization" not in {n.op_type for n in taps_graph.graph.node}
    assert {r["backend"] for r in report["layers"]} == {"ort-cpu-decomposed"}
    artifact.load(decomposed_root, TINY)  # the derived graph is recorded without making the artifact unverifiable


def _profile(cann_us: float, cpu_us: float) -> list[dict]:
    events = [{"cat": "Node", "name": f"c{i}_kernel_time", "dur": cann_us / 26,
               "args": {"op_name": "fused", "provider": "CANNExecutionProvider"}} for i in range(26)]
    events += [{"cat": "Node", "name": f"l{i}_kernel_time", "dur": cpu_us / 25,
                "args": {"op_name": "LayerNormalization", "provider": "CPUExecutionProvider"}} for i in range(25)]
    return events


def test_a_row_that_ran_mostly_on_the_cpu_is_not_an_accelerator_result():
    where, share = prove_placement(_profile(970, 30), "CANNExecutionProvider")
    assert share["CANNExecutionProvider"] == pytest.approx(0.97)
    with pytest.raises(BackendUnavailable, match=r"ran mostly on the CPU: CANN 3% of kernel time; CANN 26 / CPU 25: LayerNormalization x25"):
        prove_placement(_profile(30, 970), "CANNExecutionProvider")
    assert kernel_share(_profile(0, 0)) == pytest.approx({"CANNExecutionProvider": 26 / 51, "CPUExecutionProvider": 25 / 51})
