"""Child processes that never outlive their parent, and the temp folders a killed run leaves behind.

A worker (compare/worker.py) or a sweep step (zoo/step.py) holds a device, gigabytes of
memory and a temp folder. If its parent dies (SIGTERM from Slurm or systemd, kill -9, a closed
terminal), the child must die too: on Linux the kernel sends it PR_SET_PDEATHSIG; elsewhere, and as
a second line, the child watches its parent id. Folders named after a dead owner's pid are removed
by the next run once it can take their owner's lock (`stale`): a pid proves nothing across PID namespaces or hosts.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL, new_session: bool = False):
    """A Popen `preexec_fn`: the child gets `sig` when its parent dies, and exits at once if it already has.

    `new_session` also puts the child in a session (and process group) of its own, so that the parent
    can stop it and every process it starts with one killpg.
    """
    parent = os.getpid()

    def apply() -> None:
        if new_session:
            os.setsid()
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: watch_parent in the child is the only guard
            pass
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(128 + int(sig))

    return apply


GRACE_S = 5.0  # how long a stopped child may take to stop its own children and remove its folders before SIGKILL


def stop(process: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM to the child's process group (it may stop its own children and remove its temp folders), then
    SIGKILL to the group after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # no such group: a warm-started child not yet in its own session, or gone
            try:
                os.kill(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
        except PermissionError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)


def run_child(command: list[str], *, cwd, timeout_s: float, stdout=None, stderr=None, env: dict | None = None,
              tick=None, parent_death: int = signal.SIGKILL, setup=None, started=None) -> int | None:
    """The one way this tool runs a child (compare's workers, the sweep's steps): in a session and process group of
    its own, dying with this process (`die_with_parent(parent_death)`), `setup` run in it before exec (a memory
    ceiling); waited for up to `timeout_s`, with `tick()` every half second. On the timeout, or on any exception
    here (Ctrl-C, SIGTERM turned into KeyboardInterrupt), it is stopped (`stop`: TERM, then KILL) and whatever it
    left in its group is killed. Returns its exit code, or None when it ran out of time.

    `started`: the child, already started another way (a warm start, vitparity/warm.py: a handle with Popen's `pid`
    and `wait`), to wait for and stop the same way; `command` is then only its name."""
    from vitparity import raise_pending_interrupt

    process = started
    if process is None:
        leash = die_with_parent(parent_death, new_session=True)

        def prepare() -> None:
            leash()
            if setup is not None:
                setup()

        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                   preexec_fn=prepare)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            # An interrupt that a callback swallowed (the fork's at-fork callbacks; a finalizer the garbage collector
            # runs during a tick) is raised here, at every turn: otherwise this waits out the child's whole time
            # limit after a SIGTERM (seen once in CI: a compare that outlived SIGTERM by 30 s, its worker hanging).
            raise_pending_interrupt()
            try:
                return process.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    stop(process)
                    return None
                if tick is not None:
                    tick()
    except BaseException:
        stop(process)
        raise
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # whatever the child left in its group
            os.killpg(process.pid, signal.SIGKILL)


def watch_parent(parent: int, interval_s: float = 0.5, sig: int = signal.SIGKILL) -> threading.Thread:
    """In the child: a daemon thread that sends `sig` to this process once `parent` is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def owned_prefix(prefix: str) -> str:
    """`prefix` with this process's pid: a name a person can read. Ownership is never read from it (see `stale`)."""
    return f"{prefix}{os.getpid()}-"


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# A folder of ours holds this file, which its owner keeps locked (flock) for the folder's whole life. The lock is
# released by the kernel when the owner dies, whatever killed it, and it means the same in every PID namespace and
# container that shares the folder: a pid does not (another namespace's pid 7 is not ours; kill(pid, 0) lies).
OWNER_LOCK = ".owner.lock"
UNLOCKED_GRACE_S = 3600.0  # a folder with no owner lock (an older version's) is stale once untouched this long


def hold(folder: Path, create: bool = True):
    """Take the owner lock of `folder` (created there unless `create` is False, never through a link); the open file
    holds it: close it to release. Raises OSError when another process holds it (FileNotFoundError: no lock file)."""
    import fcntl

    flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | (os.O_CREAT if create else 0)
    fd = os.open(Path(folder) / OWNER_LOCK, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def stale(path: Path) -> bool:
    """Whether `path` is a folder of ours that nobody owns any more: a real folder (a link is never followed), of
    this user (root never removes another user's), whose owner lock can be taken (its owner is gone, on this host
    or any other sharing the folder); with no owner lock, untouched for UNLOCKED_GRACE_S. Any name is fine."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False
    try:
        handle = hold(path, create=False)  # never made here: a folder without one is judged by its age
    except FileNotFoundError:
        return time.time() - info.st_mtime > UNLOCKED_GRACE_S
    except OSError:  # held: its owner lives; or unreadable: not ours to judge
        return False
    handle.close()
    return True


@contextlib.contextmanager
def owned_folder(prefix: str, parent: Path | str | None = None):
    """A new folder `<prefix><pid>-...` in `parent` (the temp folder), owned: its owner lock is held from before the
    folder carries the prefix (it is made under another name, locked, then renamed) until it is removed, so no
    other run ever sees it unowned. Removed when the block ends; one left by a killed run is removed by the next."""
    parent = Path(parent or tempfile.gettempdir())
    making = Path(tempfile.mkdtemp(prefix=".vit-parity-new-", dir=parent))
    handle = hold(making)
    folder = Path(tempfile.mktemp(prefix=owned_prefix(prefix), dir=parent))  # noqa: S306 - the rename below fails if taken
    try:
        os.rename(making, folder)
    except OSError:
        handle.close()
        shutil.rmtree(making, ignore_errors=True)
        raise
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        handle.close()


# The temp folders of this tool, each named <prefix><owner pid>-...: --images runs (decoded images, about
# 1.2 MB an image for dinov3), workers, and sweep scratch artifacts. Every command removes those whose owner is dead.
IMAGES_PREFIX = "vit-parity-images-"
WORKER_PREFIX = "vit-parity-worker-"
SWEEP_PREFIX = "vit-parity-sweep-"
REPLAY_PREFIX = "vit-parity-replay-"
STALE_PREFIXES = (IMAGES_PREFIX, WORKER_PREFIX, SWEEP_PREFIX, REPLAY_PREFIX)


def remove_stale(prefix: str, folder: Path | str | None = None) -> list[Path]:
    """Remove the folders `<prefix>*` in `folder` (the temp folder) that are `stale`; return them."""
    root = Path(folder or tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{prefix}*"):
        if stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def temp_folder(prefix: str):
    """An owned temp folder (`owned_folder`), after removing the stale ones of the same prefix."""
    remove_stale(prefix)
    with owned_folder(prefix) as folder:
        yield folder


def remove_all_stale() -> None:
    """What killed runs of any of this tool's commands left in the temp folder: every command calls this first."""
    for prefix in STALE_PREFIXES:
        try:
            remove_stale(prefix)
        except OSError:  # an unreadable temp folder: nothing of ours to clean there
            pass
