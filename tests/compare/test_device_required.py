"""A present accelerator is required: on a host with an Ascend device file and no working torch_npu, the run is NOT
COMPARED (exit 2) with one line that says so and how to fix it, not a PASS of two CPU runtimes; naming --backends
without the device's backends runs as on any CPU host; and make refuses to build a .venv with stock torch there."""
from __future__ import annotations

import json
import os
import subprocess

from compare.cli import main
from tests.helpers import ROOT, TINY, call, one_line_error, runnable


def test_an_ascend_host_whose_npu_never_ran_is_not_compared_and_says_the_fix(artifacts_root, tmp_path, capsys, monkeypatch):
    if runnable("torch-npu", "ort-cann"):  # a real Ascend host: its NPU runs, nothing to prove here
        return
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "davinci0").touch()
    monkeypatch.setenv("VIT_PARITY_DEVICE_ROOT", str(devices))
    code, out, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--no-latency", "--json", str(tmp_path / "r.json"))
    line = one_line_error(err.split("\n", 1)[1] if err.startswith("wrote ") else err)
    assert code == 2 and "Ascend NPU" in line and "never ran" in line and "make host-deps PYTHON=python3" in line, line
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    assert report["verdict"] == "NOT COMPARED" and report["exit_code"] == 2 and "ascend" in report["devices_not_run"]
    assert "PASS" not in out.splitlines()[-1]
    code, out, _ = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--no-latency", "--backends", "torch-cpu,ort-cpu")
    assert code == 0 and f"{TINY}: PASS" in out


def test_make_will_not_build_a_venv_with_stock_torch_on_an_ascend_host(tmp_path):
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "davinci0").touch()
    done = subprocess.run(["make", "-s", "compare", "MODEL=dinov3", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "VIT_PARITY_DEVICE_ROOT": str(devices)})
    assert done.returncode != 0 and "this host has an Ascend NPU" in done.stderr and "PYTHON=python3" in done.stderr
    assert not (tmp_path / "venv").exists()  # nothing was built
