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


def test_host_deps_pins_the_host_builds_and_keeps_its_onnxruntime_variant():
    plan = _dry_run("host-deps", "PYTHON=python3")
    assert "python3 -m exporter.environment constraints > .host-constraints.txt" in plan
    assert "pip install -c .host-constraints.txt -e \".[$(python3 -m exporter.environment extra)]\"" in plan


def test_an_installed_onnxruntime_cann_is_pinned_and_chooses_the_cann_extra(tmp_path):
    """pip treats onnxruntime-cann as another project than onnxruntime: host-deps must ask for the
    cann extra and pin the installed build, or pip would put plain onnxruntime over it, and keep
    NumPy 1.x, or the build could not be imported."""
    import os
    import sys

    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "__init__.py").write_text("")
    info = tmp_path / "onnxruntime_cann-1.24.4.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-cann\nVersion: 1.24.4\n")
    (info / "RECORD").write_text("onnxruntime/__init__.py,,\n")
    # The NumPy 1.x that build needs: pip must not upgrade it to 2 (ml_dtypes 0.6 would ask it to).
    numpy_info = tmp_path / "numpy-1.26.4.dist-info"
    numpy_info.mkdir()
    (numpy_info / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 1.26.4\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}

    def ask(what):
        return subprocess.run([sys.executable, "-m", "exporter.environment", what], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True).stdout.split()

    assert ask("extra") == ["cann"]
    assert {"onnxruntime-cann==1.24.4", "numpy<2"} <= set(ask("constraints"))
