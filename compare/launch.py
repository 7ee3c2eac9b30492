"""The parent side of a worker: start `python -m compare.worker FOLDER`, wait with a time limit, read the answer.

A process of its own runs each backend (compare/worker.py): a fresh interpreter, or, for a backend whose
imports start no device runtime (torch-cpu) and for the worker that makes the input (it imports torch and timm
for timm's transform), a fork of a server that imported them once and ran nothing (vitparity/warm.py), never a
fork of this process. A segfault, an abort in a vendor library, an
out-of-memory kill or a hang becomes that backend's error Outcome; the parent and the other backends go on.
One worker runs at a time, so timings never share cores.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from vitparity import processes, warm

from .backends.base import TORCH_AND_TIMM
from .protocol import (
    LOG,
    PROGRESS,
    RESULT,
    Job,
    Outcome,
    class_path,
    read_outcome,
    write_job,
)

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # so `python -m compare.worker` works uninstalled


TEMP_PREFIX = processes.WORKER_PREFIX  # + the parent's pid: a killed run's folders are removed by the next run


def run_backend(cls: type, job: Job, batch: np.ndarray, timeout_s: float, cwd: Path, progress=lambda done, total: None) -> Outcome:
    """Run `job` for backend class `cls` in a worker whose working directory is `cwd`; never raises for what the worker does.

    The worker dies with this process (PR_SET_PDEATHSIG, and a parent watch in the worker). An
    interrupt or SIGTERM here stops it before the exception goes on; the temp folder is removed
    whatever happens, and folders left by a run that was killed outright are removed by the next.
    """
    with processes.temp_folder(TEMP_PREFIX) as folder:
        plan = {**job.dataset, "progress": str(folder / PROGRESS)} if job.dataset else {}
        job = Job(**{**asdict(job), "backend": class_path(cls), "sys_path": tuple(sys.path), "dataset": plan})
        write_job(folder, job, batch)
        env = worker_env()
        command = [sys.executable, "-m", "compare.worker", str(folder)]
        with open(folder / LOG, "wb") as log:  # the core's one launcher: own group, TERM then KILL, dies with us
            started = warm.start(command, cwd=cwd, env=env, log=log, modules=_warm_imports(cls, makes_input(job)))
            code = processes.run_child(command, cwd=cwd, env=env, timeout_s=timeout_s, stdout=log,
                                       stderr=subprocess.STDOUT, started=started,
                                       tick=lambda: _report_progress(folder / PROGRESS, progress))
        if code is None:
            return Outcome("error", f"no answer in {timeout_s:g} s; the worker was stopped (raise --timeout if the device is just slow)")
        last = _last_line(folder / LOG)
        if not (folder / RESULT).is_file():
            if code < 0:
                name = signal.Signals(-code).name
                why = f"worker killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
            else:
                why = f"worker exited with code {code} before reporting"
            outcome = Outcome("error", why + (f": {last}" if last else ""))
        else:
            outcome = read_outcome(folder)
        if outcome.status == "error" or outcome.details.get("bugs"):
            keep_log(outcome, folder, cls, job)
        return outcome


def worker_env() -> dict:
    """A worker's environment: ours, our package importable, and this process's pid for its parent watch."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])),
            "VIT_PARITY_PARENT": str(os.getpid())}


def prepare(classes, input_maker: type | None = None) -> None:
    """Start the warm-start servers that the workers of `classes` (one per planned worker) will be forked from, where
    one pays off (`warm.prestart`: two or more such workers in this process), so that they import torch and timm
    while this process goes on to its first worker. `input_maker`: the class, among `classes`, of the worker that
    makes the run's input (it imports torch and timm for timm's transform, whatever its backend); None when this
    process holds the input."""
    planned, maker = {}, input_maker
    for cls in classes:
        modules = _warm_imports(cls, cls is maker)
        maker = None if cls is maker else maker  # one worker makes the input
        planned[modules] = planned.get(modules, 0) + 1
    for modules, workers in planned.items():
        warm.prestart(modules, worker_env(), workers)


def makes_input(job: Job) -> bool:
    """Whether `job`'s worker makes the run's input: the photo through timm's transform (job.image), or --images'
    decoding (compare/dataset.py)."""
    return bool(job.image or (job.dataset or {}).get("decode"))


def _warm_imports(cls: type, input_maker: bool = False) -> tuple[str, ...]:
    """What a warm-start server imports for `cls`'s workers (vitparity/warm.py); () starts them fresh. The worker that
    makes the input imports torch and timm whatever its backend, so a CPU backend's is forked from the server that has
    them: onnxruntime's then imports onnxruntime, which starts threads, after the fork, as a fresh one would. A device
    backend's worker always starts fresh, its device runtime with it."""
    on_the_cpu = not getattr(cls, "accelerator", "")
    first = tuple(getattr(cls, "imports_first", ())) or (TORCH_AND_TIMM if input_maker and on_the_cpu else ())
    return ("vitparity", *first, "compare.worker") if first else ()


def _report_progress(path: Path, progress) -> None:
    try:
        done, total = map(int, path.read_text().split())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return
    progress(done, total)


def log_folder() -> Path:
    """Where the logs of failed workers are kept: $XDG_CACHE_HOME/vit-parity/logs, else ~/.cache/vit-parity/logs."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vit-parity" / "logs"


def keep_log(outcome: Outcome, folder: Path, cls: type, job: Job) -> None:
    """Copy a failed worker's output, and its traceback, where the user can read them; the reason names the file."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        logs = log_folder()
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{job.key}-{getattr(cls, 'name', cls.__name__)}-{stamp}-{os.getpid()}.log"
        text = (folder / LOG).read_text(errors="replace") if (folder / LOG).is_file() else ""
        tracebacks = [outcome.details.get("traceback", "")] + [bug["traceback"] for bug in outcome.details.get("bugs", [])]
        path.write_text(text + "".join(f"\n{t}" for t in tracebacks if t))
    except OSError as error:  # a read-only home: the traceback is still in the JSON details
        outcome.details["log"] = f"not written: {error}"
        return
    outcome.details["log"] = str(path)
    if outcome.status == "error":
        outcome.reason += f"; full log: {path}"


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
