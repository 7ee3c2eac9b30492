"""`ort-cpu:int8` against `ort-cpu` and `torch-cpu`, and its pooled cosine against eager fp32 over the photos.

One runtime at a time: compare runs each row in its own worker, one after the other, so no two
thread pools share the cores. The photos are the bundled one and variations of it (crops, mirror
images, colour shifts), written to a temporary folder.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

# The targets: printed next to what was measured, never asserted.
TARGETS = {"int8 vs ort-cpu": 1.8, "int8 vs torch-cpu": 3.5, "pooled cosine": 0.999}


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


def ensure_int8(model: str, artifacts: str) -> None:
    """Export the artifact if missing and add its int8 variant if missing (the exporter's own CLI)."""
    subprocess.run([sys.executable, "-m", "exporter", model, "--artifacts", artifacts, "--if-missing", "--variant", "int8"],
                   check=True)


def measure(model: str, artifacts: str, batch_sizes=(1, 8), budget_s: float = 3.0) -> list[dict]:
    """One row per batch size: mean ms of torch-cpu, ort-cpu and ort-cpu:int8, the two speed-ups, and the
    worst pooled cosine of ort-cpu:int8 against eager fp32 over the photos."""
    from compare.run import CompareOptions, compare

    ensure_int8(model, artifacts)
    with tempfile.TemporaryDirectory(prefix="vit-parity-bench-") as folder:
        options = CompareOptions(artifacts=artifacts, backends=("torch-cpu", "ort-cpu"), variants=("int8",),
                                 batch_sizes=tuple(batch_sizes), budget_s=budget_s, images=str(photos(Path(folder))),
                                 batch_size=max(batch_sizes))
        report, _ = compare(model, options)
    cosine = min(row.worst_sample_cosine for row in report.accuracy if row.backend == "ort-cpu:int8" and row.output == "pooled" and not row.group)
    mean = {(row.backend, row.batch): row.mean_ms for row in report.latency}
    return [{"model": report.model, "batch": size, "torch-cpu ms": mean[("torch-cpu", size)], "ort-cpu ms": mean[("ort-cpu", size)],
             "int8 ms": mean[("ort-cpu:int8", size)],
             "int8 vs ort-cpu": mean[("ort-cpu", size)] / mean[("ort-cpu:int8", size)],
             "int8 vs torch-cpu": mean[("torch-cpu", size)] / mean[("ort-cpu:int8", size)],
             "pooled cosine": cosine, "images": report.input["count"], "verdict": report.verdict.status}
            for size in batch_sizes]
