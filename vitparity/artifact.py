"""The artifact folder on disk: atomic publishing, the manifest, and a loader that verifies hashes."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

MANIFEST = "manifest.json"
INPUT_NAME = "pixel_values"  # every artifact's graph: pixel_values -> pooled, tokens
OUTPUT_NAMES = ("pooled", "tokens")
CORE_FILES = ("model.onnx", "weights.safetensors", "sample.npz")
STAGING_PREFIX = ".staging-"
LOCK = ".lock"
DERIVED_SUFFIX = "blocks.onnx"  # blocks.onnx and <variant>.blocks.onnx: made on first use, never required
PREVIOUS_MARK = ".previous"  # marks a previous artifact moved aside during a non-atomic publish
# The exporter's verify thresholds, ONNX against eager; the manifest records the ones that passed it.
VERIFY_DEFAULTS = {"min_cosine": 0.99999, "max_abs": 1e-4}


def sha256(path: Path, follow: bool = True) -> str:
    """The file's sha256; follow=False refuses a symbolic link (O_NOFOLLOW): an artifact's files are its own."""
    fd = os.open(path, os.O_RDONLY | (0 if follow else os.O_NOFOLLOW))
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _readable(path: Path) -> None:
    # mkstemp creates 0600 files; an artifact is meant to be shared, so apply the usual umask. Through a
    # descriptor opened with O_NOFOLLOW: a symbolic link in our folder never carries a chmod to its target.
    umask = os.umask(0)
    os.umask(umask)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o666 & ~umask)
    finally:
        os.close(fd)


def plain_name(name) -> bool:
    """Whether `name` is one file name in its folder: no separator, no `..`, not absolute, not hidden."""
    return (isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and "\0" not in name
            and not name.startswith("."))


def own_file_problem(path: Path) -> str | None:
    """Why `path` is not a regular file of its folder's own (a symbolic link, a device, missing), or None.
    Read with lstat: a link is never followed out of a folder we read or write."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return "is missing"
    if stat.S_ISLNK(found.st_mode):
        return f"is a symbolic link (to {os.readlink(path)}); an artifact holds its own files, never links out of its folder"
    if not stat.S_ISREG(found.st_mode):
        return "is not a regular file"
    return None


def own_folder(path: Path, inside: Path) -> Path:
    """Create the folder `path` under `inside` (and those between), refusing to pass through a symbolic link:
    a link found where one of our folders belongs is removed (the link, never its target) and a real folder
    made there. Returns `path`."""
    path, inside = Path(path), Path(inside)
    current = inside
    for part in path.relative_to(inside).parts:
        current = current / part
        try:
            found = os.lstat(current)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(current)
            found = os.lstat(current)
        if stat.S_ISLNK(found.st_mode) or not stat.S_ISDIR(found.st_mode):
            os.unlink(current)  # a link or a file where our folder belongs: the entry goes, its target is untouched
            os.mkdir(current)
    return path


def remove_tree(path: Path) -> None:
    """Remove `path`: a folder with everything in it (shutil.rmtree never follows links inside), or, when
    `path` is itself a symbolic link or a file, only that entry, never what a link points at."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(found.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


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


_HELD: dict[str, int] = {}  # the artifact locks this process holds, by lock file, with their depth


@contextmanager
def _locked(folder: Path):
    """Hold the exclusive lock of the artifact `folder`: every write to an artifact (an export from its staging to
    its publish, adding variants from reading the manifest to publishing, a derived graph, recover) holds it, so
    writers take turns and each builds on what the one before it published. Re-entrant within a process.

    The lock file sits beside the folder, not in it: publishing swaps the folder itself. flock holds across PID
    namespaces and containers on one host; on NFS it holds where the server supports locks (NFSv4 does).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = str(folder.parent.resolve() / f".{folder.name}{LOCK}")
    if _HELD.get(path):
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD[path] = 1
        try:
            yield
        finally:
            _HELD.pop(path, None)
            fcntl.flock(handle, fcntl.LOCK_UN)


writing = _locked  # the public name: `with artifact.writing(folder): ...` for a write that spans several steps


@contextmanager
def staging(folder: Path):
    """A private folder beside the artifact `folder` for files being written, under the artifact's lock for its
    whole life; removed whatever happens.

    It sits in the same parent, so a finished stage can replace the artifact with one rename. Under the lock, a
    staging folder of this artifact that is there is one whose writer is gone (`recover`)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        recover(folder)
        stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}{STAGING_PREFIX}{os.getpid()}-", dir=folder.parent))
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def recover(folder: Path) -> None:
    """Undo what a killed writer left behind, under the artifact's lock (so no staging folder there is live): remove
    its staging folders and, if it died between the two renames of a publish without an atomic exchange, move the
    previous artifact back. Only real folders of this user are touched."""
    with _locked(folder):
        for leftover in folder.parent.glob(f".{folder.name}{STAGING_PREFIX}*"):
            if not _ours(leftover):
                continue
            if (leftover / PREVIOUS_MARK).is_file() and not (folder / MANIFEST).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(leftover, folder)
                (folder / PREVIOUS_MARK).unlink()
            else:
                shutil.rmtree(leftover, ignore_errors=True)
        for stage in folder.glob(f"{STAGING_PREFIX}*") if folder.is_dir() else ():  # left by older versions
            if _ours(stage):
                shutil.rmtree(stage, ignore_errors=True)


def _ours(path: Path) -> bool:
    """A real folder (never a link) of this user."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the kernel or the filesystem cannot exchange
    raise OSError(code, os.strerror(code), str(a))


def publish(folder: Path, staged: dict[str, Path], manifest: dict, replace: bool = True) -> None:
    """Make the staged files part of the artifact `folder`, the manifest last, recording every file's sha256.

    With replace=True the staged files form a new artifact: they and its manifest are completed in
    their staging folder, which then takes the place of `folder` in one atomic exchange of the two
    folders. Killed at any instant, an export leaves the previous artifact or the new one, whole.
    Where the exchange is unsupported, the previous folder is moved aside under a mark first, and
    `recover` moves it back if the export dies before the new folder is in place.
    With replace=False the files are added to the artifact that is there (its manifest is kept).
    """
    with _locked(folder):
        if not replace:
            base = read_manifest(folder)
            files = dict(base.get("files", {}))
            for name, path in staged.items():
                files[name] = _record(path)
                os.replace(path, folder / name)
            write_json_atomic(folder / MANIFEST, {**base, **manifest, "files": files})
            return
        stage = {path.parent for path in staged.values()}
        if len(stage) != 1:
            raise ValueError("a new artifact's files must all be in one staging folder")
        stage = stage.pop()
        files = {name: _record(path) for name, path in staged.items()}
        write_json_atomic(stage / MANIFEST, {**manifest, "files": files})
        # mkdtemp made the stage 0700; the published folder is as shareable as its 0644 files (the umask's mode).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)
        _fsync_dir(stage)
        if not folder.exists():
            os.rename(stage, folder)
        elif not _exchange(stage, folder):
            # No atomic exchange here: move the previous artifact aside under a mark, so that
            # recover() can move it back if this process dies before the new one is in place.
            (folder / PREVIOUS_MARK).touch()
            previous = folder.parent / f".{folder.name}{STAGING_PREFIX}{os.getpid()}-previous"
            os.rename(folder, previous)
            os.rename(stage, folder)
            shutil.rmtree(previous, ignore_errors=True)
        _fsync_dir(folder.parent)
        # After an exchange `stage` holds the previous artifact; the staging context removes it.


def publish_stage(folder: Path, stage: Path, manifest: dict) -> None:
    """Publish every file of the staging folder `stage` as the new artifact `folder` (see publish)."""
    publish(folder, {p.name: p for p in sorted(stage.iterdir()) if p.is_file()}, manifest)


def _record(path: Path) -> dict:
    problem = own_file_problem(path)
    if problem:
        raise UserError(f"{path} {problem}")
    _readable(path)
    return {"sha256": sha256(path, follow=False), "bytes": os.lstat(path).st_size}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as error:
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
        with contextlib.suppress(OSError):  # a read-only root: nothing to recover there anyway
            recover(folder)
    if not (folder / MANIFEST).is_file():
        if folder.is_dir() and any((folder / name).exists() for name in CORE_FILES):
            raise UserError(f"artifact {folder} is incomplete (no {MANIFEST}): its export did not finish; {export_hint}")
        raise UserError(f"no artifact for {key} under {root}/; {export_hint}")
    manifest = read_manifest(folder)
    problem = manifest_problem(manifest)
    if problem:
        raise UserError(f"{folder / MANIFEST} is malformed: {problem}; {export_hint}")
    artifact = Artifact(folder=folder, manifest=manifest)
    if verify:
        verify_files(artifact, export_hint)
    return artifact


REQUIRED_KEYS = {"model": str, "timm_name": str, "data_config": dict, "files": dict}


def verify_warnings(manifest: dict) -> list[str]:
    """A warning when the artifact was verified with thresholds looser than the defaults, or none recorded."""
    thresholds = manifest.get("verify", {}).get("thresholds")
    if not isinstance(thresholds, dict):
        return [f"{manifest.get('model', 'the artifact')} records no verify thresholds (exported by an older "
                f"vit-parity): re-export it to know what it was verified against"]
    looser = []
    if thresholds.get("min_cosine", 1.0) < VERIFY_DEFAULTS["min_cosine"]:
        looser.append(f"--min-cosine {thresholds['min_cosine']:g} (default {VERIFY_DEFAULTS['min_cosine']:g})")
    if thresholds.get("max_abs", 0.0) > VERIFY_DEFAULTS["max_abs"]:
        looser.append(f"--max-abs {thresholds['max_abs']:g} (default {VERIFY_DEFAULTS['max_abs']:g})")
    if not looser:
        return []
    return [f"{manifest.get('model', 'the artifact')} was verified looser than the defaults: {', '.join(looser)}; "
            f"re-export it without those options for an artifact verified as strictly as usual"]


def _positive_ints(value, count: int) -> bool:
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def _finite_numbers(value, count: int, positive: bool = False) -> bool:
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
                    for v in value))


def data_config_problem(config: dict) -> str | None:
    """What is wrong with a manifest's data_config, or None: 3 positive ints, one mean and std per channel."""
    size = config.get("input_size")
    if not _positive_ints(size, 3):
        return f"data_config.input_size is {size!r}, not 3 positive integers (channels, height, width)"
    for key, positive in (("mean", False), ("std", True)):
        if not _finite_numbers(config.get(key), size[0], positive):
            return (f"data_config.{key} is {config.get(key)!r}, not {size[0]} finite numbers"
                    + (" above 0" if positive else "") + " (one per channel)")
    return None


def manifest_problem(manifest) -> str | None:
    """What is wrong with the manifest's shape, in words, or None: the loader never trusts its layout blindly."""
    if not isinstance(manifest, dict):
        return f"it holds a {type(manifest).__name__}, not an object"
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            return f"'{key}' is missing or not a{'n' if kind is dict else ''} {'object' if kind is dict else 'string'}"
    for name, record in manifest["files"].items():
        if not plain_name(name):
            return f"the file name {name!r} is not a plain name inside the artifact folder (no '/', '..' or leading '.')"
        if not (isinstance(record, dict) and _is_digest(record.get("sha256")) and isinstance(record.get("bytes"), int)):
            return f"the record of {name} is not {{sha256: 64 hex digits, bytes}}"
    kwargs = manifest.get("model_kwargs", {})
    if not (isinstance(kwargs, dict) and all(isinstance(key, str) and key.isidentifier() for key in kwargs)):
        return "'model_kwargs' is not an object of keyword arguments"
    return data_config_problem(manifest["data_config"])


def model_kwargs(manifest: dict) -> dict:
    """The --model-kwargs the artifact was exported with, for timm.create_model: {} for none (and for an artifact
    made before they were recorded)."""
    return dict(manifest.get("model_kwargs") or {})


def drop(folder: Path, names: list[str]) -> dict:
    """Remove the files `names` (variants, derived graphs) from the artifact `folder` and its manifest, under its
    lock: the manifest without them is written first, so a reader never sees a listed file that is gone. Returns
    the new manifest."""
    with _locked(folder):
        manifest = read_manifest(folder)
        manifest["files"] = {k: v for k, v in manifest.get("files", {}).items() if k not in names}
        if isinstance(manifest.get("variants"), dict):
            manifest["variants"] = {k: v for k, v in manifest["variants"].items() if k not in names}
        write_json_atomic(folder / MANIFEST, manifest)
        for name in names:
            if plain_name(name):
                remove_tree(folder / name)
    return manifest


def _is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def verify_files(artifact: Artifact, export_hint: str = "re-export the model") -> None:
    """Raise a UserError naming the first file that is missing, truncated or changed.

    Derived files (blocks.onnx, <variant>.blocks.onnx) are not checked here: whoever uses one checks and rebuilds it, so a
    missing or damaged derived file never makes the artifact unusable.
    """
    files = artifact.manifest.get("files", {})
    for name in CORE_FILES:
        if name not in files:
            raise UserError(f"artifact {artifact.folder} lists no {name} in its manifest; {export_hint}")
    for name, record in files.items():
        if name.endswith(DERIVED_SUFFIX):
            continue
        problem = file_problem(artifact, name)
        if problem:
            raise UserError(f"artifact file {artifact.path(name)} {problem}; {export_hint}")


def file_problem(artifact: Artifact, name: str) -> str | None:
    """What is wrong with the artifact's file `name` against its manifest record, or None: missing, a link,
    truncated, changed, or a graph whose external data lies outside the folder."""
    path, record = artifact.path(name), artifact.manifest["files"][name]
    problem = own_file_problem(path)
    if problem:
        return problem
    size = os.lstat(path).st_size
    if size != record["bytes"]:
        return f"is truncated or changed: {size} bytes, manifest says {record['bytes']}"
    if sha256(path, follow=False) != record["sha256"]:
        return "was modified after export (sha256 differs from the manifest)"
    if name.endswith(".onnx"):
        return external_data_problem(path)
    return None


def damaged(artifact: Artifact) -> list[str]:
    """The names of the artifact's files (derived ones aside) that are missing, links, truncated or changed."""
    return [name for name in artifact.manifest.get("files", {})
            if not name.endswith(DERIVED_SUFFIX) and file_problem(artifact, name)]


def external_data_problem(path: Path) -> str | None:
    """Why the ONNX graph at `path` refers to weights outside its own folder, or None.

    onnx >= 1.21 refuses such paths itself when it loads the data; this check reads only the graph's
    records (no weights), so every graph of an artifact is checked before anything loads it, whatever
    the onnx version: each location must be a plain file name in the graph's folder, a regular file there.
    """
    if not _mentions(Path(path), b"location"):  # no external data record in the graph: nothing to check
        return None
    import onnx  # a second here (ml_dtypes): paid only by a graph that may refer to external data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - onnx raises DecodeError, ValueError...: a damaged graph is a finding
        return f"is not a readable ONNX graph ({type(error).__name__})"
    seen = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        if location in seen:
            continue
        seen.add(location)
        if not plain_name(location):
            return f"refers to external data at {location!r}, outside the artifact folder"
        problem = own_file_problem(Path(path).parent / location)
        if problem:
            return f"refers to external data {location} that {problem}"
    return None


def _mentions(path: Path, word: bytes) -> bool:
    """Whether the file at `path` holds the bytes `word` anywhere (a protobuf keeps an external data record's key,
    "location", as plain bytes); True when it cannot be read, so that the full check runs and says why."""
    import mmap

    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return False
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return data.find(word) != -1
    except (OSError, ValueError):
        return True


def _tensors(graph):
    """Every tensor a graph holds: its initializers and the tensors in node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(sub)
