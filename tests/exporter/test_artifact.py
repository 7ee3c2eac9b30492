"""Artifacts are written atomically and the loader refuses anything incomplete or changed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from exporter import artifact
from exporter.errors import UserError
from tests.helpers import ROOT, TINY


def _start_export(root, *args):
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "exporter", TINY, "--artifacts", str(root), "--weights", "random", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _kill_once_staging(process, folder, timeout=120):
    """SIGKILL the export as soon as it has started writing files."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(folder.glob(".staging-*/*")):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        if process.poll() is not None:
            pytest.fail(f"export finished before it could be killed: {process.stderr.read().decode()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("export never started writing")


def test_export_killed_midway_leaves_no_accepted_artifact(tmp_path):
    process = _start_export(tmp_path)
    _kill_once_staging(process, tmp_path / TINY)
    with pytest.raises(UserError, match="no artifact|incomplete"):
        artifact.load(tmp_path, TINY)


def test_export_killed_midway_keeps_the_previous_artifact(tiny_copy):
    before = artifact.load(tiny_copy, TINY).manifest
    process = _start_export(tiny_copy, "--seed", "3")
    _kill_once_staging(process, tiny_copy / TINY)
    after = artifact.load(tiny_copy, TINY)  # verifies every hash
    assert after.manifest == before


def test_two_exports_at_once_end_with_one_complete_artifact(tmp_path):
    first, second = _start_export(tmp_path, "--seed", "1"), _start_export(tmp_path, "--seed", "2")
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
    art = artifact.load(tmp_path, TINY)
    assert art.manifest["weights_source"] in ("random-init (seed 1)", "random-init (seed 2)")
    assert not list((tmp_path / TINY).glob(".staging-*"))


def test_a_staging_folder_left_by_a_killed_export_is_cleaned_up(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / TINY / f".staging-{dead.pid}-abc"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"partial")
    with artifact.staging(tmp_path / TINY):
        pass
    assert not stale.exists()


def test_tampered_model_is_reported_in_plain_words(tiny_copy):
    path = tiny_copy / TINY / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.onnx was modified after export"):
        artifact.load(tiny_copy, TINY)


def test_truncated_model_is_reported_in_plain_words(tiny_copy):
    path = tiny_copy / TINY / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated"):
        artifact.load(tiny_copy, TINY)


def test_missing_artifact_names_the_export_command(tmp_path):
    with pytest.raises(UserError, match="no artifact for dinov3 under .*; run make export MODEL=dinov3"):
        artifact.load(tmp_path, "dinov3")


def test_written_files_follow_the_umask_not_mkstemp(tiny_copy):
    for name in artifact.CORE_FILES + (artifact.MANIFEST,):
        mode = (tiny_copy / TINY / name).stat().st_mode & 0o777
        assert mode & 0o044, f"{name} is {oct(mode)}: not readable by others"
