"""Shared fixtures: real exports made once per test session, and helpers to edit artifact copies."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for the hub; the auto path is tested offline

ROOT = Path(__file__).resolve().parents[1]
TINY = "test_vit"  # timm's own tiny ViT (160x160): fast enough for tests that export or mutate


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 600):
    """Run `python -m module args` in a subprocess from the project root; returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory) -> Path:
    """A session-wide artifacts root holding dinov2, dinov3 and the tiny ViT, exported once."""
    from exporter.export import ExportOptions, export

    root = tmp_path_factory.mktemp("artifacts")
    for name in ("dinov2", "dinov3", TINY):
        export(name, root, ExportOptions(weights="random"))
    return root


@pytest.fixture
def tiny_copy(artifacts_root, tmp_path) -> Path:
    """A private copy of the tiny artifact, as root folder; tests may change it freely."""
    root = tmp_path / "artifacts"
    shutil.copytree(artifacts_root / TINY, root / TINY)
    return root


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
