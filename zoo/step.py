"""One model's run: export, then compare with --layers, each step a subprocess with a time limit and a memory
ceiling, every failure the row's error. Both runners call `run_local` (or `run_model`) and nothing else for a model:
the local loop of zoo/sweep.py and each Ray task (zoo/ray_runner.py)."""
from __future__ import annotations

import contextlib
import json
import resource
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vitparity.processes import SWEEP_PREFIX, owned_folder, run_child

COMPARE_ARGS = ("--no-latency", "--layers")  # and --backends: torch-cpu,ort-cpu, plus the card a Ray task holds



@dataclass(frozen=True)
class Row:
    """One model's outcome. `compare` is PASS, FAIL, ERROR or "-" (not reached); `error` is a first line."""

    model: str
    module: str
    params: int
    input: str
    export_s: float | None = None
    verify_cosine: float | None = None
    attention: str = ""
    compare: str = "-"
    layers: str = "-"
    error: str = ""
    seconds: float = 0.0
    node: str = ""  # the host that ran it (its hostname; a Ray node's IP address and hostname)
    # The sizes its graph was verified at: "dynamic (x16): 160x160, 80x80, ..." (--dynamic-size), "fixed 160x160", or
    # "fixed 224x224: why" when it was asked for every size and cannot (vitparity/sizes.py)
    sizes: str = ""


UNKNOWN = "(not a timm model)"  # the module of a listed name timm does not know



def _limits(memory: int | None):
    """The memory ceiling, set in the step before it starts (processes.run_child's `setup`)."""
    def apply():
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return apply


SCRATCH_PREFIX = SWEEP_PREFIX  # + the sweep's pid: each model's artifacts, unless --keep


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)





class StepStopped(Exception):
    """A step was stopped from outside (SIGTERM, SIGINT, SIGHUP): no finding about the model, so no row."""



def _run(command: list[str], timeout: float, memory: int | None, cwd: Path) -> tuple[int | str, str, str]:
    """(exit code or "timeout", stdout, stderr) of `command` under the time limit and memory ceiling.

    An interrupt of the sweep (Ctrl-C, SIGTERM) stops the step's whole process group before it goes on.
    """
    # The core's one launcher (vitparity/processes.run_child): its own session and group, so a timeout or an
    # interrupt stops the workers it starts too; SIGTERM when the sweep dies, so that it stops them cleanly.
    with tempfile.TemporaryFile("w+", dir=cwd) as out, tempfile.TemporaryFile("w+", dir=cwd) as err:
        code = run_child(command, cwd=cwd, timeout_s=timeout, stdout=out, stderr=err, parent_death=signal.SIGTERM,
                         setup=_limits(memory))
        out.seek(0)
        err.seek(0)
        said, complained = out.read(), err.read()
    if code is None:
        return "timeout", said, complained
    if code in [-s for s in STOP_SIGNALS] + [128 + s for s in STOP_SIGNALS]:
        raise StepStopped(f"{Path(command[2]).name if len(command) > 2 else command[0]} was stopped by "
                          f"{_signal_name(code)}")
    return code, said, complained



def _signal_name(code: int) -> str:
    return signal.Signals(-code if code < 0 else code - 128).name


# What allocators say when the memory ceiling stops them: torch, onnxruntime's arena, C++ and Python.
OUT_OF_MEMORY = ("MemoryError", "bad_alloc", "bfc_arena", "Failed to allocate memory", "DefaultCPUAllocator: can't allocate")



def _last_error(code, err: str, what: str, timeout: float) -> str:
    if any(word in err for word in OUT_OF_MEMORY):
        return f"{what}: out of memory under the ceiling (--memory); the machine may allow more"
    if code == "timeout":
        return f"{what}: no answer in {timeout:g} s"
    if isinstance(code, int) and code < 0:
        return f"{what}: killed by {signal.Signals(-code).name}" + (" (memory ceiling?)" if code == -signal.SIGKILL else "")
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return f"{what}: " + (errors[-1][len("error:"):].strip() if errors else (lines[-1] if lines else f"exit code {code}"))[:300]



def run_model(name: str, module: str, params: int, size: str, root: Path, timeout: float, memory: int | None,
              backends: str = "torch-cpu,ort-cpu", dynamic: bool = False) -> Row:
    """Export, compare and --layers for one model in subprocesses; every failure becomes the row's error.

    Both runners call this, and nothing else, for a model: the local loop below and each Ray task."""
    started = time.monotonic()
    base = Row(model=name, module=module, params=params, input=size, node=socket.gethostname())
    python = [sys.executable, "-m"]
    # The name after "--": a list line such as "-v" is a model name to the step, never one of its options.
    code, out, err = _run([*python, "exporter", "--weights", "random", "--artifacts", str(root), "--json",
                           *(["--dynamic-size"] if dynamic else []), "--", name],
                          timeout, memory, root)
    if code != 0:
        return _done(base, started, error=_last_error(code, err, "export", timeout))
    manifest = json.loads((root / name / "manifest.json").read_text())
    exported = dict(export_s=manifest.get("export_seconds"), verify_cosine=manifest["verify"]["cosine"],
                    attention=manifest.get("attention", ""), sizes=_sizes(manifest))
    # Each model's own report, removed first: a compare that dies before writing it never gets another's.
    report_path = root / f"{name.replace('/', '_')}.report.json"
    report_path.unlink(missing_ok=True)
    code, out, err = _run([*python, "compare", "--artifacts", str(root), "--backends", backends, *COMPARE_ARGS,
                           "--json", str(report_path), "--", name],
                          timeout, memory, root)
    report = _report_of(report_path, name)
    if report is None:
        return _done(base, started, **exported, compare="ERROR", error=_last_error(code, err, "compare", timeout))
    drift = "; ".join(report.get("drift", {}).values())
    no_taps = [w for w in report.get("warnings", []) if "per-block" in w]
    layers = "skipped: " + no_taps[0] if no_taps and not drift else (drift or "-")
    # The report's own verdict, as compare printed it: PASS, FAIL or NOT COMPARED. A report without one is not a PASS.
    verdict = report.get("verdict")
    if verdict not in ("PASS", "FAIL", "NOT COMPARED"):
        return _done(base, started, **exported, compare="ERROR", layers=layers,
                     error=f"sweep: compare's report for {name} holds no verdict ({verdict!r}); its exit code was {code}")
    return _done(base, started, **exported, compare=verdict, layers=layers,
                 error="" if code in (0, 1) else _last_error(code, err, "compare", timeout))



def _sizes(manifest: dict) -> str:
    """The sizes a model's graph takes and was verified at, in one cell."""
    from vitparity import sizes

    record = sizes.record(manifest)
    if record.get("dynamic"):
        return f"dynamic (x{record['patch'][0]}): " + ", ".join(sizes.label(s) for s in record["verified"])
    return f"fixed {sizes.label(record['native'])}" + (f": {record['why']}" if record.get("why") else "")


def _report_of(path: Path, name: str) -> dict | None:
    """The compare report at `path` if it is whole and about model `name`, else None."""
    try:
        reports = json.loads(path.read_text())["reports"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mine = [r for r in reports if isinstance(r, dict) and name in (r.get("timm_name"), r.get("model"))]
    return mine[0] if mine else None



def passed(row: Row) -> bool:
    """Whether one model's row is a pass: exported, verified, compared PASS, and no error."""
    return row.compare == "PASS" and not row.error



def _done(row: Row, started: float, **fields) -> Row:
    return Row(**{**asdict(row), **fields, "seconds": round(time.monotonic() - started, 1)})



@dataclass(frozen=True)
class Settings:
    """What every model's run shares: where results and kept artifacts go, and the per-step limits."""

    folder: Path
    keep: bool
    timeout: float
    memory: int | None
    dynamic: bool = False  # --dynamic-size: export each model with dynamic height and width, record the sizes verified



def run_local(entry: tuple, settings: Settings, backends: str = "torch-cpu,ort-cpu") -> Row:
    """One model (name, module, params, input) in a scratch artifacts folder of its own (or OUT/artifacts with
    --keep), removed afterwards: its row. StepStopped when a step was stopped from outside."""
    name, module, params, size = entry
    if module == UNKNOWN:
        return Row(name, module, params, size, error=f"sweep: {name} is not a timm model (timm.is_model); check the list file",
                   seconds=0.1, node=socket.gethostname())
    with contextlib.ExitStack() as scratch:  # an owned folder (vitparity.processes), removed at the end
        root = settings.folder / "artifacts" if settings.keep else scratch.enter_context(owned_folder(SCRATCH_PREFIX))
        root.mkdir(parents=True, exist_ok=True)
        try:
            return run_model(name, module, params, size, root.resolve(), settings.timeout, settings.memory, backends,
                             settings.dynamic)
        except StepStopped:
            raise
        except Exception as error:  # noqa: BLE001 - an unreadable result is this model's row, not the sweep's end
            return Row(name, module, params, size, error=f"sweep: {type(error).__name__}: {str(error)[:200]}", seconds=0.1,
                       node=socket.gethostname())
