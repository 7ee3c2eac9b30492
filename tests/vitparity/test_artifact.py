"""Artifacts are written atomically and the loader refuses anything incomplete or changed."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import (
    PUBLISH_EXPORT,
    ROOT,
    SLOW_FILESYSTEM,
    TINY,
    kill_at,
    publisher,
)
from vitparity import artifact
from vitparity.errors import UserError


def _start_export(root, *args):
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "exporter", TINY, "--artifacts", str(root), "--weights", "random", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _staged(root):
    return list(root.glob(f".{TINY}{artifact.STAGING_PREFIX}*/*"))


def _kill_once_staging(process, root, timeout=120):
    """SIGKILL the export as soon as it has started writing files."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _staged(root):
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
    _kill_once_staging(process, tmp_path)
    with pytest.raises(UserError, match="no artifact|incomplete"):
        artifact.load(tmp_path, TINY)


def _hashes(manifest):
    return {name: record["sha256"] for name, record in manifest["files"].items()}


def test_kill_at_any_instant_of_an_export_leaves_the_previous_or_the_new_artifact_whole(tiny_copy, tmp_path):
    """Killed across the publish window, an export leaves the previous artifact or the new one, whole. The killed
    process publishes a new artifact made beforehand, as the exporter publishes (tests/helpers.py PUBLISH_EXPORT);
    test_export_killed_midway kills a real export while it stages."""
    original = tmp_path / "original"
    shutil.copytree(tiny_copy / TINY, original)
    before = _hashes(artifact.load(tiny_copy, TINY).manifest)
    from exporter.export import ExportOptions, export

    export(TINY, tmp_path / "new", ExportOptions(weights="random", seed=3))
    after = _hashes(artifact.load(tmp_path / "new", TINY).manifest)
    assert after != before
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_FILESYSTEM)
    outcomes = []
    for delay in (0.0, 0.05, 0.12, 0.2, 0.3, 0.6):  # across the (slowed) publish window
        kill_at(tiny_copy, delay, tmp_path / "site", command=publisher(PUBLISH_EXPORT, tiny_copy / TINY, tmp_path / "new" / TINY))
        found = _hashes(artifact.load(tiny_copy, TINY).manifest)  # verifies every file's sha256
        assert found in (before, after), delay
        outcomes.append("old" if found == before else "new")
        if found == after:  # start the next kill from the previous artifact again
            shutil.rmtree(tiny_copy / TINY)
            shutil.copytree(original, tiny_copy / TINY)
    print("kill outcomes:", outcomes)
    assert "old" in outcomes and "new" in outcomes, outcomes  # the publish window was really crossed
    with artifact.staging(tiny_copy / TINY):  # the next run removes what the killed ones left behind
        pass
    assert not list(tiny_copy.glob(f".{TINY}{artifact.STAGING_PREFIX}*"))


def test_a_previous_artifact_moved_aside_by_a_killed_publish_is_moved_back(tiny_copy):
    """Where the filesystem cannot exchange two folders atomically, publish moves the previous
    artifact aside under a mark first; an export killed right then must not lose it."""
    before = _hashes(artifact.load(tiny_copy, TINY).manifest)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tiny_copy / TINY / artifact.PREVIOUS_MARK).touch()
    os.rename(tiny_copy / TINY, tiny_copy / f".{TINY}{artifact.STAGING_PREFIX}{dead.pid}-previous")
    assert _hashes(artifact.load(tiny_copy, TINY).manifest) == before
    assert not (tiny_copy / TINY / artifact.PREVIOUS_MARK).exists()


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
