"""A coverage sweep: export, compare and --layers for many timm models, each in a subprocess of its own.

It sits above both packages: it drives the exporter's and the comparator's command lines and reads
their JSON. This module selects the models and runs the command line; one model's run is zoo/step.py, the
results file zoo/store.py, the matrix zoo/render.py, and the Ray runner zoo/ray_runner.py (`--ray [ADDRESS]`).

`python -m zoo 'vit_*small*' 'eva02_tiny*' --max-params 100M` (or `make sweep PATTERN=...`)
runs, for every matching timm architecture, `python -m exporter NAME --weights random` and then
`python -m compare NAME --backends torch-cpu,ort-cpu --no-latency --layers --json`, with a time limit
and a memory ceiling per model. Each finished model is one line appended to a JSONL file, so a
killed sweep resumes where it stopped, and `--shard i/n` splits the list so that several hosts each
take a slice (their JSONL files simply concatenate). At the end it prints a matrix and writes it as
Markdown and JSON; `--readme docs/sweep.md` puts the Markdown between that file's coverage markers.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from vitparity.errors import UserError
from vitparity.processes import remove_stale

from .render import (
    README_END,
    README_START,
    matrix_markdown,
    matrix_table,
    summary_markdown,
    update_readme,
)
from .step import SCRATCH_PREFIX, UNKNOWN, Row, Settings, StepStopped, passed, run_local
from .store import append_row, read_rows, read_text


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



def describe(name: str) -> tuple[str, int, str]:
    """(timm module, parameter count, native input) of a model, built on the meta device: no memory, no weights."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    size = model.pretrained_cfg.get("input_size") or (3, 224, 224)
    # The module that registers the name (deit_* lives in deit though its class is VisionTransformer), by timm's
    # public listing; the class's module for a name no module lists.
    module = modules_of().get(name.partition(".")[0]) or type(model).__module__.rsplit(".", 1)[-1]
    return module, int(sum(p.numel() for p in model.parameters())), f"{size[1]}x{size[2]}"


@functools.lru_cache(maxsize=1)
def modules_of() -> dict[str, str]:
    """{architecture: the timm module that registers it}, from timm.list_modules() and timm.list_models(module=)."""
    import timm

    return {name: module for module in timm.list_modules() for name in timm.list_models(module=module)}



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



def parse(argv=None) -> argparse.Namespace:
    from vitparity.cli import Parser

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
    parser.add_argument("--dynamic-size", action="store_true",
                        help="export each model with dynamic height and width (python -m exporter --dynamic-size) and "
                             "record whether it could and the sizes verified (the sizes column)")
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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from vitparity.cli import console, guarded

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

            settings = Settings(folder=folder, keep=args.keep, timeout=args.timeout, memory=memory, dynamic=args.dynamic_size)
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
    from vitparity import entry_point

    entry_point(lambda: main, "interrupted")
