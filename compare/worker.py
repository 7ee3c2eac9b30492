"""One backend in a child process of its own: load, accuracy run, latency, layer taps.

The parent (compare/launch.py) writes the job and the input into a private temp folder (compare/protocol.py),
starts `python -m compare.worker FOLDER` and waits with a time limit; this child writes its arrays, then
result.json, into the same folder. A segfault, an
abort in a vendor library, an out-of-memory kill or a hang becomes that backend's error Outcome;
the parent and the other backends go on. One worker runs at a time, so timings never share cores.

Each process has its own device runtime, so torch_npu and onnxruntime-cann never share one ACL
runtime (a second aclInit in one process fails, and onnxruntime then quietly uses the CPU).
Backends know nothing about this layer.
"""
from __future__ import annotations

import importlib
import os
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np

from vitparity import processes, warm

from .protocol import INPUT, Job, Outcome, artifact_identity, read_job, write_outcome

# Exceptions that mean a mistake in Python code, ours or a backend's, not a device's finding.
BUG_TYPES = (AssertionError, AttributeError, IndexError, KeyError, NameError, TypeError, ZeroDivisionError)


LIBRARIES = tuple({sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib", "platstdlib")})


OURS = (str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "exporter"))


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
        return Outcome("changed", changed), arrays
    if job.image:  # the bundled photo or --image: the first worker, which imports timm anyway, transforms it
        from . import inputs

        try:
            batch = inputs.image_batch(Path(job.image["path"]), job.image["data_config"], job.image["batch_size"])
        except UserError as error:
            return Outcome("error", str(error), input_error=True), arrays
        arrays["inputs/batch"] = batch
    if job.dataset.get("decode"):  # --images: the first worker decodes them (it imports timm anyway; the parent need not)
        from . import dataset

        images, skipped = dataset.decode(job.dataset)
        if not images:
            return Outcome("error", f"--images: none of the {len(skipped)} files is a readable image (first: {skipped[0]['path']}: "
                                    f"{skipped[0]['reason']}); pass a folder of JPEG or PNG files", input_error=True), arrays
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
        return Outcome("changed", changed), arrays
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
    if job.stability:
        try:
            arrays.update({f"stability/{backend.name}/{k}": v for k, v in stability(backend, batch).items()})
        except Exception as error:  # noqa: BLE001 - as for the latency: a finding, unless it is a bug of ours
            if is_bug(error):
                raise
            outcome.warnings.append(f"{backend.name}: the stability runs failed: {_first_line(error)}")
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
    if job.resample and not bugs:
        try:
            found = backend.resample(art, batch.shape[2:])
            if found is not None:
                outcome.details["resample"] = found
        except Exception as error:  # noqa: BLE001 - as for the per-block outputs
            if is_bug(error):
                bugs.append(_bug("resample", error))
            else:
                outcome.warnings.append(f"{backend.name}: the position-embedding resample could not be checked: {_first_line(error)}")
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


COMPANIONS = 3  # --stability: the first item is also run in a batch of 1 + COMPANIONS, at every position


def companions(item: np.ndarray) -> list[np.ndarray]:
    """Inputs unlike `item` (C, H, W) to share a batch with it: mirrored, at half contrast, and rolled by half its
    height. Made here, in numpy: every backend gets the same, and no worker needs torch to make them."""
    return [np.ascontiguousarray(item[:, :, ::-1]), np.ascontiguousarray(item * 0.5),
            np.ascontiguousarray(np.roll(item, item.shape[1] // 2, axis=1))][:COMPANIONS]


def stability(backend, batch: np.ndarray) -> dict[str, np.ndarray]:
    """--stability: the batch run again ("again/<output>", for determinism), its first item alone ("alone/<output>"),
    that item among COMPANIONS others at each position ("at<p>/<output>", its rows only), and in a batch of its own
    copies as large ("copies/<output>"): what changes with the batch size alone (rounding of other kernel blocks) is
    told apart from what changes with the companions (dynamic int8's one activation scale over the whole batch)."""
    found = {f"again/{k}": v for k, v in backend.run(batch).items()}
    item = np.ascontiguousarray(batch[:1])
    found.update({f"alone/{k}": v for k, v in backend.run(item).items()})
    copies = np.ascontiguousarray(np.repeat(item, COMPANIONS + 1, axis=0))
    found.update({f"copies/{k}": v for k, v in backend.run(copies).items()})
    others = companions(batch[0])
    for position in range(len(others) + 1):
        stacked = np.ascontiguousarray(np.stack([*others[:position], batch[0], *others[position:]]))
        found.update({f"at{position}/{k}": np.asarray(v)[position:position + 1] for k, v in backend.run(stacked).items()})
    return found


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
    folder = Path(folder)
    parent = os.environ.get("VIT_PARITY_PARENT")
    if parent:  # PR_SET_PDEATHSIG is Linux's; this watch also covers other systems
        processes.watch_parent(int(parent))
    tempfile.tempdir = str(folder)  # every temp file of this worker (onnxruntime profiles...) dies with its folder
    job = read_job(folder)
    sys.path += [entry for entry in job.sys_path if entry not in sys.path]  # e.g. where a test's backend lives
    try:
        outcome, arrays = work(job, np.load(folder / INPUT, allow_pickle=False))
    except Exception as error:  # noqa: BLE001 - anything uncaught is reported with its traceback, not lost
        outcome, arrays = _failure("the worker failed", error), {}
    import resource

    started = "warm" if os.environ.get(warm.SERVER) else "fresh"  # read back, never assumed
    outcome.details["started"] = started
    peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    # A fork's peak leaves out the library pages its server's imports touched (torch-cpu: 446 MB warm, 725 MB fresh):
    # not the memory a process of its own needs, so it is kept under another name.
    outcome.details["peak_rss_mb" if started == "fresh" else "peak_rss_mb_since_fork"] = peak
    write_outcome(folder, outcome, arrays)
    return 0


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: result.json is written and closed, and the parent waits for this
    process to end before it reads it. Tearing down torch's and onnxruntime's modules and thread pools took 1 s
    after every torch worker (measured: the gap before the next worker started), time no comparison needs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv[1]))
