"""One backend in a child process of its own: load, accuracy run, latency, layer taps.

The parent (`run_backend`) writes the job and the input into a private temp folder, starts
`python -m compare.worker FOLDER` (a fresh interpreter: spawned, never forked) and waits with a
time limit. The child writes its arrays, then result.json, into the same folder. A segfault, an
abort in a vendor library, an out-of-memory kill or a hang becomes that backend's error Outcome;
the parent and the other backends go on. One worker runs at a time, so timings never share cores.

Each process has its own device runtime, so torch_npu and onnxruntime-cann never share one ACL
runtime (a second aclInit in one process fails, and onnxruntime then quietly uses the CPU).
Backends know nothing about this layer.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

RESULT, ARRAYS, JOB, INPUT, LOG = "result.json", "arrays.npz", "job.json", "input.npy", "worker.log"
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # so `python -m compare.worker` works uninstalled


@dataclass(frozen=True)
class Job:
    """What a worker does: which backend class, on which artifact, in which precision, timed how."""

    backend: str  # "module:QualName", importable in the child
    artifacts: str  # absolute artifacts root
    key: str
    precision: str
    batch_sizes: tuple[int, ...] = ()  # empty: no latency
    warmup: int = 10
    iters: int | None = None
    budget_s: float = 3.0
    layers: bool = False
    sys_path: tuple[str, ...] = ()


@dataclass
class Outcome:
    """What came back: status "ran", "skipped" or "error", facts, arrays, timings and one-line warnings."""

    status: str
    reason: str = ""
    details: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    taps: dict = field(default_factory=dict)
    latency: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def run_backend(cls: type, job: Job, batch: np.ndarray, timeout_s: float, cwd: Path) -> Outcome:
    """Run `job` for backend class `cls` in a worker whose working directory is `cwd`; never raises for what the worker does."""
    job = Job(**{**asdict(job), "backend": class_path(cls), "sys_path": tuple(sys.path)})
    with tempfile.TemporaryDirectory(prefix="vit-parity-worker-") as folder:
        folder = Path(folder)
        (folder / JOB).write_text(json.dumps(asdict(job)))
        np.save(folder / INPUT, batch)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
        with open(folder / LOG, "wb") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "compare.worker", str(folder)],
                cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
            try:
                code = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                return Outcome("error", f"no answer in {timeout_s:g} s; the worker was stopped (raise --timeout if the device is just slow)")
            finally:
                if child.poll() is None:  # interrupted (Ctrl-C) while waiting: take the child down too
                    child.kill()
                    child.wait()
        last = _last_line(folder / LOG)
        if not (folder / RESULT).is_file():
            if code < 0:
                name = signal.Signals(-code).name
                why = f"worker killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
            else:
                why = f"worker exited with code {code} before reporting"
            return Outcome("error", why + (f": {last}" if last else ""))
        return _read(folder)


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _read(folder: Path) -> Outcome:
    result = json.loads((folder / RESULT).read_text())
    outcome = Outcome(**{k: v for k, v in result.items() if k in ("status", "reason", "details", "latency", "warnings")})
    if (folder / ARRAYS).is_file():
        with np.load(folder / ARRAYS, allow_pickle=False) as arrays:
            for key in arrays.files:
                kind, name, part = key.split("/", 2)
                getattr(outcome, kind).setdefault(name, {})[part] = arrays[key]
    return outcome


# ---------------------------------------------------------------------------------------------
# The child side.


def work(job: Job, batch: np.ndarray) -> tuple[Outcome, dict[str, np.ndarray]]:
    """Everything a worker does for one backend, in order. Returns the outcome and its arrays by key."""
    from exporter import artifact
    from exporter.errors import UserError

    from . import latency
    from .backends import BackendUnavailable

    module, _, name = job.backend.partition(":")
    backend = getattr(importlib.import_module(module), name)()
    art = artifact.load(job.artifacts, job.key, verify=False)  # the parent verified every hash
    outcome, arrays = Outcome("ran"), {}
    try:
        outcome.details = backend.load(art, job.precision)
    except BackendUnavailable as why:
        return Outcome("skipped", str(why)), arrays
    except UserError as error:
        return Outcome("error", str(error)), arrays
    except Exception as error:  # noqa: BLE001 - present but unable to load this artifact: a finding
        return Outcome("error", f"failed to load the artifact: {_first_line(error)}"), arrays
    try:
        outputs = backend.run(batch)
        outcome.details.update(backend.observed())
    except BackendUnavailable as why:  # e.g. the profile shows the provider ran nothing
        return Outcome("skipped", str(why), {**outcome.details, **backend.observed()}), arrays
    except Exception as error:  # noqa: BLE001 - a device failing mid-run is a finding, not a crash
        return Outcome("error", f"failed while running: {_first_line(error)}", outcome.details), arrays
    arrays.update({f"outputs/{backend.name}/{k}": v for k, v in outputs.items()})
    for size in job.batch_sizes:
        rows = np.resize(np.arange(batch.shape[0]), size)  # cycle the input's samples up to `size`
        try:
            stats = latency.measure(backend, np.ascontiguousarray(batch[rows]), job.warmup, job.iters, job.budget_s)
            outcome.latency.append(asdict(stats))
        except Exception as error:  # noqa: BLE001 - a batch too big for the device is a finding
            outcome.warnings.append(f"{backend.name} could not be timed at batch {size}: {_first_line(error)}")
    if job.batch_sizes:
        outcome.details["timed"] = backend.timed()
    if job.layers:
        try:
            taps = backend.layers(art, batch)
            arrays.update({f"taps/{backend.name}/{k}": v for k, v in taps.items()})
        except BackendUnavailable as why:
            outcome.warnings.append(f"{backend.name}: no per-block outputs: {why}")
        except Exception as error:  # noqa: BLE001 - an optional part must not sink the comparison
            outcome.warnings.append(f"{backend.name}: per-block outputs failed: {_first_line(error)}")
    return outcome, arrays


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(folder: str) -> int:
    from exporter.artifact import write_json_atomic

    folder = Path(folder)
    job = json.loads((folder / JOB).read_text())
    job = Job(**{**job, "batch_sizes": tuple(job["batch_sizes"]), "sys_path": tuple(job["sys_path"])})
    sys.path += [entry for entry in job.sys_path if entry not in sys.path]  # e.g. where a test's backend lives
    outcome, arrays = work(job, np.load(folder / INPUT, allow_pickle=False))
    if arrays:
        np.savez(folder / ARRAYS, **arrays)
    payload = asdict(outcome)
    for kind in ("outputs", "taps"):
        payload.pop(kind)
    write_json_atomic(folder / RESULT, payload)  # last: its presence means the worker finished
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
