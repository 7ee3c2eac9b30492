"""--hunt DIR: the worst input. Every image of a folder and simple variations of it (a crop, a screenshot-like
down-and-up resize, a mirror image, a dark and a bright frame, heavy JPEG; seeded) run through every backend as an
--images run, one image per batch (so that --image reproduces each figure: dynamic int8 depends on the batch). Per
backend, the input with the largest disagreement (its lowest cosine over every row) is written as a lossless PNG,
with the command that reproduces the finding with --image."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vitparity.errors import UserError
from vitparity.images import list_images, open_rgb, printable

from .results import WorstInput

# Each variation: (name, what it does). Seeded where it draws (the crop's place).
VARIATIONS = ("original", "crop", "resized", "mirror", "dark", "bright", "jpeg")


def variations(rgb, seed: int) -> list[tuple[str, object]]:
    """The image and its seeded variations, each an RGB PIL image."""
    import io

    from PIL import Image, ImageEnhance, ImageOps

    rng = np.random.default_rng(seed)
    width, height = rgb.size
    side = rng.uniform(0.4, 0.7)
    w, h = max(1, int(width * side)), max(1, int(height * side))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    small = rgb.resize((max(1, width // 4), max(1, height // 4)), Image.BILINEAR).resize((width, height), Image.NEAREST)
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=8)
    return [("original", rgb), ("crop", rgb.crop((left, top, left + w, top + h))), ("resized", small),
            ("mirror", ImageOps.mirror(rgb)), ("dark", ImageEnhance.Brightness(rgb).enhance(0.25)),
            ("bright", ImageEnhance.Brightness(rgb).enhance(1.9)), ("jpeg", Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))]


def prepare(source: str, folder: Path, data_config: dict, seed: int, step) -> dict[str, tuple[str, str]]:
    """Write every image of `source` and its variations into `folder` as PNG; {written path: (source, variation)}.
    A file that is not an image is skipped, as --images skips it; none readable is a UserError."""
    made, skipped = {}, []
    paths = list_images(source, "--hunt")
    for index, path in enumerate(paths):
        try:
            rgb = open_rgb(path, data_config)
        except UserError as why:
            skipped.append(f"{printable(path)}: {why}")
            continue
        for name, image in variations(rgb, seed + index):
            target = folder / f"{index:04d}-{Path(path).stem[:40]}.{name}.png"
            image.save(target, "PNG")
            made[str(target)] = (str(path), name)
        step(f"--hunt: {len(made)} inputs from {index + 1}/{len(paths)} images")
    if not made:
        raise UserError(f"--hunt {source}: none of the {len(paths)} files is a readable image"
                        + (f" (first: {skipped[0]})" if skipped else "") + "; pass a folder of JPEG or PNG photos")
    return made


def worst_inputs(report, made: dict[str, tuple[str, str]], out: Path) -> list[WorstInput]:
    """Per backend, the input whose worst row has the lowest cosine, copied into `out` (never through a link); the
    caller adds the command that reproduces it."""
    paths = [image["path"] for image in report.input["images"]]
    found = []
    for backend, rows in report.per_image.items():
        scores = [(min(values["cosine"][i] for values in rows.values()), i) for i in range(len(paths))]
        if not scores:
            continue
        cosine, index = min(scores)
        label = min(rows, key=lambda name: rows[name]["cosine"][index])
        source, variation = made.get(paths[index], (paths[index], "original"))
        target = out / f"worst-{report.model}-{backend.replace(':', '-')}.png"
        _copy(Path(paths[index]), target)
        row = next((r for r in report.accuracy if r.backend == backend and r.label == label), None)
        passed = row is None or bool(np.asarray(rows[label]["cosine"][index]) >= row.min_cosine
                                     and rows[label]["rel_error"][index] <= row.max_rel)
        found.append(WorstInput(backend, str(target), source, variation, label, float(cosine),
                                float(rows[label]["rel_error"][index]), passed, ""))
    return found


def _copy(source: Path, target: Path) -> None:
    """Write `target` whole or not at all, never through a link a user left at its name."""
    if target.is_symlink():
        raise UserError(f"--hunt-out: {printable(target)} is a symbolic link; remove it or pick another folder")
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_bytes(source.read_bytes())
    os.replace(partial, target)


def output_folder(path: str) -> Path:
    """The folder the worst inputs go to: made if missing; a link or a file there is a one-line error."""
    folder = Path(path)
    if folder.is_symlink():
        raise UserError(f"--hunt-out {printable(folder)} is a symbolic link; pass a real folder")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--hunt-out {printable(folder)} is a file; pass a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
