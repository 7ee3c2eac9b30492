"""make bench: `python -m bench [MODEL ...] [--artifacts DIR] [--only latency,variants,floor,sizes] [--pairs N]`.

latency  the comparison with a latency sweep over batch sizes 1, 2, 4, 8 (every backend this host has);
variants every derived graph (fused, int8, int8-fused, fp16) against ort-cpu and eager at batch 1 and 8, its pooled cosine
         over the photos, and the fastest graph verified on this host (bench/variants.py);
floor    warm `make compare` against the same work in one process (bench/floor.py), A B A B.
sizes    an artifact exported with --dynamic-size at each --sizes: latency, images/s, tokens/s and peak memory per
         size, and latency against tokens (bench/sizes.py; a PNG with the plot extra). Not in the default parts.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from vitparity import registry
from vitparity.cli import Parser, console, guarded
from vitparity.errors import UserError

from . import floor, sizes, variants

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("latency", "variants", "floor", "sizes")
DEFAULT_PARTS = ("latency", "variants", "floor")  # sizes needs an artifact exported with --dynamic-size


def _make_compare(model: str, artifacts: str) -> float:
    """Wall seconds of `make compare MODEL=model`, this interpreter as PYTHON (nothing is installed)."""
    started = time.perf_counter()
    subprocess.run(["make", "-s", "compare", f"MODEL={model}", f"ARTIFACTS={artifacts}", f"PYTHON={sys.executable}"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def _floor(model: str, artifacts: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, str(Path(floor.__file__)), model, artifacts], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def floor_pairs(model: str, artifacts: str, pairs: int) -> dict:
    """`pairs` runs of each, alternated A B A B after one warm-up of each; the median ratio of the pairs."""
    _make_compare(model, artifacts), _floor(model, artifacts)  # warm: the artifact exists, the page cache holds it
    tool, one = [], []
    for _ in range(pairs):
        tool.append(_make_compare(model, artifacts))
        one.append(_floor(model, artifacts))
    ratios = [a / b for a, b in zip(tool, one)]
    return {"model": model, "make compare s": tool, "floor s": one, "ratios": ratios, "median ratio": statistics.median(ratios)}


def parse(argv=None) -> argparse.Namespace:
    """The bench's options; every bad one is a one-line UserError before any work."""
    parser = Parser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"aliases or timm names (default: {', '.join(registry.ALIASES)})")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--only", default=",".join(DEFAULT_PARTS), help=f"comma-separated parts: {', '.join(PARTS)} "
                        f"(default: {','.join(DEFAULT_PARTS)})")
    parser.add_argument("--sizes", default=sizes.DEFAULT_SIZES, help=f"sizes: the input sizes (default: {sizes.DEFAULT_SIZES})")
    parser.add_argument("--pairs", type=int, default=3, help="floor: A B pairs (default: 3)")
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown or not args.parts:
        raise UserError(f"--only {args.only!r}: " + (f"unknown part {unknown[0]!r}" if unknown else "names no part")
                        + f"; choose from {', '.join(PARTS)}")
    if args.pairs < 1:
        raise UserError(f"--pairs must be at least 1, got {args.pairs}")
    args.models = [registry.resolve(model).key for model in args.models] or list(registry.ALIASES)  # a bad name fails now
    return args


def main(argv=None) -> int:
    out, err = console(), console(stderr=True)
    return guarded(lambda: run(parse(argv), out, err), err)


def run(args: argparse.Namespace, out, err) -> int:
    """Each part in turn; a part that fails for a model says why in one line, and the exit code is then 1."""
    parts, models, failed = args.parts, args.models, []
    if "latency" in parts:
        for model in models:
            done = subprocess.run(["make", "-s", "compare", f"MODEL={model}", f"ARTIFACTS={args.artifacts}",
                                   f"PYTHON={sys.executable}", "ARGS=--batch-sizes 1,2,4,8"], cwd=ROOT, check=False)
            if done.returncode not in (0, 1):  # 1 is a comparison that ran and failed: its tables say so
                failed.append(f"latency of {model}: make compare exited {done.returncode}")
    if "variants" in parts:
        from vitparity.environment import cpu

        host = cpu()
        for model in models:
            try:
                found = variants.measure(model, args.artifacts)
            except (UserError, subprocess.CalledProcessError) as why:
                failed.append(f"variants of {model}: {_reason(why)}")
                continue
            out.print(variants_table(found, host))
            for size, graph in found["fastest"].items():
                row = next(r for r in found["rows"] if r["graph"] == graph)
                out.print(f"{found['model']}: the fastest graph verified on this host at batch {size} is {graph} "
                          f"({row['ms'][size]:.1f} ms, {row['vs torch-cpu'].get(size, float('nan')):.2f}x eager, "
                          f"{row['vs ort-cpu'].get(size, float('nan')):.2f}x ort-cpu)", highlight=False)
            failed += [f"variants of {model}: {why}" for why in found["failed"]]
    if "sizes" in parts:
        for model in models:
            try:
                found = sizes.measure(model, args.artifacts, args.sizes)
            except UserError as why:
                failed.append(f"sizes of {model}: {why}")
                continue
            out.print(sizes_table(found))
            drawn = sizes.plot(found, Path(args.artifacts) / f"bench-sizes-{found['model']}.png")
            out.print(f"{found['model']}: latency against tokens: " + (f"{drawn}" if drawn else "no plot: matplotlib is "
                      "not installed (the plot extra)"))
            failed += found["failed"]
    if "floor" in parts:
        table = Table(title="Time to verdict: warm make compare against the same work in one process (A B A B)")
        for column in ("model", "make compare s", "floor s", "ratios", "median ratio [<=1.10]"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for model in models:
            try:
                found = floor_pairs(model, args.artifacts, args.pairs)
            except subprocess.CalledProcessError as why:
                failed.append(f"floor of {model}: {_reason(why)}")
                continue
            table.add_row(model, " ".join(f"{s:.2f}" for s in found["make compare s"]), " ".join(f"{s:.2f}" for s in found["floor s"]),
                          " ".join(f"{r:.3f}" for r in found["ratios"]), f"{found['median ratio']:.3f}")
        out.print(table)
    for line in failed:
        err.print(f"error: {line}")
    return 1 if failed else 0


def sizes_table(found: dict) -> Table:
    """One model at each size: tokens, p50 latency, images/s, tokens/s and the worker's peak memory, per backend."""
    table = Table(title=f"{found['model']} at each size, batch {found['batch']}, one runtime per process "
                        f"(latency slope against tokens: " + ", ".join(
                            f"{b} {sizes.slope(found['rows'], b):.2f}" for b in dict.fromkeys(r['backend'] for r in found['rows'])
                            if sizes.slope(found['rows'], b) is not None) + ")")
    for column in ("size", "tokens", "backend", "p50 ms", "images/s", "tokens/s", "peak MB", "verdict"):
        table.add_column(column, justify="left" if column in ("size", "backend", "verdict") else "right")
    for row in found["rows"]:
        table.add_row(row["size"], str(row["tokens"]), row["backend"], f"{row['p50_ms']:.1f}", f"{row['images_per_s']:.2f}",
                      f"{row['tokens_per_s']:.0f}", f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] else "-",
                      "PASS" if row["passed"] else "FAIL")
    return table


def variants_table(found: dict, host: dict) -> Table:
    """One model's graphs on this CPU: ms, speed-ups, worst pooled cosine over the photos, verified or not. It fits
    a 100-column terminal whole: the graph names never wrap or shorten, the targets are in the caption, and a value
    below its target is marked "!"."""
    sizes = sorted({size for row in found["rows"] for size in row["ms"]})
    features = ", ".join(host["int8_features"] or []) or "unknown"
    table = Table(title=f"{found['model']}: every graph on {host['model']} ({features}), one runtime per process, "
                        f"{found['images']} photos",
                  caption=f"targets: int8 at least {variants.TARGETS['int8 vs ort-cpu']:.1f}x ort-cpu at batch 1, pooled "
                          f"cosine at least {variants.TARGETS['pooled cosine']}; ! marks a value below its target",
                  pad_edge=False)
    cells = []
    for row in found["rows"]:
        int8 = "int8" in row["graph"]
        speed = [_ratio(row["vs ort-cpu"].get(s), variants.TARGETS["int8 vs ort-cpu"] if int8 and s == 1 else None) for s in sizes]
        cosine = row["pooled cosine"]
        cells.append((row["graph"], *(f"{row['ms'][s]:.1f}" if row["ms"].get(s) else "-" for s in sizes),
                      *(_ratio(row["vs torch-cpu"].get(s)) for s in sizes), *speed,
                      "-" if cosine is None else _against(cosine, "pooled cosine"), "yes" if row["verified"] else "NO"))
    # Headers of two short lines, so that the widest cells set the widths (a 100-column terminal holds the table whole).
    columns = ("graph", *(f"ms\nb{s}" for s in sizes), *(f"vs eager\nb{s}" for s in sizes),
               *(f"vs ort-cpu\nb{s}" for s in sizes), "worst pooled\ncosine", "verified\nhere")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i in (0, len(columns) - 1) else "right", no_wrap=not i)
    for row in cells:
        table.add_row(*row)
    return table


def _ratio(value: float | None, target: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" + ("!" if target and value < target else "")


def _reason(error: BaseException) -> str:
    if isinstance(error, subprocess.CalledProcessError):
        command = " ".join(map(str, error.cmd[:4])) if isinstance(error.cmd, (list, tuple)) else str(error.cmd)
        return f"{command} ... exited {error.returncode}"
    return str(error)


def _against(value: float, key: str) -> str:
    text = f"{value:.4f}"
    return text if value >= variants.TARGETS[key] else text + "!"


if __name__ == "__main__":
    sys.exit(main())
