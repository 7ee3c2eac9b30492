"""Temp folders that are provably ours: a folder is stale only when its owner lock can be taken (a pid means nothing
in another PID namespace or on another host); another user's folder and a strange name are left alone; and two
writers of one artifact take turns under its lock, neither losing the other's work."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, TINY
from vitparity import artifact, processes
from vitparity.graphs import precision_variants


def test_a_live_folder_is_kept_whatever_its_pid_says_and_a_dead_ones_is_removed(tmp_path):
    with processes.owned_folder(processes.WORKER_PREFIX, tmp_path) as live:
        (live / "worker.log").write_text("running")
        # A name whose pid is dead here (another namespace's pid, or another host's): still kept while its lock is held.
        foreign = tmp_path / f"{processes.WORKER_PREFIX}999999999-other"
        os.rename(live, foreign)
        assert processes.remove_stale(processes.WORKER_PREFIX, tmp_path) == [] and foreign.is_dir()
        os.rename(foreign, live)
    # Its owner gone (the lock file left, as kill -9 leaves it): removed by the next run.
    dead = tmp_path / f"{processes.WORKER_PREFIX}1-dead"
    dead.mkdir()
    processes.hold(dead).close()
    assert processes.remove_stale(processes.WORKER_PREFIX, tmp_path) == [dead] and not dead.exists()


def test_strange_names_links_and_other_users_folders_are_never_removed_and_never_crash(tmp_path):
    strange = [tmp_path / f"{processes.WORKER_PREFIX}²-x", tmp_path / f"{processes.WORKER_PREFIX}{'9' * 20}-x"]
    for folder in strange:
        folder.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / f"{processes.SWEEP_PREFIX}1-link").symlink_to(target)
    assert processes.remove_stale(processes.WORKER_PREFIX, tmp_path) == []  # no owner lock, fresh: not stale yet
    for folder in strange:
        processes.hold(folder).close()  # their owners gone
    assert sorted(processes.remove_stale(processes.WORKER_PREFIX, tmp_path)) == sorted(strange)
    assert processes.remove_stale(processes.SWEEP_PREFIX, tmp_path) == [] and target.is_dir()
    if os.getuid() != 0:
        pytest.skip("another user's folder needs root to make")
    alice = tmp_path / f"{processes.SWEEP_PREFIX}4000000-alicework"
    alice.mkdir()
    processes.hold(alice).close()
    os.chown(alice, 65534, 65534)
    os.chown(alice / processes.OWNER_LOCK, 65534, 65534)
    assert processes.remove_stale(processes.SWEEP_PREFIX, tmp_path) == [] and alice.is_dir()


def test_every_command_survives_a_strange_folder_in_the_temp_folder(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    (tmp_path / f"{processes.WORKER_PREFIX}²-x").mkdir()
    (tmp_path / f"{processes.IMAGES_PREFIX}{'9' * 20}-x").mkdir()
    done = subprocess.run([sys.executable, "-m", "exporter", "--list"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_a_folder_of_another_pid_namespace_is_not_removed_while_its_owner_lives(tmp_path):
    """`unshare --pid` (where the host allows it): a command in a new PID namespace, whose pids mean nothing here,
    leaves this run's live folder alone; before, kill(pid, 0) from there said its owner was dead."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is not allowed here: {probe.stderr.decode(errors='replace').strip()[:100]}")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with processes.owned_folder(processes.IMAGES_PREFIX, tmp_path) as live:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "exporter", "--list"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert live.is_dir()


def test_two_variant_writers_at_once_both_land(tiny_copy):
    """Two `--if-missing --variant` runs started together: they take turns under the artifact's lock, the second
    reading what the first published, so the artifact ends with both variants (before: the last one won)."""
    command = [sys.executable, "-m", "exporter", TINY, "--artifacts", str(tiny_copy), "--if-missing", "--variant"]
    runs = [subprocess.Popen([*command, variant], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for variant in ("fp16", "fused")]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    assert {"fp16", "fused"} <= set(precision_variants(artifact.load(tiny_copy, TINY).manifest))


def test_the_artifact_lock_is_reentrant_and_recover_spares_another_users_folders(tmp_path):
    folder = tmp_path / "model"
    with artifact.writing(folder), artifact.writing(folder):  # a publish inside an export's staging: no self-deadlock
        pass
    left = tmp_path / ".model.staging-1-x"
    left.mkdir()
    artifact.recover(folder)
    assert not left.exists()  # under the lock, a staging folder there is a dead writer's
    if os.getuid() == 0:
        other = tmp_path / ".model.staging-2-y"
        other.mkdir()
        os.chown(other, 65534, 65534)
        artifact.recover(folder)
        assert other.is_dir()

