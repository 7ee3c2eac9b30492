"""Command line for the exporter: `python -m exporter [MODEL ...]`."""
from __future__ import annotations

import argparse
import math
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import artifact, registry
from .artifact import MANIFEST, artifact_folder
from .errors import UserError

DEFAULT_ARTIFACTS = "artifacts"
MIN_OPSET = 18  # torch.onnx's dynamo exporter writes opset 18; lower ones need a down-conversion it does not promise


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: one line, exit code 2, no usage dump."""

    def error(self, message):
        raise UserError(f"{message}. See: {self.prog} --help")


def parse(argv=None) -> argparse.Namespace:
    parser = Parser(
        prog="python -m exporter",
        description="Export timm ViTs to verified ONNX artifacts at their native resolution.",
    )
    parser.add_argument("models", nargs="*", help=f"aliases ({', '.join(registry.ALIASES)}) or timm model names; default: every alias")
    parser.add_argument("--list", action="store_true", help="show the registered aliases and exit")
    parser.add_argument("--weights", default="auto", help="auto (HF cache, hub, then random init), random, or a weights file/folder (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init (default: 0)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    parser.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifacts root (default: artifacts)")
    parser.add_argument("--min-cosine", type=float, default=artifact.VERIFY_DEFAULTS["min_cosine"], help="verify: lowest cosine ONNX vs eager (default: 0.99999)")
    parser.add_argument("--max-abs", type=float, default=artifact.VERIFY_DEFAULTS["max_abs"], help="verify: largest abs diff ONNX vs eager, per unit of the output's peak |value| when that exceeds 1 (default: 1e-4)")
    parser.add_argument("--decompose-layernorm", action="store_true",
                        help="also write model.ln-decomposed.onnx, LayerNorms as primitive ops, verified; ort-cann runs it so every node can stay on the NPU")
    parser.add_argument("--if-missing", action="store_true", help="export only models that have no artifact yet")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the exporter's own log")
    args = parser.parse_args(argv)
    if args.opset is not None:
        import onnx.defs

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= args.opset <= newest:
            raise UserError(
                f"--opset {args.opset} is out of range: the dynamo exporter traces at opset {MIN_OPSET}, "
                f"and the installed onnx knows opsets up to {newest}; pick one in {MIN_OPSET}..{newest}"
            )
    if args.seed < 0:
        raise UserError(f"--seed must be at least 0, got {args.seed}")
    check_thresholds(args.min_cosine, args.max_abs, "--max-abs", "an absolute difference")
    return args


def check_thresholds(min_cosine: float | None, max_error: float | None, error_flag: str, what: str) -> None:
    """Refuse thresholds no comparison can mean: a cosine outside (0, 1], an error bound that is not positive and finite."""
    if min_cosine is not None and not (0 < min_cosine <= 1):  # NaN fails this too
        raise UserError(f"--min-cosine must be in (0, 1], got {min_cosine:g}; e.g. --min-cosine 0.999")
    if max_error is not None and not (0 < max_error < math.inf):
        raise UserError(f"{error_flag} must be {what} above 0 and finite, got {max_error:g}; e.g. {error_flag} 1e-2")


def aliases_table() -> Table:
    table = Table(title="Registered models")
    table.add_column("alias")
    table.add_column("timm name")
    for alias, name in registry.ALIASES.items():
        table.add_row(alias, name)
    return table


def summary_table(results) -> Table:
    table = Table(title="Exported artifacts")
    for column in ("model", "input", "params", "opset", "nodes", "ONNX MB", "export s", "verify cosine", "verify max abs", "weights"):
        table.add_column(column, justify="left" if column in ("model", "weights") else "right")
    for r in results:
        table.add_row(
            r.model,
            f"{r.input_size[1]}x{r.input_size[2]}",
            f"{r.params / 1e6:.1f}M",
            str(r.opset),
            str(r.nodes),
            f"{r.onnx_mb:.1f}",
            f"{r.seconds:.1f}",
            f"{r.cosine:.7f}",
            f"{r.max_abs:.2e}",
            r.weights_source,
        )
    return table


RANDOM_WARNING = (
    "WARNING: {model} uses random weights ({source}). The numbers validate the export, "
    "not the model's quality. Pass --weights PATH or fill the Hugging Face cache for real weights."
)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    from . import export as exporting
    from .weights import is_random

    names = args.models or list(registry.ALIASES)
    specs = [registry.resolve(name) for name in names]  # fail on a bad name before minutes of work
    if args.if_missing:
        present = []
        for spec in specs:
            if not (artifact_folder(args.artifacts, spec.key) / MANIFEST).is_file():
                continue
            try:
                artifact.load(args.artifacts, spec.key)  # every hash checked: a damaged artifact is not "present"
            except UserError as why:
                err.print(f"{spec.key}: exporting again, the artifact there is unusable: {why}")
                continue
            present.append(spec.key)
            err.print(f"{spec.key}: an artifact exists under {args.artifacts}/, not exporting it again")
            for warning in artifact.verify_warnings(artifact.read_manifest(artifact_folder(args.artifacts, spec.key))):
                err.print(Text(f"warning: {warning}", style="yellow"))
        names = [s.timm_name for s in specs if s.key not in present]
        if not names:
            return 0
    options = exporting.ExportOptions(
        weights=args.weights,
        seed=args.seed,
        opset=args.opset or exporting.DEFAULT_OPSET,
        min_cosine=args.min_cosine,
        max_abs=args.max_abs,
        verbose=args.verbose,
        decompose_layernorm=args.decompose_layernorm,
    )
    results = []
    with err.status("starting") as status:
        for name in names:
            try:
                result = exporting.export(name, Path(args.artifacts), options, step=status.update)
            except UserError as error:
                if args.verbose and error.__cause__ is not None:  # -v: the whole chain, not just its root
                    err.print(Text("".join(traceback.format_exception(error.__cause__)), style="dim"))
                raise
            err.log(f"{result.model}: exported and verified in {result.seconds:.1f} s -> {result.folder}")
            if is_random(result.weights_source):
                err.print(Text(RANDOM_WARNING.format(model=result.model, source=result.weights_source), style="bold yellow"))
            results.append(result)
    if args.json:
        out.print_json(exporting.result_json(results))
    else:
        out.print(summary_table(results))
    return 0


def console(stderr: bool = False) -> Console:
    """A Rich console; piped output (CI, make, files) gets a wide one so tables keep their columns.

    Markup is off: messages and table cells carry user text (model names, paths, key names such as
    "[blocks.0.norm1.weight]") that must print as written. Styles come from Text objects.
    """
    # log_path=False: a log line ends with its time, not with the source line that printed it.
    probe = Console(stderr=stderr, markup=False, log_path=False)
    return probe if probe.is_terminal else Console(stderr=stderr, width=200, markup=False, log_path=False)


def _error(message: str) -> Text:
    return Text.assemble(("error:", "bold red"), " ", message)


def guarded(body, err: Console, interrupted: str = "interrupted") -> int:
    """Run a CLI body and return its exit code; user errors become one line and a code, never a traceback."""
    try:
        return body()
    except UserError as error:
        err.print(_error(str(error)), highlight=False, soft_wrap=True)
        return error.exit_code
    except OSError as error:  # a path the user gave cannot be written or read: full disk, no permission
        err.print(_error(f"{error}; check the path and the free space"), highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM/SIGHUP (exporter.Stopped)
        from . import exit_code

        err.print(Text(interrupted, style="bold red"))
        return exit_code(stop)


def main(argv=None) -> int:
    out, err = console(), console(stderr=True)

    def body() -> int:
        args = parse(argv)
        if args.list:
            out.print(aliases_table())
            return 0
        return run(args, out, err)

    return guarded(body, err, "interrupted: no artifact was changed by the unfinished export")


if __name__ == "__main__":
    sys.exit(main())
