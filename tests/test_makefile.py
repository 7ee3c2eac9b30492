"""The Makefile: every Python target sets up .venv by itself, and PYTHON= installs nothing."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(*args: str) -> str:
    result = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return result.stdout


@pytest.mark.parametrize("target,module", [("export", "exporter"), ("compare", "exporter"), ("bench", "exporter"), ("test", "pytest")])
def test_each_target_sets_up_a_fresh_venv_first(target, module, tmp_path):
    venv = tmp_path / "venv"
    plan = _dry_run(target, f"VENV={venv}")
    assert plan.index("-m venv") < plan.index("pip install") < plan.index(f"{venv}/bin/python -m {module}")


@pytest.mark.parametrize("target", ["export", "compare", "bench", "test"])
def test_python_override_installs_nothing(target):
    plan = _dry_run(target, "PYTHON=python3", "MODEL=dinov3")
    assert "pip" not in plan and "venv" not in plan
    assert "python3 -m " in plan


def test_compare_passes_model_and_two_host_variables():
    plan = _dry_run("compare", "PYTHON=python3", "MODEL=dinov3", "SAVE=npu.npz", "ARTIFACTS=/data/a")
    assert "python3 -m exporter dinov3 --artifacts /data/a --if-missing" in plan
    assert "python3 -m compare dinov3 --artifacts /data/a --save-reference npu.npz" in plan
