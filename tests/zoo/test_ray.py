"""The sweep on a Ray started by the test, bound to 127.0.0.1: the same rows as the local runner and a killed task
retried once then an error row, in one sweep (tests/zoo/test_sweep.py, `ray_sweep`), and Ctrl-C cancelling the
tasks. Every wait is bounded, and the cluster stops."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import (
    ROOT,
    command_line,
    descendants,
    foreign_sockets,
    gone,
    parents,
    wait_for,
)
from zoo.ray_runner import infeasible, memory_need
from zoo.store import read_rows


def test_a_model_no_node_can_take_is_named_not_queued_for_ever():
    nodes = [{"Alive": True, "Resources": {"CPU": 2, "memory": 16e9}}, {"Alive": False, "Resources": {"CPU": 64, "memory": 1e12}}]
    assert memory_need(22_000_000) == pytest.approx(2.48e9, rel=0.01)
    assert infeasible({"CPU": 1, "memory": memory_need(22_000_000)}, nodes) == ""
    why = infeasible({"CPU": 1, "memory": memory_need(304_000_000), "NPU": 1}, nodes)
    assert why == "no node of the Ray cluster can run it: it needs memory 20.5 GB (the largest node has 16.0 GB), NPU 1 (the largest node has 0)"


needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (the ray extra)")


def _start(out, *args):
    # SIGINT at its default: a background job (make test &) would otherwise start the sweep ignoring it.
    return subprocess.Popen([sys.executable, "-m", "zoo", *args, "--ray", "--out", str(out), "--timeout", "300"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _tasks(sweep, tree: dict[int, int] | None = None) -> list[int]:
    """The Ray workers running a model's task. Not their children: a step forked by the task carries the
    task's process title until it execs, and killing it would kill a step, not the task."""
    tree = parents() if tree is None else tree
    tasks = [pid for pid in descendants(sweep.pid, tree) if command_line(pid).startswith("ray::_task")]
    return [pid for pid in tasks if tree.get(pid) not in tasks]


# The one connection off the loopback address that Ray makes and no setting of it stops: the API server, which ray.init
# starts even without the dashboard (only its UsageStatsHead module then), asks the cloud metadata address
# 169.254.169.254:80 which cloud it runs in, with usage statistics off too (Ray 2.60: UsageStatsHead.run calls
# usage_lib.get_cloud_from_metadata_requests before it reads the setting). Seen on a CI host that routes that address;
# here it fails at once. That process, that address and port only: any other socket off 127.0.0.1 still fails.
RAY_CLOUD_PROBE = (("ray/dashboard/dashboard.py", "FEA9FEA9:0050"),)


def ray_sweep(names, out, kill: str = "") -> dict:
    """Sweep the models of the list file `names` on a local Ray; their rows by model. Checks that every socket
    of the Ray processes stays on 127.0.0.1 while they run. With `kill` (a model of the list), the task that runs
    it is killed with SIGKILL as soon as one of its steps starts, and so is Ray's one retry of it."""
    sweep = _start(out, "--list", str(names))
    foreign, checked, killed, deadline = [], 0, [], time.monotonic() + 300
    while sweep.poll() is None and time.monotonic() < deadline:
        tree = parents()  # one read of /proc per turn
        count, bad = foreign_sockets(descendants(sweep.pid, tree) + [sweep.pid], allow=RAY_CLOUD_PROBE)
        checked, foreign = checked + count, foreign + bad
        running = [pid for pid in _tasks(sweep, tree) if pid not in killed and kill and _runs(pid, kill, tree)]
        if running and len(killed) < 2:  # the task, then Ray's one retry of it
            os.kill(running[0], signal.SIGKILL)
            killed.append(running[0])
        time.sleep(0.2)
    _, err = sweep.communicate(timeout=30)
    assert sweep.returncode in (0, 1) and "Ray node" in err, err
    assert checked and not foreign, foreign  # Ray's servers and workers held sockets, all on 127.0.0.1 (but the probe)
    assert len(killed) == (2 if kill else 0), (killed, err)
    return {row.model: row for row in read_rows(out / "results.jsonl")}


def _runs(task: int, model: str, tree: dict[int, int] | None = None) -> bool:
    """Whether the Ray task `task` runs `model`: one of its steps ends its command line with `-- MODEL`
    (zoo/step.py), which no other model's step does."""
    return any(command_line(pid).split()[-2:] == ["--", model] for pid in descendants(task, tree))


@needs_ray
def test_ctrl_c_cancels_the_ray_tasks_and_stops_the_cluster(tmp_path):
    sweep = _start(tmp_path / "sweep", "test_vit")
    assert wait_for(lambda: _tasks(sweep), 120, 0.2), sweep.communicate(timeout=30)
    started = descendants(sweep.pid)  # the task, its steps, Ray's own servers
    sweep.send_signal(signal.SIGINT)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 130 and "the model in flight was not recorded" in err, err
    assert read_rows(tmp_path / "sweep" / "results.jsonl") == []
    assert all(gone(pid, 15) for pid in started), [command_line(pid)[:80] for pid in started if not gone(pid, 0)]
