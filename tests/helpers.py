"""Helpers shared by the tests: subprocess CLIs, artifact edits, table matching, a CPU low-precision backend."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from compare.backends.torch_eager import TorchEager

ROOT = Path(__file__).resolve().parents[1]
TINY = "test_vit"  # timm's own tiny ViT (160x160): fast enough for tests that export or mutate


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 600):
    """Run `python -m module args` from the project root in a subprocess; `env` replaces the environment."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=os.environ.copy() if env is None else env,
        capture_output=True, text=True, timeout=timeout,
    )


def rewrite_weights(folder: Path, change) -> None:
    """Apply `change(state_dict)` to an artifact's weights.safetensors and update the manifest hash,
    so the loader accepts the edited artifact as genuine."""
    from safetensors.torch import load_file, save_file

    from exporter.artifact import sha256

    path = folder / "weights.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def has_row(text: str, *cells: str) -> bool:
    """True when one line of a rendered Rich table holds `cells` in order, in adjacent columns."""
    pattern = r"\s*│\s*".join(re.escape(c) for c in cells)
    return re.search(pattern, text) is not None


class LowPrecisionCpu(TorchEager):
    """The accelerator code path (follows --dtype) on the CPU, so fp16/bf16 runs are testable here."""

    name = "torch-cpu-lowp"
    device = "cpu"
    follows_dtype = True
