"""The NPU backend fails soft: no torch_npu, or a torch_npu whose CANN libraries are missing."""
from __future__ import annotations

import os

from tests.helpers import TINY, has_row, run_cli

BROKEN_INIT = 'raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")\n'


def _broken_torch_npu(root):
    """A stand-in distribution that registers itself as a torch device backend, as torch_npu does,
    and whose import fails the way torch_npu does on a host without CANN."""
    (root / "torch_npu").mkdir(parents=True)
    (root / "torch_npu" / "__init__.py").write_text(BROKEN_INIT)
    info = root / "torch_npu-2.9.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch-npu\nVersion: 2.9.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    return root


def _env(root):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    env["PYTHONPATH"] = str(root)
    return env


def test_the_stand_in_crashes_a_plain_import_torch_like_the_real_one(tmp_path):
    import subprocess
    import sys

    env = _env(_broken_torch_npu(tmp_path))
    result = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "libhccl.so" in result.stderr


def test_compare_completes_with_a_broken_torch_npu_and_shows_why(artifacts_root, tmp_path):
    env = _env(_broken_torch_npu(tmp_path / "site"))
    result = run_cli("compare", TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu,ort-cpu,torch-npu",
                     "--iters", "1", "--warmup", "0", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "not run: torch-npu:" in result.stdout  # one line says why
    assert "libhccl.so" in result.stdout and "install CANN and source set_env.sh" in result.stdout.replace("\n", " ")


def test_require_torch_npu_with_a_broken_torch_npu_exits_2(artifacts_root, tmp_path):
    env = _env(_broken_torch_npu(tmp_path / "site"))
    result = run_cli("compare", TINY, "--artifacts", str(artifacts_root), "--backends", "ort-cpu,torch-npu", "--reference", "ort-cpu",
                     "--input", "random", "--require", "torch-npu", env=env)  # the torch process is torch-npu's own
    assert result.returncode == 2
    assert "required backend torch-npu is unavailable" in result.stderr and "Traceback" not in result.stderr
