"""Artifacts are written atomically and the loader refuses anything incomplete or changed."""
from __future__ import annotations

import os
import shutil
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


# Loaded at start-up by the exporter under test (a sitecustomize on PYTHONPATH): every rename,
# replace or unlink of a path under the artifacts root takes 0.1 s longer, so the publish step,
# normally a few milliseconds, is a window wide enough to kill the exporter at many instants in it.
# The first such call on a manifest (publishing has begun) touches SLOW_MARK.
SLOW_FILESYSTEM = """
import os, time
_root, _mark = os.environ["SLOW_ROOT"], os.environ["SLOW_MARK"]
def _slow(call):
    def slowed(*args, **kwargs):
        paths = [os.fsdecode(a) for a in args if isinstance(a, (str, bytes, os.PathLike))]
        if any(_root in p and "manifest.json" in p for p in paths) and not os.path.exists(_mark):
            open(_mark, "w").close()
        result = call(*args, **kwargs)
        if any(_root in p for p in paths):
            time.sleep(0.1)
        return result
    return slowed
for _name in ("rename", "replace", "unlink"):
    setattr(os, _name, _slow(getattr(os, _name)))
"""


def _kill_at(root, delay, slow_site=None):
    """Start an export over `root`'s artifact and SIGKILL it `delay` seconds after it starts or, with
    `slow_site` (a folder holding SLOW_FILESYSTEM), `delay` seconds after publishing begins."""
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    mark = (slow_site or root) / "publishing"
    mark.unlink(missing_ok=True)
    if slow_site:
        env |= {"PYTHONPATH": str(slow_site), "SLOW_ROOT": str(root), "SLOW_MARK": str(mark)}
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", TINY, "--artifacts", str(root), "--weights", "random", "--seed", "3"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    started = time.monotonic()
    while process.poll() is None:
        if slow_site and mark.exists():
            time.sleep(delay)
            break
        if not slow_site and time.monotonic() - started >= delay:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _hashes(manifest):
    return {name: record["sha256"] for name, record in manifest["files"].items()}


def test_kill_at_any_instant_of_an_export_leaves_the_previous_or_the_new_artifact_whole(tiny_copy, tmp_path):
    original = tmp_path / "original"
    shutil.copytree(tiny_copy / TINY, original)
    before = _hashes(artifact.load(tiny_copy, TINY).manifest)
    start = time.monotonic()
    assert _start_export(tmp_path / "timing", "--seed", "3").wait(timeout=300) == 0
    duration = time.monotonic() - start
    after = _hashes(artifact.load(tmp_path / "timing", TINY).manifest)
    assert after != before
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_FILESYSTEM)
    # Three kills spread over a whole export, then six across the (slowed) publish window.
    kills = [(duration * i / 4, None) for i in range(1, 4)] + [(0.05 * i, tmp_path / "site") for i in range(6)]
    outcomes = []
    for delay, slow_site in kills:
        _kill_at(tiny_copy, delay, slow_site)
        found = _hashes(artifact.load(tiny_copy, TINY).manifest)  # verifies every file's sha256
        assert found in (before, after), (delay, slow_site)
        outcomes.append("old" if found == before else "new")
        if found == after:  # start the next kill from the previous artifact again
            shutil.rmtree(tiny_copy / TINY)
            shutil.copytree(original, tiny_copy / TINY)
    print("kill outcomes:", outcomes)
    assert "old" in outcomes[3:] and "new" in outcomes[3:], outcomes  # the publish window was really crossed
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
