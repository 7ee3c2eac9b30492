"""Helpers shared by the tests: subprocess CLIs, artifact edits, table matching, a CPU low-precision backend."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from compare.backends.base import TORCH_AND_TIMM
from compare.backends.onnxruntime import OrtCpu
from compare.backends.torch_cpu import TorchCpu
from compare.backends.torch_eager import TorchEager

ROOT = Path(__file__).resolve().parents[1]
TINY = "test_vit"  # timm's own tiny ViT (160x160): fast enough for tests that export or mutate


def runnable(*names: str) -> list[str]:
    """Those of the named backends (all, by default) whose cheap probe passes on this host: what a test may
    expect to run. On a CUDA or Ascend host that includes the accelerator rows."""
    from compare.backends import BACKENDS, BackendUnavailable

    found = []
    for name in names or tuple(BACKENDS):
        try:
            BACKENDS[name].probe()
        except BackendUnavailable:
            continue
        found.append(name)
    return found


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 600):
    """Run `python -m module args` from the project root in a subprocess; `env` replaces the environment."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=os.environ.copy() if env is None else env,
        capture_output=True, text=True, timeout=timeout,
    )


def make_argv(tmp_path: Path, target: str, *variables: str) -> list[list[str]]:
    """Run `make -s target variables...` for real, with PYTHON a recorder that runs nothing: the argv each
    `$(PYTHON) ...` line of the recipe was given, in order, as the shell really passed it."""
    recorder, log = tmp_path / "python-recorder", tmp_path / "argv.jsonl"
    recorder.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        "with open(os.environ['ARGV_LOG'], 'a') as log:\n    log.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    recorder.chmod(0o755)
    log.unlink(missing_ok=True)
    subprocess.run(["make", "-s", target, f"PYTHON={recorder}", *variables], cwd=ROOT, env={**os.environ, "ARGV_LOG": str(log)},
                   check=True, capture_output=True, text=True, timeout=60)
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def shared(tmp_path_factory, worker_id, name: str, make) -> Path:
    """Folder `name`, made once for the whole run by `make(folder)` and shared by the pytest-xdist workers: the first
    worker to ask makes it under a lock while the other waits, instead of both making it (a module or session
    fixture is otherwise made once per worker). Its markers lie beside it, so the folder holds only what `make` wrote."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    parent = base.parent if worker_id != "master" else base  # xdist: basetemp/popen-gwN, one parent per run
    folder = parent / name
    with open(parent / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (parent / f"{name}.done").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a maker that failed in another worker left
            folder.mkdir()
            make(folder)
            (parent / f"{name}.done").touch()
    return folder


def call(main, capsys, *args):
    """Run a CLI's main in-process; return (exit code, stdout, stderr)."""
    code = main([*args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    """The single line of a user error; fails when stderr holds more, or a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def parents() -> dict[int, int]:
    """Every live process's parent, {pid: ppid}, read from /proc once (zombies left out). Callers that poll take one
    snapshot per turn: a walk that read all of /proc again for each process of a tree cost the sweep test's
    polling 9.3 s of CPU (5.4 s this way), on the cores the sweep itself runs on."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found[int(stat.parent.name)] = int(fields[1])
    return found


def children(pid: int, tree: dict[int, int] | None = None) -> list[int]:
    """The live child processes of `pid` (in the snapshot `tree` of parents(), or read now)."""
    return [child for child, parent in (parents() if tree is None else tree).items() if parent == pid]


def descendants(pid: int, tree: dict[int, int] | None = None) -> list[int]:
    """Every live process below `pid`: its children, theirs, and so on (in the snapshot `tree`, or read now)."""
    below: dict[int, list[int]] = {}
    for child, parent in (parents() if tree is None else tree).items():
        below.setdefault(parent, []).append(child)
    found, queue = [], [pid]
    while queue:
        for child in below.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::ffff:127.0.0.1, ::1
ANY = {"00000000", "00000000000000000000000000000000"}


def foreign_sockets(pids, allow: tuple[tuple[str, str], ...] = ()) -> tuple[int, list[str]]:
    """(how many TCP sockets processes `pids` hold, those whose local or remote address is not the loopback
    one; a socket not yet connected has remote address 0). Read from /proc: no tool needed. `allow`: (a piece of the
    holder's command line, the remote address as /proc writes it) pairs that are not counted as foreign."""
    holders = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd) if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    holders[target[8:-1]] = pid
        except OSError:
            continue
    bad, checked = [], 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1].split(":")[0], fields[2].split(":")[0], fields[9]
            if inode in holders:
                checked += 1
                if local in LOOPBACK and remote in LOOPBACK | ANY:
                    continue
                holder = command_line(holders[inode])  # read for a foreign socket only: this runs every 0.2 s
                if not any(part in holder and fields[2] == address for part, address in allow):
                    bad.append(f"{table}: {fields[1]} -> {fields[2]} ({holder[:80]})")
    return checked, bad


def gone(pid: int, within_s: float) -> bool:
    """True once process `pid` has exited (or is a zombie) within `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def wait_for(predicate, within_s: float, step_s: float = 0.1):
    """Poll `predicate` until it returns something true; that value, or None after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    return None


def rewrite_weights(folder: Path, change) -> None:
    """Apply `change(state_dict)` to an artifact's weights.safetensors and update the manifest hash,
    so the loader accepts the edited artifact as genuine."""
    from safetensors.torch import load_file, save_file

    from vitparity.artifact import sha256

    path = folder / "weights.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def has_row(text: str, *cells: str) -> bool:
    """True when one line of a rendered Rich table holds `cells` in order, in adjacent columns."""
    pattern = r"\s*│\s*".join(re.escape(c) for c in cells)
    return re.search(pattern, text) is not None


class LowPrecisionCpu(TorchEager):
    """The accelerator code path (follows --dtype) on the CPU, so fp16/bf16 runs are testable here."""

    name = "torch-cpu-lowp"
    device = "cpu"
    precisions = ("fp16", "bf16")
    imports_first = TORCH_AND_TIMM  # on the CPU, as torch-cpu: warm-started where the host allows (vitparity/warm.py)


class SecondLowPrecisionCpu(LowPrecisionCpu):
    """The same again under another name: one as the reference (which runs fp32 whatever --dtype says), one not."""

    name = "torch-cpu-lowp-2"


# ---------------------------------------------------------------------------------------------
# Backends that misbehave, for the worker boundary. They live here so a worker process can import them.
# Those whose subject is the process boundary (a crash, a hang, the working directory, a bug) are onnxruntime
# rows: their workers start in a second where a torch worker takes about four (torch and timm imports).


class SecondOrtCpu(OrtCpu):
    """ort-cpu again under another name. With `ORT_ONLY` (--reference ort-cpu and a seeded input) a run starts no
    process that imports torch: for tests whose subject is the orchestration, the verdict or the files."""

    name = "ort-cpu-2"


ORT_ONLY = ("--backends", "ort-cpu,ort-cpu-2", "--reference", "ort-cpu", "--input", "random")


class GlareOrtCpu(OrtCpu):
    """ort-cpu on a device that fails on one kind of image: on a bright input (mean normalised value above 0.6, a
    white or washed-out frame: above 0.6 in test_vit's [-1, 1] scale) its outputs pick up noise that grows with the
    brightness; on anything else it is ort-cpu."""

    name = "ort-glare"

    def run(self, batch):
        import numpy as np

        found = super().run(batch)
        brightness = np.asarray(batch, np.float64).reshape(len(batch), -1).mean(axis=1)
        noise = np.random.default_rng(0)
        for output, values in found.items():
            for item, level in enumerate(brightness):
                if level > 0.6:
                    values[item] += (0.05 * (level - 0.6) * np.abs(values[item]).max()
                                     * noise.standard_normal(values[item].shape)).astype(values.dtype)
        return found


class RestlessOrtCpu(OrtCpu):
    """ort-cpu on a device whose kernels are not deterministic: each call adds a little noise of its own (a new seed
    per call), as an accumulation in another order does on some NPUs, at a scale past fp32 rounding."""

    name = "ort-restless"

    def run(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        noise = __import__("numpy").random.default_rng(self.calls)
        return {k: v + (1e-3 * noise.standard_normal(v.shape)).astype(v.dtype) * abs(v).max() for k, v in super().run(batch).items()}


class FaultyCpu(TorchCpu):
    """torch-cpu on a device with one faulty kernel: one part of one block computes a few percent off (its weights
    scaled), as a wrong kernel for that op would. Which block and part, and by how much, come from the environment
    (FAULT_BLOCK, FAULT_PART such as "mlp.fc1" or "attn.qkv", FAULT_SCALE), which the worker inherits."""

    name = "faulty-cpu"
    tolerance = "same-host"
    fault: tuple[int, str] | None = None  # (block, part) in place of the environment's

    def load(self, artifact, precision):
        import torch

        facts = super().load(artifact, precision)
        index, part = self.fault or (int(os.environ["FAULT_BLOCK"]), os.environ["FAULT_PART"])
        with torch.no_grad():
            self.module.model.blocks[index].get_submodule(part).weight.mul_(float(os.environ.get("FAULT_SCALE", "1.05")))
        return facts


class FaultyQkv(FaultyCpu):
    """A second faulty device for the same run: its fault is in block 3's attn.qkv."""

    name = "faulty-qkv"
    fault = (3, "attn.qkv")


class WrongAtThree(TorchCpu):
    """torch-cpu whose kernel is wrong at batch size 3 only (outputs 2% off), as some kernels are at some sizes
    (onnxruntime#10636, TensorRT#1697)."""

    name = "wrong-at-three"
    tolerance = "same-host"

    def infer(self, prepared):
        pooled, tokens = super().infer(prepared)
        return (pooled * 1.02, tokens * 1.02) if prepared.shape[0] == 3 else (pooled, tokens)


class Crashing:
    """Loads like the backend it is mixed into, then dies of SIGSEGV in the middle of the run, as a vendor library
    might."""

    tolerance = "accelerator"

    def run(self, batch):
        os.kill(os.getpid(), signal.SIGSEGV)


class Hanging:
    """Never answers, like a device stuck in a driver call; writes its pid to $HANGS_PID_FILE first, when set."""

    tolerance = "accelerator"

    def load(self, artifact, precision):
        if os.environ.get("HANGS_PID_FILE"):
            Path(os.environ["HANGS_PID_FILE"]).write_text(str(os.getpid()))
        time.sleep(3600)


class Segfaults(Crashing, OrtCpu):
    name = "segfaults"


class Hangs(Hanging, OrtCpu):
    name = "hangs"


class SegfaultsEager(Crashing, TorchCpu):  # warm-started where the host allows (vitparity/warm.py)
    name = "segfaults-eager"


class HangsEager(Hanging, TorchCpu):
    name = "hangs-eager"


class ReportsCwd(OrtCpu):
    """ort-cpu that also reports the working directory its worker was started in."""

    name = "reports-cwd"
    tolerance = "accelerator"

    def load(self, artifact, precision):
        return {**super().load(artifact, precision), "cwd": os.getcwd()}


class BuggyLayers(OrtCpu):
    """ort-cpu whose per-block code has a bug (a TypeError in Python code): an error row, never a warning."""

    name = "buggy-layers"
    tolerance = "accelerator"

    def layers(self, artifact, batch):
        return {"block_0": batch} + 1


class DecomposedCpu(OrtCpu):
    """ort-cpu on the LayerNorm-decomposed graph, as ort-cann runs it: its taps must come from that graph too."""

    name = "ort-cpu-decomposed"

    def model_file(self, artifact):
        return artifact.path("model.ln-decomposed.onnx")


# ---------------------------------------------------------------------------------------------
# Stand-ins for vendor libraries, put first on PYTHONPATH in a subprocess.

# The real onnxruntime, loaded from further down sys.path, that lists extra providers it does not
# have (STANDIN_PROVIDERS, JSON) and logs the providers every session is asked for (STANDIN_LOG).
# Sessions are real: onnxruntime itself decides, and falls back to the CPU as it does on a host
# whose provider library cannot load.
LYING_ONNXRUNTIME = '''
import importlib.machinery, importlib.util, json, os, sys
_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.machinery.PathFinder.find_spec(
    "onnxruntime", [p for p in sys.path if os.path.abspath(p or ".") != _here])
_real = importlib.util.module_from_spec(_spec)
sys.modules["onnxruntime"] = _real
_spec.loader.exec_module(_real)
_listed = _real.get_available_providers
_real.get_available_providers = lambda: [*json.loads(os.environ["STANDIN_PROVIDERS"]), *_listed()]
_Session = _real.InferenceSession


class InferenceSession(_Session):
    def __init__(self, path, sess_options=None, providers=None, **kwargs):
        with open(os.environ["STANDIN_LOG"], "a") as log:
            log.write(json.dumps([list(p) if isinstance(p, tuple) else p for p in providers or []]) + "\\n")
        super().__init__(path, sess_options, providers=providers, **kwargs)


_real.InferenceSession = InferenceSession
'''

# An onnxruntime built for NumPy 1.x, imported under NumPy 2: what onnxruntime-cann 1.24.4 does.
NUMPY1_ONNXRUNTIME = '''
import sys
print("A module that was compiled using NumPy 1.x cannot be run in\\nNumPy 2.x as it may crash.", file=sys.stderr)
raise ImportError("numpy.core.multiarray failed to import")
'''

# torch_npu on a host with an NPU, as far as the backend's precision code can tell: torch.npu with
# torch_npu 2.14's HF32 defaults (conv on, matmul off), and a get_device_name that asserts.
FAKE_TORCH_NPU = '''
import types
import torch

def _assert(*args):
    raise AssertionError("unknown SoC")

torch.npu = types.SimpleNamespace(
    is_available=lambda: True, set_device=lambda device: None, get_device_name=_assert, synchronize=lambda: None,
    matmul=types.SimpleNamespace(allow_hf32=False), conv=types.SimpleNamespace(allow_hf32=True),
)
__version__ = "2.14.0.standin"
'''


def stand_in(root: Path, package: str, source: str) -> dict:
    """Write `source` as package `package` under `root`; return an environment that puts it first on sys.path."""
    (root / package).mkdir(parents=True, exist_ok=True)
    (root / package / "__init__.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(ROOT)])
    return env


def make_images(folder: Path, count: int, extras: bool = True) -> Path:
    """`count` distinct photos made from the bundled one (crops, flips, colour shifts, other sizes, a 16-bit
    PNG among them) under `folder` and a subfolder, plus, with `extras`, a corrupt JPEG and a text file."""
    import numpy as np
    from PIL import Image, ImageOps

    from compare.inputs import default_image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "more").mkdir(exist_ok=True)
    base = Image.open(default_image()).convert("RGB")
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = base.size
        left, top = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        image = base.crop((left, top, left + w // 2 + int(rng.integers(0, w // 3)), top + h // 2 + int(rng.integers(0, h // 3))))
        if i % 2:
            image = ImageOps.mirror(image)
        if i % 3 == 1:
            image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-40, 40, 3), 0, 255).astype(np.uint8))
        image = image.resize((96 + 8 * (i % 7), 96 + 8 * (i % 5)))
        target = folder / ("more" if i % 4 == 3 else "") / f"photo_{i:03d}"
        if i == 5:  # a 16-bit greyscale PNG
            grey = (np.asarray(image.convert("L"), dtype=np.uint16) * 257)
            Image.fromarray(grey).save(target.with_suffix(".png"))
        else:
            image.save(target.with_suffix(".jpg" if i % 2 else ".png"))
    if extras:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        (folder / "notes.txt").write_text("not an image\n")
    return folder


# Loaded at start-up by the exporter under test (a sitecustomize on PYTHONPATH): every rename,
# replace or unlink of a path under the artifacts root takes 0.1 s longer, so the publish step,
# normally a few milliseconds, is a window wide enough to kill the exporter at many instants in it.
# The first such call on a manifest (publishing has begun) touches SLOW_MARK.
SLOW_FILESYSTEM = """
import os, time
_root, _mark = os.environ["SLOW_ROOT"], os.environ["SLOW_MARK"]
def _slow(call):
    def slowed(*args, **kwargs):
        paths = [os.fsdecode(a) for a in args if isinstance(a, (str, bytes, os.PathLike))]
        if any(_root in p and "manifest.json" in p for p in paths) and not os.path.exists(_mark):
            open(_mark, "w").close()
        result = call(*args, **kwargs)
        if any(_root in p for p in paths):
            time.sleep(0.1)
        return result
    return slowed
for _name in ("rename", "replace", "unlink"):
    setattr(os, _name, _slow(getattr(os, _name)))
"""


def kill_at(root, delay, slow_site, *args, command=None):
    """Start `python -m exporter TINY --artifacts root args` (or `command`) and SIGKILL it `delay` seconds after it
    starts or, with `slow_site` (a folder holding SLOW_FILESYSTEM), `delay` seconds after publishing begins."""
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    mark = (slow_site or root) / "publishing"
    mark.unlink(missing_ok=True)
    if slow_site:
        env |= {"PYTHONPATH": str(slow_site), "SLOW_ROOT": str(root), "SLOW_MARK": str(mark)}
    process = subprocess.Popen(
        command or [sys.executable, "-m", "exporter", TINY, "--artifacts", str(root), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    started = time.monotonic()
    while process.poll() is None:
        if slow_site and mark.exists():
            time.sleep(delay)
            break
        if not slow_site and time.monotonic() - started >= delay:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL or process.returncode == 0, process.stderr.read().decode()


# The publishing end of an export and of an added variant, without the tracing and the checks before it (which
# import torch and take seconds): the kill tests cross the publish window many times, each in a new process.
# The same calls as exporter/export.py (artifact.staging, then artifact.publish_stage) and exporter/precision.py
# (linked_stage, then publish_added) make, on files made beforehand.
PUBLISH_EXPORT = """
import json, shutil, sys
from pathlib import Path
from vitparity import artifact
folder, made = Path(sys.argv[1]), Path(sys.argv[2])
manifest = json.loads((made / "manifest.json").read_text())
with artifact.staging(folder) as stage:
    for name in manifest.pop("files"):
        shutil.copyfile(made / name, stage / name)
    artifact.publish_stage(folder, stage, manifest)
"""
PUBLISH_VARIANT = """
import shutil, sys
from vitparity import artifact
from exporter import precision
root, made_root, key, graph = sys.argv[1:]
art, made = artifact.load(root, key), artifact.load(made_root, key)
with precision.linked_stage(art) as stage:
    shutil.copyfile(made.path(graph), stage / graph)
    precision.publish_added(art, stage, {graph: made.manifest["variants"][graph]})
"""


def publisher(script: str, *args) -> list[str]:
    return [sys.executable, "-c", script, *map(str, args)]



# What the int8 graphs of test_vit's random init keep in float in the tests that are not about the search, so that
# they pass the plain recipe and search nothing. It was chosen when an AVX2 host without VNNI used 7-bit weights,
# failed the plain recipe and searched (25 to 32 trials per int8 graph, about 2x the suite's int8 time); it keeps
# both kinds of host off the searches. The searches have their own tests (tests/exporter/test_variants.py).
TINY_INT8_KEEP = "blocks.0,blocks.1,blocks.2,blocks.5.mlp"


# Real photos for calibration and held-out checks: scikit-image's wheel carries them (the dev extra installs it); they
# are read as files, never through `import skimage`.
CALIBRATION_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg",
                      "brick.png", "grass.png", "horse.png", "color.png")
UNSEEN_PHOTOS = ("hubble_deep_field.jpg", "gravel.png", "ihc.png", "camera.png")


def real_photos(folder: Path, names) -> Path:
    """`folder` holding copies of scikit-image's bundled photos `names` (PNG and JPEG, colour and grey)."""
    import importlib.util
    import shutil

    data = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(data / name, folder / name)
    return folder
