"""Child processes that never outlive their parent, and the temp folders a killed run leaves behind.

A worker (compare/worker.py) or a sweep step (zoo/step.py) holds a device, gigabytes of
memory and a temp folder. If its parent dies (SIGTERM from Slurm or systemd, kill -9, a closed
terminal), the child must die too: on Linux the kernel sends it PR_SET_PDEATHSIG; elsewhere, and as
a second line, the child watches its parent id. Folders named after a dead owner's pid are removed
by the next run.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import stat
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
    """`prefix` with this process's pid, for temp folders that `remove_stale` may clean up once it is dead."""
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


# The temp folders of this tool, each named <prefix><owner pid>-...: --images runs (decoded images, about
# 1.2 MB an image for dinov3), workers, and sweep scratch artifacts. Every command removes those whose owner is dead.
IMAGES_PREFIX = "vit-parity-images-"
WORKER_PREFIX = "vit-parity-worker-"
SWEEP_PREFIX = "vit-parity-sweep-"
REPLAY_PREFIX = "vit-parity-replay-"
STALE_PREFIXES = (IMAGES_PREFIX, WORKER_PREFIX, SWEEP_PREFIX, REPLAY_PREFIX)


def remove_stale(prefix: str, folder: Path | str | None = None) -> list[Path]:
    """Remove the folders `<prefix><pid>-*` in `folder` (the temp folder) whose owner pid is dead; return them.
    Only real folders of that name: a link is never followed (shutil.rmtree refuses one)."""
    root = Path(folder or tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not (pid.isdigit() and not alive(int(pid))):
            continue
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def temp_folder(prefix: str):
    """A temp folder named after this process (`<prefix><pid>-...`), so that the next command removes it if this
    one is killed; removed when the block ends."""
    remove_stale(prefix)
    with tempfile.TemporaryDirectory(prefix=owned_prefix(prefix)) as folder:
        yield Path(folder)


def remove_all_stale() -> None:
    """What killed runs of any of this tool's commands left in the temp folder: every command calls this first."""
    for prefix in STALE_PREFIXES:
        try:
            remove_stale(prefix)
        except OSError:  # an unreadable temp folder: nothing of ours to clean there
            pass
