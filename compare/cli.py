"""Command line for the comparator: `python -m compare MODEL [MODEL ...]`."""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from vitparity import registry
from vitparity.artifact import write_json_atomic
from vitparity.cli import Parser, check_thresholds, console, guarded
from vitparity.errors import UserError

from .backends import BACKENDS
from .reproduce import make_variable

# make variables that stand for a CLI option (see the Makefile's compare target).
MAKE_VARIABLES = {"artifacts": "ARTIFACTS", "report": "REPORT", "save_reference": "SAVE", "against": "AGAINST", "images": "IMAGES",
                  "weights": "WEIGHTS"}
# Options the make target always passes: `make compare` exports a missing artifact first.
MAKE_ALWAYS = {"if_missing": True}


def _names(text: str) -> tuple[str, ...]:
    """Comma-separated names, each once, in the order first given."""
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,8, got '{text}'") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers >= 1, got '{text}'")
    return sizes


def parse(argv=None) -> argparse.Namespace:
    parser = Parser(prog="python -m compare", description="Run one input through eager CPU, eager accelerators and onnxruntime; report agreement and latency.")
    parser.add_argument("models", nargs="*", help=f"aliases ({', '.join(registry.ALIASES)}) or timm names; default: every alias")
    parser.add_argument("--artifacts", default="artifacts", help="artifacts root (default: artifacts)")
    parser.add_argument("--if-missing", action="store_true",
                        help="export an artifact that is missing or damaged first (python -m exporter --if-missing, in a "
                             "process of its own; nothing is started when every artifact is present); make compare passes it")
    parser.add_argument("--weights", default=None, metavar="PATH|random|auto",
                        help="with --if-missing: the weights an export uses (python -m exporter --weights)")
    group = parser.add_argument_group("input")
    group.add_argument("--input", choices=("image", "random"), default=None, help="a preprocessed photo (default) or seeded normal noise")
    group.add_argument("--image", default=None, help="image file to use (default: the bundled grace_hopper.jpg)")
    group.add_argument("--images", default=None, metavar="PATH",
                       help="a folder (recursive) or a glob of images: stream them all, per-image results and neighbour agreement")
    group.add_argument("--hunt", default=None, metavar="PATH",
                       help="search a folder (or glob) of images and seeded variations of each (crop, resize, mirror, dark, "
                            "bright, JPEG) for the input each backend disagrees on most; writes it as PNG with the command "
                            "that reproduces it with --image")
    group.add_argument("--hunt-out", default="worst-inputs", metavar="DIR",
                       help="with --hunt: the folder the worst inputs are written to (default: worst-inputs)")
    group.add_argument("--limit", type=int, default=None, help="with --images: only the first N readable images (in sorted order)")
    group.add_argument("--seed", type=int, default=None, help="seed for --input random (default: 0)")
    group.add_argument("--batch-size", type=int, default=None, help="batch size of the accuracy run (default: 1)")
    group.add_argument("--size", default=None, metavar="SIZES",
                       help="run every backend at this input size, H or HxW (e.g. 448 or 518x392); a comma-separated list "
                            "compares at each in turn. Needs an artifact exported with --dynamic-size (default: its native size)")
    group = parser.add_argument_group("backends")
    group.add_argument("--backends", type=_names, default=tuple(BACKENDS), help=f"comma-separated (default: all of {','.join(BACKENDS)})")
    group.add_argument("--reference", default="torch-cpu", help="backend the others are compared against (default: torch-cpu)")
    group.add_argument("--require", type=_names, default=(), help="backends that must run; unavailable means exit 2")
    group.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                       help="precision of the accelerator backends; fp32 is true fp32 everywhere (default: fp32)")
    group.add_argument("--variants", default="all", metavar="all|none|LIST",
                       help="the artifact's reduced-precision graphs (exporter --variant) to run as rows of every "
                            "onnxruntime backend, e.g. int8,fp16 (default: all it has)")
    group.add_argument("--fast-math", action="store_true",
                       help="keep the vendors' shipped fp32 shortcuts (TF32, HF32, CANN's default precision_mode); judged by the fast-math class")
    group.add_argument("--timeout", type=float, default=600.0,
                       help="seconds each backend's worker process may take before it is stopped (default: 600)")
    group = parser.add_argument_group("thresholds (override the class table)")
    group.add_argument("--min-cosine", type=float, default=None, help="pass needs cosine >= this")
    group.add_argument("--max-rel", type=float, default=None, help="pass needs relative error <= this")
    group = parser.add_argument_group("latency")
    group.add_argument("--batch-sizes", type=_sizes, default=None, help="sweep these batch sizes, e.g. 1,4,8,16 (default: the accuracy batch)")
    group.add_argument("--warmup", type=int, default=10, help="warm-up calls (default: 10, cut short by the budget unless --iters)")
    group.add_argument("--iters", type=int, default=None, help="timed calls per cell (default: adapt to --budget)")
    group.add_argument("--budget", type=float, default=3.0, help="seconds per (backend, batch) cell when --iters is not given (default: 3)")
    group.add_argument("--no-latency", action="store_true", help="skip timing")
    group = parser.add_argument_group("diagnosis and results")
    group.add_argument("--layers", action="store_true", help="compare every block's output tokens and the final norm")
    group.add_argument("--replay", action="store_true",
                       help="with --layers (implied): run each block of every eager backend on the reference's input to it, "
                            "so its own error shows apart from the error it was given; open the block with the largest "
                            "such error part by part (norm1, attn.qkv, attn.softmax, mlp.fc1...) and say what to try")
    group.add_argument("--stability", action="store_true",
                       help="each backend against itself: the batch run twice (bit-identical or by how much not), and its "
                            "first item alone against the same item in a batch of 4 at each position (batch invariance)")
    group.add_argument("--truth", choices=("fp64",), default=None,
                       help="also run eager float64 on the CPU and give every backend's error against it, as a multiple of torch-cpu's")
    group.add_argument("-v", "--verbose", action="store_true", help="print every table in full (the default view fits 100 "
                       "columns: cosine, rel err and verdict per row; the JSON and --report hold everything)")
    group.add_argument("--json", default=None, metavar="PATH", help="write the full results as JSON")
    group.add_argument("--save-reference", default=None, metavar="FILE", help="save input and outputs (npz) to compare on another host")
    group.add_argument("--against", default=None, metavar="FILE", help="also compare against outputs saved with --save-reference")
    group.add_argument("--report", default=None, metavar="FILE", help="write a Markdown validation report (PNG charts with the plot extra)")
    args = parser.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        raise UserError(f"--iters must be at least 1, got {args.iters}")
    if args.budget <= 0 or not math.isfinite(args.budget):
        raise UserError(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.timeout <= 0 or not math.isfinite(args.timeout):
        raise UserError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    check_thresholds(args.min_cosine, args.max_rel, "--max-rel", "a relative error")
    if args.fast_math and args.dtype != "fp32":
        raise UserError(f"--fast-math measures the fp32 defaults; it does not combine with --dtype {args.dtype}")
    for flag, least in (("batch_size", 1), ("warmup", 0), ("seed", 0)):
        value = getattr(args, flag)
        if value is not None and value < least:
            raise UserError(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    if args.input == "random" and args.image:
        raise UserError("--image and --input random exclude each other; drop one")
    if args.images and (args.image or args.input or args.seed is not None):
        raise UserError("--images replaces --image, --input and --seed; drop those")
    if args.hunt and (args.images or args.image or args.input or args.seed is not None or args.batch_size):
        raise UserError("--hunt makes its own inputs from the folder, one per batch; drop --images, --image, --input, "
                        "--seed and --batch-size")
    if args.hunt_out != "worst-inputs" and not args.hunt:
        raise UserError("--hunt-out says where --hunt writes; add --hunt PATH")
    if args.limit is not None and (not args.images or args.limit < 1):
        raise UserError(f"--limit takes a count of at least 1, and goes with --images; got {args.limit}")
    if args.weights is not None and not args.if_missing:
        raise UserError("--weights is for the export --if-missing may run; add --if-missing, or export first with "
                        "python -m exporter --weights")
    chosen = set(args.backends) | {args.reference}
    for name in args.require:
        if name not in chosen:
            raise UserError(f"--require {name}, but {name} is not among --backends; add it there or drop --require {name}")
    if not args.backends:
        raise UserError("--backends names no backend; e.g. --backends torch-cpu,ort-cpu")
    for flag in ("json", "save_reference", "report"):  # fail now, not after minutes of work
        path = getattr(args, flag)
        if not path:
            continue
        if Path(path).is_dir():
            raise UserError(f"--{flag.replace('_', '-')} {path} is a folder; give a file name in it")
        if not Path(path).resolve().parent.is_dir():
            raise UserError(f"--{flag.replace('_', '-')} {path}: folder {Path(path).parent} does not exist; create it first")
        if not os.access(Path(path).resolve().parent, os.W_OK):
            raise UserError(f"--{flag.replace('_', '-')} {path}: folder {Path(path).parent} is not writable; pick another")
    if args.size is not None:
        from vitparity import sizes

        args.size = ",".join(sizes.label(s) for s in sizes.parse_list(args.size))
    if args.size and "," in args.size and (args.save_reference or args.against):
        raise UserError("--save-reference and --against work at one size at a time; give --size one size")
    if args.save_reference and args.against and Path(args.save_reference).resolve() == Path(args.against).resolve():
        raise UserError(
            f"--save-reference {args.save_reference} would overwrite the reference read with --against; save to another file"
        )
    return args


def make_compare(argv: list[str]) -> str | None:
    """`make compare ...` with the same effect as `python -m compare ARGV`, or None when it cannot be expressed.

    The flags are rebuilt from the parsed command (every long option is named after its dest),
    and the result is parsed again: it is only returned when both parse to the same options.
    """
    try:
        args, defaults = vars(parse(argv)), vars(parse([]))
    except UserError:  # options the CLI refuses
        return None
    args, defaults = {**args, **MAKE_ALWAYS}, {**defaults, **MAKE_ALWAYS}  # the target passes these whatever was asked
    variables, flags = [], []
    if args["models"]:
        variables.append(f"MODEL={shlex.quote(' '.join(args['models']))}")
    for dest, value in args.items():
        if dest == "models" or value == defaults[dest]:
            continue
        if dest in MAKE_VARIABLES:
            variables.append(make_variable(MAKE_VARIABLES[dest], str(value)))
        elif value is True:
            flags.append(_flag(dest))
        else:
            flags += [_flag(dest), ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    # What the Makefile's recipe runs with these variables.
    rebuilt = [*args["models"], "--artifacts", args["artifacts"], *(_flag(dest) for dest in MAKE_ALWAYS)]
    rebuilt += [f for dest in ("weights", "save_reference", "against", "report", "images") if args[dest]
                for f in (_flag(dest), args[dest])]
    try:
        if vars(parse(rebuilt + flags)) != args:
            return None
    except UserError:
        return None
    variables += [make_variable("ARGS", *flags)] if flags else []
    return " ".join(["make compare", *variables])


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def options_from(args: argparse.Namespace):
    from .plan import CompareOptions

    return CompareOptions(
        artifacts=args.artifacts, input=args.input, image=args.image, seed=args.seed, batch_size=args.batch_size,
        backends=args.backends, reference=args.reference, require=args.require,
        dtype="fast-math" if args.fast_math else args.dtype, timeout_s=args.timeout,
        batch_sizes=args.batch_sizes, warmup=args.warmup, iters=args.iters, budget_s=args.budget,
        latency=not args.no_latency, min_cosine=args.min_cosine, max_rel=args.max_rel,
        layers=args.layers or args.replay, replay=args.replay, against=args.against, save_reference=bool(args.save_reference), truth=args.truth,
        images=args.images, limit=args.limit, variants=_variants(args.variants), stability=args.stability,
    )


def _variants(text: str) -> tuple[str, ...] | None:
    """--variants: None for all the artifact has, () for none, else the names."""
    if text.strip() == "all":
        return None
    if text.strip() == "none":
        return ()
    names = _names(text)
    if not names:  # '' is no shorthand for none: say it
        raise UserError(f"--variants {text!r} names no variant; write all, none, or a list such as int8,fp16")
    return names


def run(args: argparse.Namespace, out: Console, err: Console, argv) -> int:
    from .plan import check_names
    from .render import render
    from .run import compare

    models = args.models or list(registry.ALIASES)
    if len(models) > 1 and (args.save_reference or args.against):
        raise UserError("--save-reference and --against work on one model at a time; name one model")
    options = options_from(args)
    check_names(options)
    for model in models:
        registry.resolve(model, options.artifacts)
    present = exported_if_missing(args, models, err) if args.if_missing else {}
    reports, errors = [], {}
    from dataclasses import replace

    from vitparity import sizes

    runs = [(model, size) for model in models for size in (sizes.parse_list(args.size) if args.size else [None])]
    for model, size in runs:
        try:
            with err.status(f"{model}: starting") as status:
                if args.hunt:
                    report, raw = hunted(args, model, replace(options, size=size), status.update, present.get(model))
                else:
                    report, raw = compare(model, replace(options, size=size), step=status.update, art=present.get(model))
        except UserError as error:
            if len(runs) == 1:
                raise
            # One model that cannot be compared does not lose the others' results: said now, in the JSON, and in
            # the exit code (2, below a FAIL's 1).
            errors[model + (f" at {sizes.label(size)}" if size else "")] = str(error)
            err.print(Text.assemble(("error:", "bold red"), f" {error}"), soft_wrap=True)
            continue
        for part in render(report, args.verbose):
            out.print(part, soft_wrap=bool(getattr(part, "no_wrap", False)))  # a command to copy: one line, unbroken

        if args.save_reference:
            from . import reference

            reference.save(args.save_reference, report, raw)
            err.print(f"saved the input and every backend's outputs to {args.save_reference}")
        reports.append(report)
    codes = [r.exit_code for r in reports] + [2] * len(errors)
    code = 1 if 1 in codes else max(codes)  # the worst: a FAIL above "could not compare"
    if args.json:
        write_json_atomic(Path(args.json), {"exit_code": code, "reports": [r.to_dict() for r in reports],
                                            "errors": [{"model": m, "error": e} for m, e in errors.items()]})
        err.print(f"wrote {args.json}")
    if args.report:
        from . import markdown

        command = shlex.join(["python", "-m", "compare", *argv])
        written = markdown.write(Path(args.report), reports, command, make_compare(argv), errors)
        err.print(f"wrote {', '.join(map(str, written))}")
    # Nothing compared is no PASS (saving the reference alone is a real use: the verdict says so).
    # Said last, once the tables, the JSON and the report are out, so the user sees what was skipped and why.
    for report in reports:
        if report.devices_not_run and report.verdict.status == "NOT COMPARED":
            raise UserError(f"{report.model}: " + " ".join(report.devices_not_run.values()))
        if report.verdict.status == "NOT COMPARED" and report.exit_code == 2:
            not_run = ", ".join(f"{b.name} ({b.status})" for b in report.backends if b.name != report.reference)
            raise UserError(
                f"{report.model}: nothing was compared against {report.reference}"
                + (f"; not run: {not_run}" if not_run else "") + "; choose backends this host can run"
            )
    return code


def hunted(args: argparse.Namespace, model: str, options, step, art):
    """--hunt: the folder's images and their variations as one --images run (batch 1), and each backend's worst input
    written to --hunt-out with the command that reproduces it (compare/hunt.py)."""
    from dataclasses import replace

    from vitparity import artifact, processes, sizes

    from . import hunt
    from .run import compare

    art = art or artifact.load(args.artifacts, registry.resolve(model, args.artifacts).key)
    out = hunt.output_folder(args.hunt_out)
    with processes.temp_folder(processes.IMAGES_PREFIX) as folder:
        made = hunt.prepare(args.hunt, folder, art.manifest["data_config"], 0, step)
        report, raw = compare(model, replace(options, images=str(folder), batch_size=1), step=step, art=art)
        base = ["python", "-m", "compare", report.model, "--artifacts", args.artifacts]
        if options.size is not None:
            base += ["--size", sizes.label(options.size)]
        found = []
        for worst in hunt.worst_inputs(report, made, out):
            backend, _, variant = worst.backend.partition(":")
            command = [*base, "--backends", ",".join(dict.fromkeys([options.reference, backend])), "--variants",
                       variant or "none", "--reference", options.reference]
            found.append(replace(worst, command=shlex.join([*command, "--image", worst.path, "--no-latency"])))
    return replace(report, hunt=found), raw


def exported_if_missing(args: argparse.Namespace, models: list[str], err: Console) -> dict:
    """--if-missing: each model's artifact, loaded with every hash checked, the missing or damaged ones exported first.

    Deciding needs no torch: an artifact that loads is present, and is handed to the comparison as loaded (its files
    are not hashed twice). Only when one does not load is the exporter started, as `python -m exporter --if-missing`
    in a process of its own (the one place that exports, repairs a damaged artifact, and never replaces the user's
    weights); its exit code is this run's when it fails.
    """
    import signal

    from vitparity import artifact, processes

    present, missing = {}, []
    for model in models:
        try:
            present[model] = artifact.load(args.artifacts, registry.resolve(model, args.artifacts).key)
        except UserError:
            missing.append(model)
    if not missing:
        return present
    weights = ["--weights", args.weights] if args.weights is not None else []
    err.print(f"exporting what is missing: {', '.join(missing)} (python -m exporter --if-missing)")
    # The one launcher: Ctrl-C here stops it (TERM: it cleans its staging up), and it dies with this process.
    code = processes.run_child([sys.executable, "-m", "exporter", "--artifacts", args.artifacts, "--if-missing", *weights,
                                "--", *missing], cwd=None, timeout_s=math.inf, parent_death=signal.SIGTERM)
    if code != 0:
        raise ExportFailed(code)
    return present


class ExportFailed(UserError):
    """The export --if-missing started failed; it has said why on stderr. Its exit code becomes this run's."""

    def __init__(self, code: int):
        super().__init__(f"the export of a missing artifact failed (exit {code}); its error is above")
        self.exit_code = code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out, err = console(), console(stderr=True)
    return guarded(lambda: run(parse(argv), out, err, argv), err)


if __name__ == "__main__":
    sys.exit(main())
