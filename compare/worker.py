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
import sysconfig
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vitparity import processes

RESULT, ARRAYS, JOB, INPUT, LOG, PROGRESS = "result.json", "arrays.npz", "job.json", "input.npy", "worker.log", "progress"
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # so `python -m compare.worker` works uninstalled
TEMP_PREFIX = processes.WORKER_PREFIX  # + the parent's pid: a killed run's folders are removed by the next run
# Exceptions that mean a mistake in Python code, ours or a backend's, not a device's finding.
BUG_TYPES = (AssertionError, AttributeError, IndexError, KeyError, NameError, TypeError, ZeroDivisionError)
LIBRARIES = tuple({sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib", "platstdlib")})
OURS = (str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "exporter"))


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
    artifact_id: dict = field(default_factory=dict)  # what the parent verified: see artifact_identity
    dataset: dict = field(default_factory=dict)  # --images: the plan of compare/dataset.stream
    image: dict = field(default_factory=dict)  # {"path", "data_config", "batch_size"}: the first worker makes the input
    variant: str = ""  # a reduced-precision graph of the artifact instead of model.onnx (row "<backend>:<variant>")
    replay: dict = field(default_factory=dict)  # --replay: {"folder", "write"}, see backends.torch_eager.replay


@dataclass
class Outcome:
    """What came back: status "ran", "skipped" or "error", facts, arrays, timings and one-line warnings."""

    status: str
    reason: str = ""
    details: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    taps: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)  # --images: per-image figures and embeddings, by backend
    inputs: dict = field(default_factory=dict)  # {"batch": array}: the input this worker made from job.image
    sizes: dict = field(default_factory=dict)  # --batch-sizes: {backend: {"3/pooled": array}}, outputs at each other size
    latency: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def artifact_identity(art) -> dict:
    """What identifies the artifact the parent verified: its folder's inode (a publish swaps the folder,
    so a new export has a new one) and the manifest's records (size, sha256) of every file but the
    derived ones, which a backend of this very run may add (blocks.onnx)."""
    from vitparity.artifact import DERIVED_SUFFIX

    files = {name: record for name, record in art.manifest["files"].items() if not name.endswith(DERIVED_SUFFIX)}
    return {"inode": os.stat(art.folder).st_ino, "files": files}


def run_backend(cls: type, job: Job, batch: np.ndarray, timeout_s: float, cwd: Path, progress=lambda done, total: None) -> Outcome:
    """Run `job` for backend class `cls` in a worker whose working directory is `cwd`; never raises for what the worker does.

    The worker dies with this process (PR_SET_PDEATHSIG, and a parent watch in the worker). An
    interrupt or SIGTERM here stops it before the exception goes on; the temp folder is removed
    whatever happens, and folders left by a run that was killed outright are removed by the next.
    """
    processes.remove_stale(TEMP_PREFIX)
    with tempfile.TemporaryDirectory(prefix=processes.owned_prefix(TEMP_PREFIX)) as folder:
        folder = Path(folder)
        plan = {**job.dataset, "progress": str(folder / PROGRESS)} if job.dataset else {}
        job = Job(**{**asdict(job), "backend": class_path(cls), "sys_path": tuple(sys.path), "dataset": plan})
        (folder / JOB).write_text(json.dumps(asdict(job)))
        np.save(folder / INPUT, batch)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])),
               "VIT_PARITY_PARENT": str(os.getpid())}
        with open(folder / LOG, "wb") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "compare.worker", str(folder)],
                cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=processes.die_with_parent(),
            )
            deadline = time.monotonic() + timeout_s
            try:
                while True:
                    try:
                        code = child.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
                        break
                    except subprocess.TimeoutExpired:
                        if time.monotonic() >= deadline:
                            raise
                        _report_progress(folder / PROGRESS, progress)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                return Outcome("error", f"no answer in {timeout_s:g} s; the worker was stopped (raise --timeout if the device is just slow)")
            finally:
                if child.poll() is None:  # interrupted (Ctrl-C, SIGTERM) while waiting: take the child down too
                    child.kill()
                    child.wait()
        last = _last_line(folder / LOG)
        if not (folder / RESULT).is_file():
            if code < 0:
                name = signal.Signals(-code).name
                why = f"worker killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
            else:
                why = f"worker exited with code {code} before reporting"
            outcome = Outcome("error", why + (f": {last}" if last else ""))
        else:
            outcome = _read(folder)
        if outcome.status == "error" or outcome.details.get("bugs"):
            keep_log(outcome, folder, cls, job)
        return outcome


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


def _read(folder: Path) -> Outcome:
    result = json.loads((folder / RESULT).read_text())
    outcome = Outcome(**{k: v for k, v in result.items() if k in ("status", "reason", "details", "latency", "warnings")})
    if (folder / ARRAYS).is_file():
        with np.load(folder / ARRAYS, allow_pickle=False) as arrays:
            for key in arrays.files:
                kind, name, part = (key.split("/", 2) + [""])[:3]
                if kind == "inputs":
                    outcome.inputs[name] = arrays[key]
                else:
                    getattr(outcome, kind).setdefault(name, {})[part] = arrays[key]
    return outcome


# ---------------------------------------------------------------------------------------------
# The child side.


def is_bug(error: BaseException) -> bool:
    """True when `error` is a mistake in Python code outside the libraries (ours, or a backend's), not a device finding.

    A device finding (out of memory, a kernel that fails) is raised from inside torch or onnxruntime;
    a TypeError or KeyError raised in our own frames is a bug, and is never turned into a warning.
    """
    if not isinstance(error, BUG_TYPES):
        return False
    tb, last = error.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    filename = last.tb_frame.f_code.co_filename
    return filename.startswith(OURS) or not filename.startswith(LIBRARIES)


def _bug(part: str, error: BaseException) -> dict:
    return {"part": part, "error": f"{type(error).__name__}: {_first_line(error)}",
            "traceback": "".join(traceback.format_exception(error))}


def _changed(art, expected: dict) -> str:
    """Why the artifact on disk is not the one the parent verified, or ""."""
    if not expected:
        return ""
    from vitparity.artifact import Artifact, read_manifest

    if artifact_identity(Artifact(art.folder, read_manifest(art.folder))) != expected:  # from disk, as it is now
        return (f"the artifact {art.folder} changed while this run compared it (an export finished in between); "
                f"run the comparison again")
    return ""


def work(job: Job, batch: np.ndarray) -> tuple[Outcome, dict[str, np.ndarray]]:
    """Everything a worker does for one backend, in order. Returns the outcome and its arrays by key."""
    from vitparity import artifact
    from vitparity.errors import UserError

    from . import latency
    from .backends import BackendUnavailable

    module, _, name = job.backend.partition(":")
    backend = getattr(importlib.import_module(module), name)()
    if job.variant:
        backend.use_variant(job.variant)
    # The parent verified every hash; what is checked here is that this is still that artifact.
    art = artifact.load(job.artifacts, job.key, verify=False)
    outcome, arrays = Outcome("ran"), {}
    changed = _changed(art, job.artifact_id)
    if changed:
        return Outcome("error", changed), arrays
    if job.image:  # the bundled photo or --image: the first worker, which imports timm anyway, transforms it
        from . import inputs

        try:
            batch = inputs.image_batch(Path(job.image["path"]), job.image["data_config"], job.image["batch_size"])
        except UserError as error:
            return Outcome("error", str(error), {"input_error": True}), arrays
        arrays["inputs/batch"] = batch
    if job.dataset.get("decode"):  # --images: the first worker decodes them (it imports timm anyway; the parent need not)
        from . import dataset

        images, skipped = dataset.decode(job.dataset)
        if not images:
            return Outcome("error", f"--images: none of the {len(skipped)} files is a readable image (first: {skipped[0]['path']}: "
                                    f"{skipped[0]['reason']}); pass a folder of JPEG or PNG files", {"input_error": True}), arrays
        batch = dataset.read_rows(Path(job.dataset["inputs"]), 0, min(job.dataset["batch"], len(images)), job.dataset["shape"])
    try:
        outcome.details = backend.load(art, job.precision)
    except BackendUnavailable as why:
        return Outcome("skipped", str(why)), arrays
    except UserError as error:
        return Outcome("error", str(error)), arrays
    except Exception as error:  # noqa: BLE001 - present but unable to load this artifact: a finding
        return _failure("failed to load the artifact", error), arrays
    changed = _changed(art, job.artifact_id)  # swapped while the backend read its files?
    if changed:
        return Outcome("error", changed), arrays
    try:
        started = time.perf_counter()
        outputs = backend.run(batch)
        first_s = time.perf_counter() - started
        outcome.details.update(backend.observed())
    except BackendUnavailable as why:  # e.g. the profile shows the provider ran (almost) nothing
        return Outcome("skipped", str(why), {**outcome.details, **backend.observed()}), arrays
    except Exception as error:  # noqa: BLE001 - a device failing mid-run is a finding, not a crash
        failure = _failure("failed while running", error)
        failure.details = {**outcome.details, **failure.details}
        return failure, arrays
    arrays.update({f"outputs/{backend.name}/{k}": v for k, v in outputs.items()})
    if job.dataset:
        try:
            found, seconds = _stream(backend, job.dataset, (outputs, first_s))
        except Exception as error:  # noqa: BLE001 - as a failure of the accuracy run
            failure = _failure("failed while running over the images", error)
            failure.details = {**outcome.details, **failure.details}
            return failure, arrays
        arrays.update({f"images/{backend.name}/{k}": v for k, v in found.items()})
        outcome.details["inference_s"] = round(seconds, 3)
    bugs = []
    for size in job.batch_sizes:
        rows = np.resize(np.arange(batch.shape[0]), size)  # cycle the input's samples up to `size`
        try:
            stats = latency.measure(backend, np.ascontiguousarray(batch[rows]), job.warmup, job.iters, job.budget_s)
            outcome.latency.append(asdict(stats))
            if size != batch.shape[0]:  # accuracy at this size too: some failures appear only at some batch sizes
                found = backend.run(np.ascontiguousarray(batch[rows]))
                arrays.update({f"sizes/{backend.name}/{size}/{k}": v for k, v in found.items()})
        except Exception as error:  # noqa: BLE001 - a batch too big for the device is a finding
            if is_bug(error):
                bugs.append(_bug(f"latency at batch {size}", error))
                break
            outcome.warnings.append(f"{backend.name} could not be timed at batch {size}: {_first_line(error)}")
    if job.batch_sizes and not bugs:
        outcome.details["timed"] = backend.timed()
    if job.layers and not bugs:
        try:
            taps = backend.layers(art, batch)
            arrays.update({f"taps/{backend.name}/{k}": v for k, v in taps.items()})
            outcome.details.update(backend.observed())  # e.g. where the tap session's nodes ran
        except BackendUnavailable as why:
            outcome.warnings.append(f"{backend.name}: no per-block outputs: {why}")
        except Exception as error:  # noqa: BLE001 - a device failing in this optional part must not sink the comparison
            if is_bug(error):
                bugs.append(_bug("per-block outputs", error))
            else:
                outcome.warnings.append(f"{backend.name}: per-block outputs failed: {_first_line(error)}")
    if job.replay and not bugs:
        try:
            if not hasattr(backend, "replay"):
                raise BackendUnavailable("replay runs the eager backends' blocks on the reference's inputs; "
                                         f"{backend.name} has no blocks to run one by one")
            found = backend.replay(art, batch, **job.replay)
            if not job.replay["write"]:
                outcome.details["replay"] = found
        except BackendUnavailable as why:
            outcome.warnings.append(f"{backend.name}: no local error per block: {why}")
        except Exception as error:  # noqa: BLE001 - as for the per-block outputs
            if is_bug(error):
                bugs.append(_bug("replay", error))
            else:
                outcome.warnings.append(f"{backend.name}: replay failed: {_first_line(error)}")
    if bugs:
        # A bug in our code is never a warning: the row is an error, with the traceback kept.
        outcome.status = "error"
        outcome.reason = f"internal error in the {bugs[0]['part']} step (a bug, not a device finding): {bugs[0]['error']}"
        outcome.details["bugs"] = bugs
    return outcome, arrays


def _stream(backend, plan: dict, first: tuple):
    """Every image of the --images plan through `backend`, the progress written where the parent reads it."""
    from . import dataset

    progress = Path(plan["progress"])

    def step(done: int, total: int) -> None:
        tmp = progress.with_suffix(".tmp")
        tmp.write_text(f"{done} {total}")
        os.replace(tmp, progress)

    return dataset.stream(backend, plan, plan.get("layout"), step, first)


def _failure(what: str, error: BaseException) -> Outcome:
    """An error outcome for `error`, with its traceback kept, and a bug told apart from a device finding."""
    kind = "internal error (a bug, not a device finding) " if is_bug(error) else ""
    reason = f"{kind}{what}: {type(error).__name__ + ': ' if kind else ''}{_first_line(error)}"
    return Outcome("error", reason, {"traceback": "".join(traceback.format_exception(error))})


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(folder: str) -> int:
    from vitparity.artifact import write_json_atomic

    folder = Path(folder)
    parent = os.environ.get("VIT_PARITY_PARENT")
    if parent:  # PR_SET_PDEATHSIG is Linux's; this watch also covers other systems
        processes.watch_parent(int(parent))
    tempfile.tempdir = str(folder)  # every temp file of this worker (onnxruntime profiles...) dies with its folder
    job = json.loads((folder / JOB).read_text())
    job = Job(**{**job, "batch_sizes": tuple(job["batch_sizes"]), "sys_path": tuple(job["sys_path"])})
    sys.path += [entry for entry in job.sys_path if entry not in sys.path]  # e.g. where a test's backend lives
    try:
        outcome, arrays = work(job, np.load(folder / INPUT, allow_pickle=False))
    except Exception as error:  # noqa: BLE001 - anything uncaught is reported with its traceback, not lost
        outcome, arrays = _failure("the worker failed", error), {}
    import resource

    outcome.details["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    if arrays:
        np.savez(folder / ARRAYS, **arrays)
    payload = asdict(outcome)
    for kind in ("outputs", "taps", "images", "inputs", "sizes"):
        payload.pop(kind)
    write_json_atomic(folder / RESULT, payload)  # last: its presence means the worker finished
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
