"""The one child launcher (vitparity/processes.run_child) that compare's workers and the sweep's steps share: a
child in its own process group, stopped with TERM then KILL, and nothing it started left behind."""
from __future__ import annotations

import os
import sys
import time

import pytest

import vitparity
from tests.helpers import gone
from vitparity import processes

STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child that will not stop when asked
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(f"{os.getpgid(0)} {os.getpid()} {grandchild.pid}")
time.sleep(120)
"""
OBEDIENT = STUBBORN.replace("signal.signal(signal.SIGTERM, signal.SIG_IGN)", "")  # stops when asked


def test_a_child_that_ignores_term_is_killed_after_the_grace_with_what_it_started(tmp_path):
    record = tmp_path / "pids"
    started = time.monotonic()
    code = processes.run_child([sys.executable, "-c", STUBBORN, str(record)], cwd=tmp_path, timeout_s=3)
    took = time.monotonic() - started
    assert code is None  # out of time
    group, pid, grandchild = map(int, record.read_text().split())
    assert group == pid != os.getpgid(0)  # its own process group
    assert took < 3 + processes.GRACE_S + 5, took  # TERM, the grace, then KILL
    assert gone(pid, 5) and gone(grandchild, 5)


def test_a_child_that_ends_gives_its_exit_code_and_ticks_while_it_runs(tmp_path):
    ticks = []
    code = processes.run_child([sys.executable, "-c", "import time, sys; time.sleep(1.2); sys.exit(3)"], cwd=tmp_path,
                               timeout_s=30, tick=lambda: ticks.append(1))
    assert code == 3 and len(ticks) >= 1


def test_an_interrupt_swallowed_while_the_child_runs_stops_it_at_the_next_turn(tmp_path):
    # As when SIGTERM lands in a finalizer that the garbage collector runs during a tick: Python swallows the
    # exception and our unraisable hook records it (vitparity._swallowed). The wait must not go on to the time limit.
    record = tmp_path / "pids"
    swallowed = []

    def tick():
        if record.exists() and not swallowed:  # the child and its grandchild run
            swallowed.append(15)
            vitparity._swallowed.append(15)

    started = time.monotonic()
    with pytest.raises(vitparity.Stopped):
        processes.run_child([sys.executable, "-c", OBEDIENT, str(record)], cwd=tmp_path, timeout_s=60, tick=tick)
    assert time.monotonic() - started < 30 and swallowed and not vitparity._swallowed
    _, pid, grandchild = map(int, record.read_text().split())
    assert gone(pid, 5) and gone(grandchild, 5)
