"""Every derived graph against `ort-cpu` and eager `torch-cpu` on this host: speed at batch 1 and 8, and its worst
pooled cosine against eager fp32 over the photos; then the fastest graph that passed its class here.

One runtime at a time: compare runs each row in its own worker, one after the other, so no two thread
pools share the cores. The photos are the bundled one and variations of it (crops, mirror images, colour
shifts), written to a temporary folder. A graph is "verified here" when its row passes its class on them.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from vitparity.errors import UserError

# The issues' targets: printed next to what was measured, never asserted.
TARGETS = {"int8 vs ort-cpu": 1.5, "pooled cosine": 0.999}
# The graphs measured: each exporter variant, made here if the artifact lacks it (fused before int8-fused).
GRAPHS = ("fused", "int8", "int8-fused", "fp16")


def photos(folder: Path, count: int = 16) -> Path:
    """The bundled photo and `count - 1` deterministic variations of it, as JPEG files in `folder`."""
    import numpy as np
    from PIL import Image, ImageOps

    from compare.inputs import default_image

    base = Image.open(default_image()).convert("RGB")
    base.save(folder / "photo_00.jpg", quality=95)
    rng = np.random.default_rng(0)
    w, h = base.size
    for i in range(1, count):
        left, top = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        image = base.crop((left, top, left + 3 * w // 4, top + 3 * h // 4))
        if i % 2:
            image = ImageOps.mirror(image)
        shift = rng.integers(-30, 30, 3)
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + shift, 0, 255).astype(np.uint8))
        image.save(folder / f"photo_{i:02d}.jpg", quality=90)
    return folder


def ensure_variants(model: str, artifacts: str, graphs=GRAPHS) -> tuple[list[str], list[str]]:
    """Export the artifact if missing and add each graph it lacks (the exporter's own CLI, one variant per call,
    so that one that cannot be verified here does not stop the others). Returns (present, why the others failed)."""
    from vitparity import artifact, registry
    from vitparity.graphs import precision_variants

    def export(*flags: str) -> str:
        """"" when the exporter succeeded, else its error line."""
        done = subprocess.run([sys.executable, "-m", "exporter", "--artifacts", artifacts, "--if-missing", *flags, "--", model],
                              capture_output=True, text=True)
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        return "" if not done.returncode else lines[-1][len("error:"):].strip() if lines else f"exit {done.returncode}"

    why = export()  # the artifact itself first: without it no variant can be made
    if why:
        raise UserError(f"cannot export {model}: {why}")
    failed = [f"{graph}: {why}" for graph in graphs for why in [export("--variant", graph)] if why]
    present = precision_variants(artifact.load(artifacts, registry.resolve(model).key).manifest)
    made = [graph for graph in graphs if graph in present]
    return made, failed


def measure(model: str, artifacts: str, batch_sizes=(1, 8), budget_s: float = 3.0) -> dict:
    """Per graph row (torch-cpu, ort-cpu, ort-cpu:<variant>): median (p50) ms at each batch size, its speed-ups against
    ort-cpu and torch-cpu, the worst pooled cosine against eager fp32 over the photos, and whether it passed its
    class there. Also the variants that could not be made here, with why."""
    from compare.plan import CompareOptions
    from compare.run import compare

    graphs, failed = ensure_variants(model, artifacts)
    if not graphs:
        raise UserError(f"no derived graph of {model} could be made here: {'; '.join(failed)}")
    with tempfile.TemporaryDirectory(prefix="vit-parity-bench-") as folder:
        options = CompareOptions(artifacts=artifacts, backends=("torch-cpu", "ort-cpu"), variants=tuple(graphs),
                                 batch_sizes=tuple(batch_sizes), budget_s=budget_s, images=str(photos(Path(folder))),
                                 batch_size=max(batch_sizes))
        report, _ = compare(model, options)
    # the median, not the mean: a few stalled runs on a noisy shared host move the mean, not the median
    median = {(row.backend, row.batch): row.p50_ms for row in report.latency}
    rows = []
    for name in ["torch-cpu", "ort-cpu", *(f"ort-cpu:{graph}" for graph in graphs)]:
        accuracy = [row for row in report.accuracy if row.backend == name]
        pooled = [row.worst_sample_cosine for row in accuracy if row.output == "pooled" and not row.group]
        verified = name == "torch-cpu" or (bool(accuracy) and name not in report.verdict.failed)
        timed = {size: median.get((name, size)) for size in batch_sizes}
        rows.append({"graph": name, "ms": timed, "verified": verified, "pooled cosine": pooled[0] if pooled else None,
                     "vs ort-cpu": {s: median[("ort-cpu", s)] / t for s, t in timed.items() if t and ("ort-cpu", s) in median},
                     "vs torch-cpu": {s: median[("torch-cpu", s)] / t for s, t in timed.items() if t and ("torch-cpu", s) in median}})
    fastest = {size: min((r for r in rows if r["verified"] and r["ms"].get(size)), key=lambda r: r["ms"][size])["graph"]
               for size in batch_sizes if any(r["verified"] and r["ms"].get(size) for r in rows)}
    return {"model": report.model, "rows": rows, "fastest": fastest, "failed": failed, "images": report.input["count"]}
