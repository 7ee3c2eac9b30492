"""A coverage sweep: export, compare and --layers for many timm models, each in a subprocess of its own.

It sits above both packages: it drives the exporter's and the comparator's command lines and reads
their JSON. One function, `run_model`, runs one model and returns its row; the local runner here and
the Ray runner (zoo/ray_runner.py, `--ray [ADDRESS]`) are two ways of calling it.

`python -m zoo 'vit_*small*' 'eva02_tiny*' --max-params 100M` (also `python -m exporter.sweep`, or `make sweep PATTERN=...`)
runs, for every matching timm architecture, `python -m exporter NAME --weights random` and then
`python -m compare NAME --backends torch-cpu,ort-cpu --no-latency --layers --json`, with a time limit
and a memory ceiling per model. Each finished model is one line appended to a JSONL file, so a
killed sweep resumes where it stopped, and `--shard i/n` splits the list so that several hosts each
take a slice (their JSONL files simply concatenate). At the end it prints a matrix and writes it as
Markdown and JSON; `--readme README.md` puts the Markdown between the README's coverage markers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from exporter.errors import UserError
from exporter.processes import SWEEP_PREFIX, die_with_parent, owned_prefix, remove_stale

COMPARE_ARGS = ("--no-latency", "--layers")  # and --backends: torch-cpu,ort-cpu, plus the card a Ray task holds
README_START, README_END = "<!-- coverage:start -->", "<!-- coverage:end -->"
COLUMNS = ("model", "module", "params", "input", "export s", "verify cosine", "attention", "compare", "layers", "error")


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


def parse_size(text: str, flag: str = "size") -> int:
    """'100M' -> 100_000_000; '1.5G' -> 1_500_000_000; plain numbers as they are. A finite count, 0 or more."""
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}
    text = text.strip().upper()
    try:
        value = float(text[:-1]) * scale[text[-1]] if text[-1:] in scale else float(text)
    except (ValueError, IndexError):
        raise UserError(f"{flag} '{text}' is not a size; write e.g. 100M or 16G") from None
    if not math.isfinite(value) or value < 0 or value > 2 ** 62:
        raise UserError(f"{flag} '{text}' is not a size: it must be a finite amount of 0 or more; write e.g. 100M or 16G")
    return int(value)


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4): the second of four slices."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text}: write i/n, e.g. 1/4") from None
    if not 1 <= index <= count:
        raise UserError(f"--shard {text}: i must be between 1 and n")
    return index, count


def shard(names: list[str], index: int, count: int) -> list[str]:
    """Every count-th name from position index-1: the n slices cover the list with no overlap and no gap."""
    return names[index - 1::count]


def read_text(path: str, flag: str) -> str:
    """A text file the user named, as UTF-8; a one-line error when it is missing, unreadable or not text."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as error:
        raise UserError(f"{flag} {path}: {error.strerror or error}") from None


def describe(name: str) -> tuple[str, int, str]:
    """(timm module, parameter count, native input) of a model, built on the meta device: no memory, no weights."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    size = model.pretrained_cfg.get("input_size") or (3, 224, 224)
    # The module that registers the name (deit_* lives in deit though its class is VisionTransformer).
    registry = getattr(timm.models, "_registry", None)
    module = getattr(registry, "_model_to_module", {}).get(name) or type(model).__module__.rsplit(".", 1)[-1]
    return module, int(sum(p.numel() for p in model.parameters())), f"{size[1]}x{size[2]}"


def select(patterns: list[str], list_file: str | None, max_params: int | None, modules: tuple[str, ...] = ()
           ) -> tuple[list[tuple[str, str, int, str]], list[tuple[str, str, int, str]]]:
    """Matching timm architectures (sorted, no duplicates), each with (module, params, input): those to run,
    and those over max_params. A model named in the list file always runs: the limit is for patterns and modules."""
    import timm

    names = set()
    for pattern in patterns:
        names.update(timm.list_models(pattern) or ([pattern] if timm.is_model(pattern) else []))
    for module in modules:
        names.update(timm.list_models(module=module))
    listed = set()
    if list_file:
        lines = read_text(list_file, "--list").splitlines()
        listed = {line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()}
    names |= listed
    chosen, over = [], []
    for name in sorted(names):
        if not timm.is_model(name):  # a listed name timm does not know: a row that says so, never a process
            chosen.append((name, UNKNOWN, 0, "?"))
            continue
        try:
            module, params, size = describe(name)
        except Exception:  # noqa: BLE001 - a model timm cannot even build is a row, not a crash
            chosen.append((name, "?", 0, "?"))
            continue
        (chosen if max_params is None or params <= max_params or name in listed else over).append((name, module, params, size))
    return chosen, over


UNKNOWN = "(not a timm model)"  # the module of a listed name timm does not know


def _limits(memory: int | None):
    # Its own session and process group: a timeout or an interrupt stops the worker processes it
    # starts too. SIGTERM when the sweep dies, so that the step stops its own workers cleanly.
    leash = die_with_parent(signal.SIGTERM, new_session=True)

    def apply():
        leash()
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return apply


SCRATCH_PREFIX = SWEEP_PREFIX  # + the sweep's pid: each model's artifacts, unless --keep
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_S = 5.0  # how long a stopped step may take to stop its own workers before it is killed


class StepStopped(Exception):
    """A step was stopped from outside (SIGTERM, SIGINT, SIGHUP): no finding about the model, so no row."""


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the step's process group (it stops its workers and removes its temp folders), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run(command: list[str], timeout: float, memory: int | None, cwd: Path) -> tuple[int | str, str, str]:
    """(exit code or "timeout", stdout, stderr) of `command` under the time limit and memory ceiling.

    An interrupt of the sweep (Ctrl-C, SIGTERM) stops the step's whole process group before it goes on.
    """
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, preexec_fn=_limits(memory))
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        return "timeout", out, err
    except BaseException:
        _stop(process)
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the step left in its group
            os.killpg(process.pid, signal.SIGKILL)
    if process.returncode in [-s for s in STOP_SIGNALS] + [128 + s for s in STOP_SIGNALS]:
        raise StepStopped(f"{Path(command[2]).name if len(command) > 2 else command[0]} was stopped by "
                          f"{_signal_name(process.returncode)}")
    return process.returncode, out, err


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
              backends: str = "torch-cpu,ort-cpu") -> Row:
    """Export, compare and --layers for one model in subprocesses; every failure becomes the row's error.

    Both runners call this, and nothing else, for a model: the local loop below and each Ray task."""
    started = time.monotonic()
    base = Row(model=name, module=module, params=params, input=size, node=socket.gethostname())
    python = [sys.executable, "-m"]
    # The name after "--": a list line such as "-v" is a model name to the step, never one of its options.
    code, out, err = _run([*python, "exporter", "--weights", "random", "--artifacts", str(root), "--json", "--", name],
                          timeout, memory, root)
    if code != 0:
        return _done(base, started, error=_last_error(code, err, "export", timeout))
    manifest = json.loads((root / name / "manifest.json").read_text())
    exported = dict(export_s=manifest.get("export_seconds"), verify_cosine=manifest["verify"]["cosine"],
                    attention=manifest.get("attention", ""))
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
    # The report's own verdict, as compare printed it: PASS, FAIL or NOT COMPARED.
    verdict = report.get("verdict") or ("PASS" if report.get("exit_code") == 0 else "FAIL")
    return _done(base, started, **exported, compare=verdict, layers=layers,
                 error="" if code in (0, 1) else _last_error(code, err, "compare", timeout))


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


ROW_TYPES = {"model": str, "module": str, "params": int, "input": str, "export_s": (int, float, type(None)),
             "verify_cosine": (int, float, type(None)), "attention": str, "compare": str, "layers": str, "error": str,
             "seconds": (int, float), "node": str}


def row_of(found) -> Row | None:
    """A Row from one JSONL record, or None when any field is missing, unknown or of the wrong type."""
    if not (isinstance(found, dict) and {"model", "module", "params", "input"} <= set(found) <= set(ROW_TYPES)):
        return None
    if any(isinstance(value, bool) or not isinstance(value, ROW_TYPES[key]) for key, value in found.items()):
        return None
    return Row(**found)


def read_rows(path: Path) -> list[Row]:
    """The rows a JSONL file holds; a line cut short by a killed sweep, or one that is not a row (wrong
    types, other fields), is ignored: that model runs again."""
    rows = []
    if path.is_file():
        for line in path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                row = row_of(json.loads(line))
            except ValueError:
                continue
            if row is not None:
                rows.append(row)
    return rows


def append_row(path: Path, row: Row) -> None:
    """Append one row as a line of its own: after a line cut short (a crash mid-write), on a fresh line."""
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        fresh = b""
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            fresh = b"" if handle.read(1) == b"\n" else b"\n"
        handle.write(fresh + (json.dumps(asdict(row)) + "\n").encode())
        handle.flush()
        os.fsync(handle.fileno())


def matrix_markdown(rows: list[Row], command: str, version: str, over: list | None = None, limit: str = "") -> str:
    """The coverage matrix as Markdown, with the tool version, the date and the command that made it.

    Rows not run yet (a sweep stopped before them) say so; models `over` the parameter limit are listed by name.
    """
    ran = [r for r in rows if r.seconds]
    passing = sum(passed(r) for r in ran)
    lines = [
        f"Generated by `{command}` with vit-parity {version} on {datetime.now(timezone.utc):%Y-%m-%d}: "
        f"{passing} of {len(ran)} models run export, verify and pass, {len(rows) - len(ran)} not run yet "
        f"(random weights, on the CPU: torch-cpu against ort-cpu, every block compared).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        cells = [f"`{r.model}`", r.module, f"{r.params / 1e6:.1f}M", r.input,
                 "-" if r.export_s is None else f"{r.export_s:.1f}",
                 "-" if r.verify_cosine is None else f"{r.verify_cosine:.7f}",
                 r.attention.split(" (")[0] or "-", r.compare, r.layers.replace("|", "/"), r.error.replace("|", "/") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if over:
        names = ", ".join(f"`{name}` ({params / 1e6:.0f}M)" for name, _, params, _ in over)
        lines += ["", f"Not run: over {limit} parameters and not named in the list file ({len(over)}). "
                  f"To run one, name it in the list file; each takes minutes here. {names}."]
    return "\n".join(lines) + "\n"


def summary_markdown(rows: list[Row], command: str, version: str, matrix: str, over: list | None = None, limit: str = "") -> str:
    """The README's coverage table: one line per timm module, then every model with an error or a skipped part.

    The per-model matrix is long; the summary links to it (`matrix`, a path relative to the README)."""
    ran = [r for r in rows if r.seconds]
    lines = [
        f"Generated by `{command}` with vit-parity {version} on {datetime.now(timezone.utc):%Y-%m-%d} "
        f"(random weights, on the CPU: torch-cpu against ort-cpu, every block compared). "
        f"Every model, with export seconds, verify cosine and attention path: [{matrix}]({matrix}).",
        "",
        "| timm module | models run | params | inputs | pass | drift localised per block | per-block skipped | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for module in sorted({r.module for r in ran}):
        group = [r for r in ran if r.module == module]
        params = sorted(r.params for r in group)
        inputs = sorted({r.input for r in group}, key=lambda size: int(size.split("x")[0]) if size[0].isdigit() else 0)
        cells = [module, str(len(group)), f"{params[0] / 1e6:.1f}M" + (f" to {params[-1] / 1e6:.1f}M" if len(params) > 1 else ""),
                 ", ".join(inputs) if len(inputs) <= 4 else f"{inputs[0]} to {inputs[-1]} ({len(inputs)} sizes)",
                 str(sum(passed(r) for r in group)),
                 str(sum(r.layers not in ("", "-") and not r.layers.startswith("skipped") for r in group)),
                 str(sum(r.layers.startswith("skipped") for r in group)), str(sum(bool(r.error) for r in group))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [r for r in ran if r.error or r.layers.startswith("skipped")]
    if notes:
        lines += ["", "Models with an error or a skipped part:", ""]
        lines += [f"- `{r.model}` ({r.params / 1e6:.0f}M, {r.input}): {r.error or r.layers}" for r in notes]
    waiting = len(rows) - len(ran)
    if waiting:
        lines += ["", f"Not run yet: {waiting} (the sweep was stopped before them; the same command resumes it)."]
    if over:
        lines += ["", f"Not run: {len(over)} architectures over {limit} parameters that the list file does not name "
                      f"(listed in [{matrix}]({matrix}))."]
    return "\n".join(lines) + "\n"


def matrix_table(rows: list[Row]):
    from rich.table import Table

    table = Table(title="Coverage")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r.model, r.module, f"{r.params / 1e6:.1f}M", r.input, "-" if r.export_s is None else f"{r.export_s:.1f}",
                      "-" if r.verify_cosine is None else f"{r.verify_cosine:.7f}", r.attention.split(" (")[0] or "-",
                      r.compare, r.layers, r.error or "-")
    return table


def update_readme(readme: Path, markdown: str) -> None:
    text = read_text(str(readme), "--readme")
    if README_START not in text or README_END not in text:
        raise UserError(f"{readme} has no {README_START} ... {README_END} block to fill")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    from exporter.artifact import write_atomic

    write_atomic(readme, f"{head}{README_START}\n{markdown}{README_END}{tail}".encode())


@dataclass(frozen=True)
class Settings:
    """What every model's run shares: where results and kept artifacts go, and the per-step limits."""

    folder: Path
    keep: bool
    timeout: float
    memory: int | None


def run_local(entry: tuple, settings: Settings, backends: str = "torch-cpu,ort-cpu") -> Row:
    """One model (name, module, params, input) in a scratch artifacts folder of its own (or OUT/artifacts with
    --keep), removed afterwards: its row. StepStopped when a step was stopped from outside."""
    name, module, params, size = entry
    if module == UNKNOWN:
        return Row(name, module, params, size, error=f"sweep: {name} is not a timm model (timm.is_model); check the list file",
                   seconds=0.1, node=socket.gethostname())
    root = settings.folder / "artifacts" if settings.keep else Path(tempfile.mkdtemp(prefix=owned_prefix(SCRATCH_PREFIX)))
    root.mkdir(parents=True, exist_ok=True)
    try:
        return run_model(name, module, params, size, root.resolve(), settings.timeout, settings.memory, backends)
    except StepStopped:
        raise
    except Exception as error:  # noqa: BLE001 - an unreadable result is this model's row, not the sweep's end
        return Row(name, module, params, size, error=f"sweep: {type(error).__name__}: {str(error)[:200]}", seconds=0.1,
                   node=socket.gethostname())
    finally:
        if not settings.keep:
            shutil.rmtree(root, ignore_errors=True)


def parse(argv=None) -> argparse.Namespace:
    from exporter.cli import Parser

    parser = Parser(prog="python -m zoo", description="Export, compare and localise drift for many timm models, one subprocess each.")
    parser.add_argument("patterns", nargs="*", help="timm name patterns, e.g. 'vit_*small*' 'eva02_tiny*'")
    parser.add_argument("--list", dest="list_file", default=None, help="a file of model names, one a line (# comments); these run whatever their size")
    parser.add_argument("--module", action="append", default=[], help="every architecture of this timm module, e.g. eva (repeatable)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: write the matrix from what results.jsonl holds")
    parser.add_argument("--max-params", default=None, help="skip models of the patterns and modules larger than this, e.g. 100M")
    parser.add_argument("--shard", default=None, help="i/n: run the i-th of n slices of the list (default 1/1; in a Slurm "
                        "job array, this task's slice from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT)")
    parser.add_argument("--out", default=None, help="folder for results.jsonl, coverage.md and coverage.json (default: sweep; "
                        "in a Slurm job array, sweep/shard-I-of-N)")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run the models as Ray tasks: on the cluster at ADDRESS (e.g. ray://head:10001 or head:6379), "
                             "or, with no address, on a Ray started here; each task asks one NPU or GPU where the cluster has them")
    parser.add_argument("--cpus", type=float, default=1.0, help="with --ray: CPUs each model's task asks for (default: 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each of a model's steps may take (default: 1800)")
    parser.add_argument("--memory", default="16G", help="address-space ceiling of each step, e.g. 16G; 0 for none (default: 16G)")
    parser.add_argument("--keep", action="store_true", help="keep each model's artifact under OUT/artifacts (default: delete it)")
    parser.add_argument("--readme", default=None, help="also write the matrix between the coverage markers of this README")
    args = parser.parse_args(argv)
    if not args.patterns and not args.list_file and not args.module:
        raise UserError("name at least one pattern or --list FILE, e.g. python -m zoo 'vit_*small*'")
    if not (0 < args.cpus < math.inf):
        raise UserError(f"--cpus must be a finite number above 0, got {args.cpus:g}")
    if not (0 < args.timeout < math.inf):
        raise UserError(f"--timeout must be a finite number of seconds above 0, got {args.timeout:g}")
    if args.ray is not None and not args.ray.strip():
        raise UserError("--ray '' names no cluster; give ADDRESS (e.g. head:6379), or --ray alone for a Ray started here")
    parse_size(args.memory, "--memory")
    if args.max_params is not None:
        parse_size(args.max_params, "--max-params")
    if args.shard is None:  # an explicit --shard wins: the Slurm variables are not even read
        slurm = slurm_shard(os.environ)
        args.shard = slurm or "1/1"
        if slurm and args.out is None:
            index, count = parse_shard(slurm)
            args.out = f"sweep/shard-{index}-of-{count}"
    parse_shard(args.shard)
    args.out = args.out or "sweep"
    return args


def check_outputs(folder: Path, readme: str | None) -> None:
    """Fail before any model runs when the results folder cannot be written or the README cannot be updated."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise UserError(f"--out {folder} cannot be written ({error.strerror or error}); pick a folder you can write") from None
    if readme:
        text = read_text(readme, "--readme")
        if README_START not in text or README_END not in text:
            raise UserError(f"--readme {readme} has no {README_START} ... {README_END} block to fill")
        if not os.access(readme, os.W_OK):
            raise UserError(f"--readme {readme} is not writable")


def slurm_shard(environ) -> str | None:
    """This Slurm array task's slice as "i/n" (ids may start at 0 or 1: SLURM_ARRAY_TASK_MIN says which), or None."""
    task, count = environ.get("SLURM_ARRAY_TASK_ID"), environ.get("SLURM_ARRAY_TASK_COUNT")
    if not (task and count):
        return None
    try:
        index = int(task) - int(environ.get("SLURM_ARRAY_TASK_MIN", "1")) + 1
        total = int(count)
    except ValueError:
        raise UserError(f"SLURM_ARRAY_TASK_ID={task} and SLURM_ARRAY_TASK_COUNT={count} are not numbers; pass --shard i/n") from None
    if not 1 <= index <= total:
        raise UserError(f"SLURM_ARRAY_TASK_ID={task} is outside the array of {total} (min {environ.get('SLURM_ARRAY_TASK_MIN', '1')}); "
                        f"submit with a contiguous --array, or pass --shard i/n")
    return f"{index}/{total}"


def main(argv=None) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from exporter.cli import console, guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    out, err = console(), console(stderr=True)

    def body() -> int:
        args = parse(argv)
        index, count = parse_shard(args.shard)
        max_params = parse_size(args.max_params, "--max-params") if args.max_params else None
        memory = parse_size(args.memory, "--memory") or None
        folder = Path(args.out)
        check_outputs(folder, args.readme)
        if args.ray and args.ray != "local" and not args.report_only:
            from .ray_runner import check_address

            check_address(args.ray)  # within seconds, before the models are listed
        jsonl = folder / "results.jsonl"
        with err.status("listing models"):
            chosen, over = select(args.patterns, args.list_file, max_params, tuple(args.module))
            chosen = shard(chosen, index, count)
        if not chosen:
            raise UserError(f"no timm model matches {' '.join(args.patterns + [f'--module {m}' for m in args.module]) or 'the list'}"
                            f" in shard {args.shard}; check the names with python -c \"import timm; print(timm.list_models('PATTERN'))\"")
        remove_stale(SCRATCH_PREFIX)  # what a sweep killed outright left behind
        done = {row.model for row in read_rows(jsonl)}
        todo = [] if args.report_only else [entry for entry in chosen if entry[0] not in done]
        err.print(f"{len(chosen)} models in this shard; {len(chosen) - len(todo)} already in {jsonl}, {len(todo)} to run")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=err) as progress:
            task = progress.add_task("sweep", total=len(todo))

            def record(row: Row | None, name: str, why: str = "") -> None:
                """A finished model's row, appended at once (a killed sweep resumes after it); None: stopped, not recorded."""
                progress.advance(task)
                if row is None:
                    progress.console.print(f"{name}: not recorded, {why}; the same command runs it again")
                    return
                append_row(jsonl, row)
                # One line per model above the bar: also the log of a sweep whose stderr is not a terminal.
                progress.console.print(f"{name}: {row.error or f'{row.compare}, layers {row.layers}'} ({row.seconds:.0f} s"
                                       + (f", on {row.node}" if args.ray else "") + ")")

            settings = Settings(folder=folder, keep=args.keep, timeout=args.timeout, memory=memory)
            if args.ray and todo:
                from .ray_runner import run_on_ray

                run_on_ray(todo, settings, record, args.ray, args.cpus, lambda text: progress.update(task, description=text))
            else:
                for entry in todo:
                    progress.update(task, description=f"{entry[0]} ({entry[2] / 1e6:.0f}M, {entry[3]})")
                    try:
                        record(run_local(entry, settings), entry[0])
                    except StepStopped as why:  # stopped from outside: nothing is known about the model
                        record(None, entry[0], str(why))
        finished = {row.model: row for row in read_rows(jsonl)}
        rows = [replace(finished[name], module=module) if name in finished
                else Row(name, module, params, size, error="not run yet: run the same command again to resume")
                for name, module, params, size in chosen]
        from importlib.metadata import PackageNotFoundError, version

        try:
            tool = version("vit-parity")
        except PackageNotFoundError:
            tool = "(not installed)"
        # The command that runs this sweep: --report-only and --readme change where it is shown, not what it holds.
        shown, skip = [], False
        for word in argv:
            if skip or word == "--report-only":
                skip = False
                continue
            if word == "--readme":
                skip = True
                continue
            shown.append(shlex.quote(word))
        command = " ".join(["python -m zoo", *shown])
        markdown = matrix_markdown(rows, command, tool, over, args.max_params or "")
        (folder / "coverage.md").write_text(markdown)
        (folder / "coverage.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        out.print(matrix_table(rows))
        err.print(f"wrote {folder / 'coverage.md'} and {folder / 'coverage.json'}")
        if args.readme:
            readme = Path(args.readme)
            matrix = os.path.relpath(folder / "coverage.md", readme.resolve().parent)
            update_readme(readme, summary_markdown(rows, command, tool, matrix, over, args.max_params or ""))
            err.print(f"updated the coverage table in {args.readme}")
        failing = [r.model for r in rows if not passed(r)]
        if failing:
            err.print(f"{len(failing)} of {len(rows)} models did not pass (or have not run yet): {', '.join(failing[:10])}"
                      + (" ..." if len(failing) > 10 else ""))
        return 1 if failing else 0

    return guarded(body, err, "interrupted: the model in flight was not recorded; the same command resumes the sweep")


if __name__ == "__main__":
    from exporter import entry_point

    entry_point(lambda: main, "interrupted")
