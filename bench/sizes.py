"""Latency, throughput and peak memory per input size, for an artifact exported with --dynamic-size: one
`python -m compare MODEL --size S` per size (each backend in its own worker, one runtime at a time), at batch 1 and
the batch sizes asked. Attention's cost grows with the square of the tokens: the plot (plot extra) shows latency
against tokens, on log axes, with the slope of each backend's fit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from vitparity import sizes as sizing
from vitparity.errors import UserError

DEFAULT_SIZES = "224,448,518x392"


def measure(model: str, artifacts: str, sizes: str = DEFAULT_SIZES, backends: str = "torch-cpu,ort-cpu",
            batch: int = 1) -> dict:
    """{"model", "rows": [{size, tokens, backend, p50_ms, images_per_s, tokens_per_s, peak_rss_mb, passed}], "failed"}."""
    from vitparity import artifact, registry

    key = registry.resolve(model, artifacts).key
    manifest = artifact.load(artifacts, key).manifest
    record = sizing.record(manifest)
    if not record["dynamic"]:
        raise UserError(f"{key}: its artifact takes {sizing.label(record['native'])} only; export it with python -m "
                        f"exporter {key} --dynamic-size")
    layout = manifest.get("token_layout") or {}
    prefix = int(layout.get("cls", 0)) + int(layout.get("registers", 0))
    rows, failed = [], []
    for size in sizing.parse_list(sizes, "--sizes"):
        size = sizing.check(manifest, size, "--sizes")
        tokens = prefix + (size[0] // record["patch"][0]) * (size[1] // record["patch"][1])
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "r.json"
            # Fresh workers (VIT_PARITY_WARM=0): the peak memory of each runtime as a process that imports it alone
            # would have it; a worker forked from the warm-start server never touched the pages the import did.
            done = subprocess.run([sys.executable, "-m", "compare", key, "--artifacts", artifacts, "--size", sizing.label(size),
                                   "--backends", backends, "--variants", "none", "--batch-sizes", str(batch), "--json", str(out)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False,
                                  env={**os.environ, "VIT_PARITY_WARM": "0"})
            if done.returncode not in (0, 1) or not out.is_file():
                failed.append(f"{key} at {sizing.label(size)}: compare exited {done.returncode}: "
                              f"{(done.stderr.strip().splitlines() or [''])[-1]}")
                continue
            report = json.loads(out.read_text())["reports"][0]
        peak = {b["name"]: b["details"].get("peak_rss_mb") for b in report["backends"]}
        for cell in report["latency"]:
            rows.append({"size": sizing.label(size), "tokens": tokens, "backend": cell["backend"], "p50_ms": cell["p50_ms"],
                         "images_per_s": cell["images_per_s"], "tokens_per_s": cell["images_per_s"] * tokens,
                         "peak_rss_mb": peak.get(cell["backend"]), "passed": report["verdict"] == "PASS"})
    return {"model": key, "batch": batch, "rows": rows, "failed": failed}


def slope(rows: list[dict], backend: str) -> float | None:
    """The exponent of latency against tokens (a least-squares line on log axes): 1 linear, 2 attention-bound."""
    import numpy as np

    points = [(r["tokens"], r["p50_ms"]) for r in rows if r["backend"] == backend and r["p50_ms"]]
    if len({t for t, _ in points}) < 2:
        return None
    x, y = np.log([t for t, _ in points]), np.log([ms for _, ms in points])
    return float(np.polyfit(x, y, 1)[0])


def plot(found: dict, path: Path) -> Path | None:
    """Latency against tokens, per backend, on log axes; None without matplotlib (the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for backend in dict.fromkeys(r["backend"] for r in found["rows"]):
        points = sorted((r["tokens"], r["p50_ms"]) for r in found["rows"] if r["backend"] == backend)
        fitted = slope(found["rows"], backend)
        axes.plot(*zip(*points), marker="o", label=f"{backend} (slope {fitted:.2f})" if fitted else backend)
    axes.set(xscale="log", yscale="log", xlabel="tokens", ylabel=f"p50 latency, ms (batch {found['batch']})",
             title=f"{found['model']}: latency against tokens")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
