"""Results that travel between hosts: save one comparison's input and outputs, compare against them elsewhere."""
from __future__ import annotations

import io
import json
import socket
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from exporter.artifact import write_atomic
from exporter.errors import UserError

from .backends import split
from .results import BackendStatus, Report

FORMAT = "vit-parity reference"
VERSION = 2  # 2: each backend records the precision it ran in
# What np.load raises on a file that is truncated, empty or not an npz archive.
UNREADABLE = (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError)


@dataclass(frozen=True, eq=False)
class Stored:
    """A saved reference read back. Backends are keyed "backend@host", e.g. "torch-npu@hostA"."""

    path: str
    batch: np.ndarray
    input: dict
    host: str
    dtype: str
    created: str
    outputs: dict[str, dict[str, np.ndarray]]
    taps: dict[str, dict[str, np.ndarray]]
    backends: dict[str, dict]  # keyed name -> {"details", "tolerance", "precision"} as saved
    truth: list = field(default_factory=list)  # the saving host's --truth rows, backends keyed name@host
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # --images: pooled per image, by name@host

    def statuses(self) -> list[BackendStatus]:
        """One "stored" status per saved backend, its saved details plus where and when it ran."""
        return [
            BackendStatus(name, "stored", f"saved on {self.host} at {self.created} in {self.path}",
                          {**saved["details"], "host": self.host, "file": self.path, "created_utc": self.created})
            for name, saved in self.backends.items()
        ]

    def tolerance_class(self, name: str) -> str:
        return self.backends[name]["tolerance"]

    def precision(self, name: str) -> str:
        """The precision mode the stored backend really ran in."""
        return self.backends[name]["precision"]


def save(path, report: Report, run) -> None:
    """Write the input, each backend's outputs and layer taps, and metadata to the .npz file `path`, atomically.

    Only backends that ran and produced outputs are saved. The file name is kept exactly as given.
    """
    arrays = {"batch": np.asarray(run.batch, dtype=np.float32)}
    backends = {}
    for status in report.backends:
        if status.status != "ran" or status.name not in run.outputs:
            continue
        backend, _ = split(status.name)
        backends[status.name] = {  # a variant row is judged by its variant's class, as here
            "details": status.details, "tolerance": status.details.get("variant_class") or backend.tolerance,
            "precision": status.details.get("precision", "fp32"),
        }
        for kind, found in (("outputs", run.outputs), ("taps", run.taps)):
            for name, array in found.get(status.name, {}).items():
                arrays[f"{kind}/{status.name}/{name}"] = np.asarray(array)
        if status.name in run.images:  # --images: every image's pooled embedding, in input order
            arrays[f"embeddings/{status.name}/pooled"] = np.asarray(run.images[status.name]["embeddings"])
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "model": report.model,
        "timm_name": report.timm_name,
        "weights_sha256": report.weights_sha256,
        "input": report.input,
        "host": socket.gethostname(),
        "environment": report.versions,
        "dtype": report.dtype,
        "reference": report.reference,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backends": backends,
        "truth": [asdict(row) for row in report.truth if "@" not in row.backend],
    }
    # A unicode array, not a pickled object, so the file loads with allow_pickle=False.
    arrays["metadata"] = np.array(json.dumps(metadata))
    buffer = io.BytesIO()  # np.savez would append ".npz" to a path that lacks it; a buffer keeps the user's name
    np.savez(buffer, **arrays)
    try:
        write_atomic(Path(path), buffer.getvalue())
    except OSError as error:
        raise UserError(f"cannot write reference {path}: {error.strerror or error}; pick a folder that exists and is writable") from error


def load(path, manifest: dict) -> Stored:
    """Read a reference written by `save` and check it was made from this artifact (same model, same weights)."""
    if not Path(path).is_file():
        raise UserError(f"reference {path} does not exist; pass a file written by --save-reference")
    try:
        metadata, arrays = _read(Path(path))
        _check(path, metadata, manifest)
        return _stored(str(path), metadata, arrays)
    except UNREADABLE as error:
        why = (str(error).splitlines() or [""])[0]
        raise UserError(
            f"reference {path} is truncated or not a reference file ({type(error).__name__}: {why}); "
            f"copy it again or save a new one with --save-reference"
        ) from error


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("a single .npy array, not an .npz archive")
    with data:
        # Read every member now: a damaged member only shows itself when it is read.
        arrays = {key: data[key] for key in data.files}
    metadata = json.loads(str(arrays.pop("metadata")))
    return metadata, arrays


def _check(path, metadata, manifest: dict) -> None:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not a reference file (no '{FORMAT}' metadata); pass a file written by --save-reference")
    if metadata.get("version") != VERSION:
        raise UserError(
            f"reference {path} has format version {metadata.get('version')}, but this tool reads version {VERSION}; "
            f"save the reference again with the same version of this tool on both hosts"
        )
    if (metadata["model"], metadata["timm_name"]) != (manifest["model"], manifest["timm_name"]):
        raise UserError(
            f"reference {path} was saved for {metadata['model']} ({metadata['timm_name']}), not {manifest['model']}; compare the same model"
        )
    here = manifest["files"]["weights.safetensors"]["sha256"]
    if metadata["weights_sha256"] != here:
        raise UserError(
            f"reference {path} was saved with other weights of {manifest['model']} (sha256 {metadata['weights_sha256'][:12]} there, "
            f"{here[:12]} here); both hosts must use the same artifact: copy the artifact folder from one host to the other"
        )


def _stored(path: str, metadata: dict, arrays: dict[str, np.ndarray]) -> Stored:
    host = metadata["host"]
    outputs, taps, embeddings = {}, {}, {}
    for key, array in arrays.items():
        kind, _, rest = key.partition("/")
        backend, _, name = rest.partition("/")  # backend names have no "/", layer names might
        if kind in ("outputs", "taps"):
            found = outputs if kind == "outputs" else taps
            found.setdefault(f"{backend}@{host}", {})[name] = array
        elif kind == "embeddings":
            embeddings[f"{backend}@{host}"] = array
    return Stored(
        path=path,
        batch=np.asarray(arrays["batch"], dtype=np.float32),
        input=metadata["input"],
        host=host,
        dtype=metadata["dtype"],
        created=metadata["created_utc"],
        outputs=outputs,
        taps=taps,
        backends={f"{name}@{host}": saved for name, saved in metadata["backends"].items()},
        truth=[{**row, "backend": f"{row['backend']}@{host}"} for row in metadata.get("truth", [])],
        embeddings=embeddings,
    )
