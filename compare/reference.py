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

from vitparity.artifact import write_atomic
from vitparity.errors import UserError

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
            BackendStatus.of(name, "stored", f"saved on {self.host} at {self.created} in {self.path}",
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
            "details": status.details, "tolerance": status.variant_class or backend.tolerance,
            "precision": status.ran_in,  # a variant's label says what it computed; its class judges it
        }
        for kind, found in (("outputs", run.outputs), ("taps", run.taps)):
            for name, array in found.get(status.name, {}).items():
                arrays[f"{kind}/{status.name}/{name}"] = np.asarray(array)
        if report.input.get("kind") == "images" and "embeddings" in run.images.get(status.name, {}):
            # --images: every image's pooled embedding, in input order
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
        _check_sizes(Path(path), manifest)  # before any member is read: a declared 1e12 elements is refused unread
        metadata, arrays = _read(Path(path))
        _check(path, metadata, manifest)
        problem = schema_problem(metadata, arrays, manifest)
        if problem:
            raise UserError(f"reference {path} is malformed: {problem}; save it again with --save-reference")
        return _stored(str(path), metadata, arrays)
    except UNREADABLE as error:
        why = (str(error).splitlines() or [""])[0]
        raise UserError(
            f"reference {path} is truncated or not a reference file ({type(error).__name__}: {why}); "
            f"copy it again or save a new one with --save-reference"
        ) from error


MAX_BATCH = 4096  # rows of one saved batch (input, outputs, taps)
MAX_IMAGES = 1_000_000  # rows of the saved per-image embeddings of an --images reference


def _check_sizes(path: Path, manifest: dict) -> None:
    """Refuse a member whose declared size no reference of this model can have, from the npy headers alone.

    The bound comes from the model's shapes: a batch of at most MAX_BATCH rows of the largest per-image
    array (input or tokens) in float64, or MAX_IMAGES pooled embeddings. A zip member that inflates past
    its own header's size (a zip bomb) is refused too, since its declared size is then what is checked.
    """
    channels, height, width = manifest["data_config"]["input_size"]
    shapes = manifest.get("outputs", {})
    tokens = shapes.get("tokens", [None, 0, 0])[1:]
    per_item = max(channels * height * width, int(np.prod([d for d in tokens if isinstance(d, int)] or [0])))
    pooled = (shapes.get("pooled") or [None, 4096])[-1]
    limit = max(MAX_BATCH * per_item * 8, MAX_IMAGES * (pooled if isinstance(pooled, int) else 4096) * 8)
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.file_size > limit + 4096:  # + the npy header
                raise ValueError(f"member {info.filename} inflates to {info.file_size:,} bytes, over the {limit:,} a reference "
                                 f"of {manifest['model']} can hold")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = header(member)
            if dtype.hasobject:
                raise ValueError(f"member {info.filename} holds Python objects")
            declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if declared > limit:
                raise ValueError(f"member {info.filename} declares {declared:,} bytes, over the {limit:,} a reference of "
                                 f"{manifest['model']} can hold")


def _is_number(value, optional: bool = False) -> bool:
    return (value is None and optional) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def schema_problem(metadata: dict, arrays: dict[str, np.ndarray], manifest: dict) -> str | None:
    """What in a reference's metadata or arrays does not have the shape `save` writes, in words, or None.
    Every field the comparison reads is checked here, so that nothing later meets a wrong type."""
    from vitparity.tolerances import TOLERANCES

    for key in ("host", "created_utc", "dtype", "reference"):
        if not isinstance(metadata.get(key), str):
            return f"'{key}' is not a string"
    described = metadata.get("input")
    if not isinstance(described, dict):
        return "'input' is not an object"
    if not (isinstance(described.get("sha256"), str) and isinstance(described.get("source", ""), str)
            and isinstance(described.get("kind", ""), str)):
        return "'input' lacks its sha256, source or kind as strings"
    shape = described.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and d >= 0 for d in shape)):
        return "'input.shape' is not 4 counts"
    if described.get("kind") == "images":
        count, images = described.get("count"), described.get("images")
        if not (isinstance(count, int) and isinstance(images, list) and len(images) == count
                and all(isinstance(i, dict) and isinstance(i.get("sha256"), str) and isinstance(i.get("path"), str) for i in images)):
            return "'input.images' is not a list of {path, sha256} of 'input.count' images"
    batch = arrays.get("batch")
    if batch is None or batch.ndim != 4 or batch.dtype.kind != "f" or list(batch.shape[1:]) != list(manifest["data_config"]["input_size"]):
        return f"'batch' is not a float batch of {manifest['data_config']['input_size']} inputs"
    backends = metadata.get("backends")
    if not isinstance(backends, dict):
        return "'backends' is not an object"
    for name, saved in backends.items():
        if not (isinstance(saved, dict) and isinstance(saved.get("details"), dict) and saved.get("tolerance") in TOLERANCES
                and (saved.get("precision") == "fp32" or saved.get("precision") in TOLERANCES)):
            return f"backend {name!r} lacks its details, a known tolerance class or a known precision"
        for output in ("pooled", "tokens"):
            found = arrays.get(f"outputs/{name}/{output}")
            if found is None or found.dtype.kind != "f" or found.ndim < 2 or found.shape[0] != batch.shape[0]:
                return f"backend {name!r} has no float '{output}' output of {batch.shape[0]} rows"
        if described.get("kind") == "images":
            found = arrays.get(f"embeddings/{name}/pooled")
            pooled = arrays[f"outputs/{name}/pooled"]
            if found is None or found.dtype.kind != "f" or found.shape != (described["count"], *pooled.shape[1:]):
                return f"backend {name!r} has no pooled embedding for each of the {described['count']} images"
    for key, array in arrays.items():
        kind, _, rest = key.partition("/")
        owner = rest.partition("/")[0]
        if key != "batch" and (kind not in ("outputs", "taps", "embeddings") or owner not in backends):
            return f"member {key!r} belongs to no saved backend"
        if array.dtype.kind not in "fiub":
            return f"member {key!r} is not numeric"
    truth = metadata.get("truth", [])
    if not (isinstance(truth, list) and all(
            isinstance(row, dict) and set(row) <= {"backend", "output", "rel_error", "ratio", "truth"}
            and isinstance(row.get("backend"), str) and isinstance(row.get("output"), str)
            and _is_number(row.get("rel_error")) and "ratio" in row and _is_number(row["ratio"], optional=True) for row in truth)):
        return "'truth' is not a list of {backend, output, rel_error, ratio} rows"
    return None


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("a single .npy array, not an .npz archive")
    with data:
        # Read every member now: a damaged member only shows itself when it is read.
        arrays = {key: data[key] for key in data.files}
    if "metadata" not in arrays:
        raise KeyError("no metadata member")
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
    if (metadata.get("model"), metadata.get("timm_name")) != (manifest["model"], manifest["timm_name"]):
        raise UserError(
            f"reference {path} was saved for {metadata['model']} ({metadata['timm_name']}), not {manifest['model']}; compare the same model"
        )
    here = manifest["files"]["weights.safetensors"]["sha256"]
    if not isinstance(metadata.get("weights_sha256"), str):
        raise UserError(f"reference {path} records no weights sha256; save it again with --save-reference")
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
