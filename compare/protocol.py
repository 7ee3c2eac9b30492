"""The protocol between compare's parent and its workers: a private folder holding the job, the input, the
worker's arrays and, written last, its result. Both sides read and write it only through this module."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

RESULT, ARRAYS, JOB, INPUT, LOG, PROGRESS = "result.json", "arrays.npz", "job.json", "input.npy", "worker.log", "progress"


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
    stability: bool = False  # --stability: the batch run twice, and its first item alone and among companions
    resample: bool = False  # the reference of a dynamic graph: check its position-embedding resample (vitparity/resample.py)


@dataclass
class Outcome:
    """What came back: status "ran", "skipped", "error" or "changed" (the artifact was replaced while the worker read it:
    nothing was compared), facts, arrays, timings and one-line warnings."""

    status: str
    reason: str = ""
    details: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    taps: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)  # --images: per-image figures and embeddings, by backend
    inputs: dict = field(default_factory=dict)  # {"batch": array}: the input this worker made from job.image
    sizes: dict = field(default_factory=dict)  # --batch-sizes: {backend: {"3/pooled": array}}, outputs at each other size
    stability: dict = field(default_factory=dict)  # --stability: {backend: {"again/pooled", "alone/pooled", "at2/pooled"...}}
    latency: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    input_error: bool = False  # the input (an image, a folder) is unusable: the user's error, not the backend's


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def artifact_identity(art) -> dict:
    """What identifies the artifact the parent verified: its folder's inode (a publish swaps the folder,
    so a new export has a new one) and the manifest's records (size, sha256) of every file but the
    derived ones, which a backend of this very run may add (blocks.onnx)."""
    from vitparity.artifact import DERIVED_SUFFIX

    files = {name: record for name, record in art.manifest["files"].items() if not name.endswith(DERIVED_SUFFIX)}
    return {"inode": os.stat(art.folder).st_ino, "files": files}


def write_job(folder: Path, job: Job, batch: np.ndarray) -> None:
    (folder / JOB).write_text(json.dumps(asdict(job)))
    np.save(folder / INPUT, batch)


def read_job(folder: Path) -> Job:
    job = json.loads((folder / JOB).read_text())
    return Job(**{**job, "batch_sizes": tuple(job["batch_sizes"]), "sys_path": tuple(job["sys_path"])})


def write_outcome(folder: Path, outcome: Outcome, arrays: dict[str, np.ndarray]) -> None:
    """The worker's answer: its arrays, then result.json, written last, so that its presence means it finished."""
    from vitparity.artifact import write_json_atomic

    if arrays:
        np.savez(folder / ARRAYS, **arrays)
    payload = asdict(outcome)
    for kind in ("outputs", "taps", "images", "inputs", "sizes", "stability"):
        payload.pop(kind)
    write_json_atomic(folder / RESULT, payload)


def read_outcome(folder: Path) -> Outcome:
    """The Outcome a worker wrote into `folder` (result.json, and its arrays by "<kind>/<name>/<part>")."""
    result = json.loads((folder / RESULT).read_text())
    outcome = Outcome(**{k: v for k, v in result.items() if k in ("status", "reason", "details", "latency", "warnings", "input_error")})
    if (folder / ARRAYS).is_file():
        with np.load(folder / ARRAYS, allow_pickle=False) as arrays:
            for key in arrays.files:
                kind, name, part = (key.split("/", 2) + [""])[:3]
                if kind == "inputs":
                    outcome.inputs[name] = arrays[key]
                else:
                    getattr(outcome, kind).setdefault(name, {})[part] = arrays[key]
    return outcome
