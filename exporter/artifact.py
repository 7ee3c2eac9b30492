"""The artifact folder on disk: atomic publishing, the manifest, and a loader that verifies hashes."""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

MANIFEST = "manifest.json"
CORE_FILES = ("model.onnx", "weights.safetensors", "sample.npz")
STAGING_PREFIX = ".staging-"
LOCK = ".lock"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _readable(path: Path) -> None:
    # mkstemp creates 0600 files; an artifact is meant to be shared, so apply the usual umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never part of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _readable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _strict(value):
    """`value` with NaN and infinities as None: strict JSON has no spelling for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` as strict JSON (NaN and Inf become null), atomically."""
    write_atomic(path, (json.dumps(_strict(data), indent=2, allow_nan=False) + "\n").encode())


@contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on the artifact folder, so concurrent exports publish one at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def staging(folder: Path):
    """A private folder beside the artifact for files being written; removed whatever happens."""
    folder.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(folder)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove_abandoned_staging(folder: Path) -> None:
    # A killed export leaves its staging folder behind; its pid tells whether anyone still owns it.
    for stage in folder.glob(f"{STAGING_PREFIX}*"):
        pid = stage.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(folder: Path, staged: dict[str, Path], manifest: dict, replace: bool = True) -> None:
    """Move staged files into `folder` and write the manifest last, recording every file's sha256.

    With replace=True the staged files form a new artifact: the old manifest is removed first, so
    an interrupted publish leaves a folder the loader refuses rather than a mix it accepts. With
    replace=False the files are added to the artifact that is there (its manifest is kept).
    """
    with _locked(folder):
        if replace:
            (folder / MANIFEST).unlink(missing_ok=True)
            base = {}
        else:
            base = read_manifest(folder)
        files = dict(base.get("files", {}))
        for name, path in staged.items():
            files[name] = {"sha256": sha256(path), "bytes": path.stat().st_size}
            _readable(path)
            os.replace(path, folder / name)
        write_json_atomic(folder / MANIFEST, {**base, **manifest, "files": files})


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise UserError(f"{folder / MANIFEST} is unreadable ({error}); re-export the model") from error


@dataclass(frozen=True)
class Artifact:
    """A verified artifact folder and its manifest."""

    folder: Path
    manifest: dict

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def key(self) -> str:
        return self.folder.name


def artifact_folder(root: Path | str, key: str) -> Path:
    return Path(root) / key


def load(root: Path | str, key: str, verify: bool = True) -> Artifact:
    """Open the artifact of `key` under `root`; with verify, check every file's size and sha256."""
    folder = artifact_folder(root, key)
    export_hint = f"run make export MODEL={key}" + (f" ARTIFACTS={root}" if Path(root) != Path("artifacts") else "")
    if not (folder / MANIFEST).is_file():
        if folder.is_dir() and any((folder / name).exists() for name in CORE_FILES):
            raise UserError(f"artifact {folder} is incomplete (no {MANIFEST}): its export did not finish; {export_hint}")
        raise UserError(f"no artifact for {key} under {root}/; {export_hint}")
    manifest = read_manifest(folder)
    artifact = Artifact(folder=folder, manifest=manifest)
    if verify:
        verify_files(artifact, export_hint)
    return artifact


def verify_files(artifact: Artifact, export_hint: str = "re-export the model") -> None:
    """Raise a UserError naming the first file that is missing, truncated or changed."""
    files = artifact.manifest.get("files", {})
    for name in CORE_FILES:
        if name not in files:
            raise UserError(f"artifact {artifact.folder} lists no {name} in its manifest; {export_hint}")
    for name, record in files.items():
        path = artifact.path(name)
        if not path.is_file():
            raise UserError(f"artifact file {path} is missing; {export_hint}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise UserError(
                f"artifact file {path} is truncated or changed: {size} bytes, manifest says {record['bytes']}; {export_hint}"
            )
        if sha256(path) != record["sha256"]:
            raise UserError(f"artifact file {path} was modified after export (sha256 differs from the manifest); {export_hint}")
