"""Warm starts: a clean interpreter that has imported torch and timm, and run nothing else, forks each worker.

`import torch, timm` costs about 6 s of CPU (torch 2.6 s; timm pulls in torchvision, whose ops import
torch._dynamo: 2.2 s more), and it was nearly all of every torch-cpu worker's time: measured over the
test suite, 59 torch workers spent 363 s of CPU, 6 s each, importing. A server started once per parent
pays it once; each worker is then a fork of it, started in about 0.3 s, and is still a process of its
own (its own memory, its own crash, its own time limit), in a session of its own, dying with its parent.

Why a server and never a fork of the parent: the parent has run torch and onnxruntime (thread pools,
locks held by other threads); a fork of it could deadlock. The server imports and never computes, so
nothing runs in it but its read loop. It is not multiprocessing's forkserver: that one puts a socket
file in $TMPDIR (left behind when the parent is killed with SIGKILL), takes the parent's main module,
and cannot give the child its own environment and log.

The protocol is one JSON line each way, on the server's stdin and stdout:
  parent -> server  {"module": "compare.worker", "argv": [...], "cwd": ..., "env": {...}, "log": PATH}
  server -> parent  {"pid": N}   then, when it ends,   {"exit": N, "code": C}   (C < 0: killed by signal -C)
The child runs `python -m MODULE ARGV...` as a fresh one would (runpy, `__main__`), its stdout and stderr
in LOG, stdin /dev/null. `VIT_PARITY_WARM=0` starts every worker as a fresh interpreter instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import processes

READY = "ready"
SERVER = "VIT_PARITY_WARM_SERVER"  # set in each warm-started child: its server's pid
START_TIMEOUT_S = 300.0  # importing torch and timm on a slow, busy host; past it the worker is spawned fresh


def enabled() -> bool:
    """Whether workers may be warm-started here: Linux (fork, PR_SET_PDEATHSIG), not turned off, and no device
    runtime that `import torch` would load (torch_npu autoloads unless TORCH_DEVICE_BACKEND_AUTOLOAD=0)."""
    if os.environ.get("VIT_PARITY_WARM", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD", "1") != "0":
        from importlib.util import find_spec

        return find_spec("torch_npu") is None
    return True


class Child:
    """A worker forked by the server: `pid`, and `wait(timeout)` like subprocess.Popen's (raises TimeoutExpired)."""

    def __init__(self, server: Server, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            self.server.pump(0.0 if left is not None and left <= 0 else left)
            self.returncode = self.server.exits.pop(self.pid, None)
            if self.returncode is None and left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"warm worker {self.pid}", timeout)
        return self.returncode


class Server:
    """The parent's handle on one server process (`python -m vitparity.warm MODULE...`)."""

    def __init__(self, modules: tuple[str, ...], env: dict):
        self.exits, self.buffer, self.lock, self.ready = {}, b"", threading.Lock(), False
        self.process = subprocess.Popen([sys.executable, "-m", "vitparity.warm", *modules], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        preexec_fn=processes.die_with_parent(signal.SIGKILL))

    def wait_ready(self) -> None:
        """Wait until the server has imported its modules (it imports them while this process goes on)."""
        if self.ready:
            return
        line = self._line(START_TIMEOUT_S)
        if line != {READY: True}:
            self.close()
            raise OSError(f"the warm-start server did not start ({line or 'no answer'})")
        self.ready = True

    def alive(self) -> bool:
        return self.process.poll() is None

    def start(self, module: str, argv: list[str], *, cwd, env: dict, log: Path) -> Child:
        request = {"module": module, "argv": list(argv), "cwd": str(cwd), "env": dict(env), "log": str(log)}
        with self.lock:
            self.wait_ready()
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
            while True:  # exits of earlier children may come first
                reply = self._line(30.0)
                if reply is None:
                    raise OSError("the warm-start server did not answer")
                if "pid" in reply:
                    return Child(self, reply["pid"])

    def pump(self, timeout: float | None) -> None:
        """Read what the server says for up to `timeout` seconds (None: until it says something)."""
        with self.lock:
            self._line(0.5 if timeout is None else min(timeout, 0.5))

    def _line(self, timeout: float) -> dict | None:
        """The next message other than an exit (exits are kept in `exits`), or None when none came in `timeout`.
        A server that died reports every child it had as killed (they die with it: PR_SET_PDEATHSIG)."""
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while True:
            if b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                message = json.loads(raw)
                if "exit" in message:
                    self.exits[message["exit"]] = message["code"]
                    continue
                return message
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the server is gone, and its children with it
                self.exits = _Killed(self.exits)
                return None
            self.buffer += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


class _Killed(dict):
    """The exits once the server is gone: every child not reported is taken as killed by SIGKILL."""

    def pop(self, pid, default=None):
        return super().pop(pid, -signal.SIGKILL)


def start(command: list[str], *, cwd, env: dict, log, modules: tuple[str, ...]) -> Child | None:
    """`command` (`python -m MODULE ARGS...`) forked from this process's server for `modules`, its output appended
    to the open file `log`; None (start it fresh) when warm starts are off here, when the server cannot start, or
    for the first such worker of a process that has no server yet (`prestart`: a server pays off from the second)."""
    name = getattr(log, "name", None)
    if not modules or command[1:2] != ["-m"] or not isinstance(name, str) or not enabled():
        return None
    key = (tuple(modules), env.get("PYTHONPATH", ""))
    _STARTS[key] = _STARTS.get(key, 0) + 1
    if key not in _SERVERS and _STARTS[key] == 1:
        return None
    found = server(tuple(modules), env)
    if found is None:
        return None
    log.flush()
    try:
        return found.start(command[2], command[3:], cwd=cwd, env=env, log=Path(name))
    except OSError:
        _SERVERS.pop((tuple(modules), env.get("PYTHONPATH", "")), None)
        return None


def prestart(modules: tuple[str, ...], env: dict, workers: int) -> None:
    """Start the server for `modules` now, without waiting, when it will pay off: `workers` of them are planned, and
    this process has started at least two in all. It then imports them while this process does other work (a
    comparison hashes the artifact and plans its rows before its first worker). One worker alone is started fresh:
    the server's import costs what the worker's would, and the fork, a little, on top (make compare: 35.5 s warm,
    35.1 s fresh, A B A B on dinov3)."""
    key = (tuple(modules), env.get("PYTHONPATH", ""))
    if modules and workers and enabled() and _STARTS.get(key, 0) + workers >= 2:
        server(tuple(modules), env)


_SERVERS: dict[tuple, Server] = {}
_STARTS: dict[tuple, int] = {}  # workers started (or asked for) by this process, by server


def server(modules: tuple[str, ...], env: dict) -> Server | None:
    """This process's server for `modules` (and the PYTHONPATH they are imported from), started on first use (or by
    `prestart`); None when it cannot start (the worker is then spawned fresh, and reports the real error, e.g. a torch
    that fails to import)."""
    key = (modules, env.get("PYTHONPATH", ""))
    found = _SERVERS.get(key)
    if found is not None and found.alive():
        return found
    try:
        _SERVERS[key] = found = Server(modules, env)
    except OSError:
        _SERVERS.pop(key, None)
        return None
    return found


# The server side ------------------------------------------------------------------------------------------------


def _child(request: dict, server_pid: int, leash) -> None:
    """In the forked child: become `python -m MODULE ARGV` in a session of its own, dying with the server (`leash`:
    processes.die_with_parent, made in the server)."""
    import runpy
    import traceback

    code = 1
    try:
        leash()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.set_wakeup_fd(-1)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ["VIT_PARITY_PARENT"] = str(server_pid)  # the parent it watches (processes.watch_parent) is the server
        os.environ[SERVER] = str(server_pid)
        sys.argv = [request["module"], *request["argv"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - what a fresh interpreter would print, in the log the parent reads
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(modules: list[str]) -> None:
    """Import `modules`, say ready, then fork a child per request and report each child's exit."""
    import importlib

    leash = processes.die_with_parent(signal.SIGKILL, new_session=True)
    for name in modules:
        importlib.import_module(name)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the parent, which stops the workers itself
    signal.set_wakeup_fd(wake_w)
    out = sys.stdout.buffer

    def say(message: dict) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    say({READY: True})
    me, pending = os.getpid(), b""
    while True:
        ready, _, _ = select.select([0, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
        while True:  # reap every child that ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if 0 in ready:
            chunk = os.read(0, 65536)
            if not chunk:  # the parent is gone
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    _child(json.loads(line), me, leash)
                say({"pid": pid})


if __name__ == "__main__":
    serve(sys.argv[1:])
