"""Many images (`--images DIR`), streamed in batches with bounded memory.

The first worker (the truth's or the reference's, which imports timm anyway) decodes each image once,
through the model's own timm eval transform, into one float32 file on disk, so the parent never
imports timm and torch for this. Each worker then reads it batch by batch: the truth (--truth) and the reference write
their outputs to disk as they go, and every other backend reads them back batch by batch and keeps
only per-image figures (cosine, relative error, ...) and its pooled embeddings, for neighbour
agreement. Nothing holds every image's tokens in memory: the parent holds a row of numbers per
image, and each worker one batch (and its pooled embeddings).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from vitparity.artifact import OUTPUT_NAMES, sha256
from vitparity.errors import UserError

OUTPUTS = OUTPUT_NAMES
INPUTS = "inputs.f32"
IMAGES = "images.json"


def decode(plan: dict) -> tuple[list[dict], list[dict]]:
    """In the reference's worker, which has timm imported already: decode every image of the plan into
    its folder (inputs.f32) and record what was taken and skipped there (images.json)."""
    folder = Path(plan["folder"])
    images, skipped = preprocess([Path(p) for p in plan["decode"]["paths"]], plan["decode"]["data_config"], folder,
                                 limit=plan["decode"].get("limit"))
    (folder / IMAGES).write_text(json.dumps({"images": images, "skipped": skipped}))
    return images, skipped


def decoded(folder: Path) -> tuple[list[dict], list[dict]]:
    """(images, skipped) as the reference's worker recorded them."""
    found = json.loads((Path(folder) / IMAGES).read_text())
    return found["images"], found["skipped"]


def preprocess(paths: list[Path], data_config: dict, folder: Path, step=lambda message: None, limit: int | None = None
               ) -> tuple[list[dict], list[dict]]:
    """Decode and transform each image, one at a time, appending it to folder/inputs.f32, until `limit` images.

    Returns (images, skipped): {"path", "sha256"} per image written, in order, and {"path", "reason"} per
    file that is not a readable image. Nothing is dropped silently.
    """
    from vitparity.images import eval_transform, open_rgb, printable, transformed

    transform = None  # made at the first readable image: a folder with none is answered without importing torch and timm
    images, skipped = [], []
    with open(folder / INPUTS, "wb") as out:
        for index, path in enumerate(paths):
            if limit and len(images) == limit:
                break
            step(f"preprocessing {progress_bar(index, len(paths))} {index}/{len(paths)} images")
            try:
                rgb = open_rgb(path, data_config)
            except UserError as why:
                skipped.append({"path": printable(path), "reason": str(why)})
                continue
            transform = transform or eval_transform(data_config)
            transformed(rgb, transform).tofile(out)
            images.append({"path": printable(path), "sha256": sha256(path)})
    return images, skipped


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def read_rows(path: Path, start: int, count: int, shape, dtype=np.float32) -> np.ndarray:
    """Rows [start, start + count) of a raw array file of rows of `shape`; read, not mapped, so memory stays one batch."""
    size = int(np.prod(shape))
    itemsize = np.dtype(dtype).itemsize
    rows = np.fromfile(path, dtype=dtype, count=count * size, offset=start * size * itemsize)
    if rows.size != count * size:
        raise ValueError(f"{path} holds fewer rows than {start + count}")
    return rows.reshape(count, *shape)


# ---------------------------------------------------------------------------------------------
# The worker side: one backend over every image.


def stream(backend, plan: dict, groups: dict, step=lambda done, total: None, first: tuple | None = None
           ) -> tuple[dict[str, np.ndarray], float]:
    """Run `backend` over every image of `plan`, batch by batch. Returns (arrays, inference seconds).

    `first` is (outputs, seconds) of the first batch, computed already by the worker's first run: reused.
    `plan` (from the parent): inputs (as many rows as the decoder wrote), batch, shape, and optionally "write" (a path prefix where
    this backend's outputs go, in "dtype"), "reference" and "truth" ({"prefix", "dtype"} of outputs
    written before by those runs). Arrays: "embeddings" (pooled, one row per image) and, against each
    of reference/truth, "<against>|<output>|<group>|<figure>" with one value per image.
    """
    from . import judge

    size, shape = plan["batch"], plan["shape"]
    count = Path(plan["inputs"]).stat().st_size // (4 * int(np.prod(shape)))  # float32 rows the decoder wrote
    writers = {name: open(f"{plan['write']}.{name}", "wb") for name in OUTPUTS} if plan.get("write") else {}
    dtype = np.dtype(plan.get("dtype", "float32"))
    figures: dict[str, list] = {"reference": [], "truth": []}
    embeddings, seconds, shapes = [], 0.0, {}
    try:
        for start in range(0, count, size):
            rows = min(size, count - start)
            if start == 0 and first is not None:
                outputs, took = first
            else:
                batch = read_rows(Path(plan["inputs"]), start, rows, shape)
                started = time.perf_counter()
                outputs = backend.run(batch)
                took = time.perf_counter() - started
            seconds += took
            shapes = {name: list(outputs[name].shape[1:]) for name in OUTPUTS}
            embeddings.append(np.asarray(outputs["pooled"], dtype=np.float32))
            for name, handle in writers.items():
                np.ascontiguousarray(outputs[name], dtype=dtype).tofile(handle)
            for against in ("reference", "truth"):
                if plan.get(against):
                    figures[against].append(judge.item_figures(outputs, _written(plan[against], against, outputs, start, rows),
                                                               groups))
            step(start + rows, count)
    finally:
        for handle in writers.values():
            handle.close()
    if writers:
        Path(f"{plan['write']}.json").write_text(json.dumps({"dtype": dtype.name, "shapes": shapes}))
    arrays = {key: value for against, chunks in figures.items() if chunks
              for key, value in judge.wire(against, judge.concatenate(chunks)).items()}
    arrays["embeddings"] = np.concatenate(embeddings)
    return arrays, seconds


def _written(written: dict, against: str, outputs: dict, start: int, rows: int) -> dict[str, np.ndarray]:
    """Rows [start, start + rows) of the outputs the reference or the truth wrote, of the shapes this backend gave."""
    meta = json.loads(Path(f"{written['prefix']}.json").read_text())
    want = {}
    for name in OUTPUTS:
        want_shape = meta["shapes"][name]
        got = np.asarray(outputs[name])
        if list(got.shape[1:]) != want_shape:
            raise ValueError(f"{name} has shape {list(got.shape[1:])} per image, the {against} {want_shape}")
        want[name] = read_rows(Path(f"{written['prefix']}.{name}"), start, rows, want_shape, meta["dtype"])
    return want
