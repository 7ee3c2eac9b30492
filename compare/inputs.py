"""The one input every backend gets: a preprocessed photo or a seeded random batch."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from vitparity.errors import UserError
from vitparity.images import default_image, eval_transform, preprocess  # noqa: F401 - default_image: compare's default input


def image_batch(path: Path, data_config: dict, batch_size: int) -> np.ndarray:
    """The image at `path` through the model's own timm eval transform, repeated `batch_size` times."""
    tensor = preprocess(Path(path), data_config, eval_transform(data_config))
    return np.repeat(tensor[None], batch_size, axis=0)


def random_batch(input_size, batch_size: int, seed: int) -> np.ndarray:
    """Seeded standard-normal NCHW float32, the scale of a normalised image."""
    return np.random.default_rng(seed).standard_normal((batch_size, *input_size), dtype=np.float32)


def digest(batch: np.ndarray) -> str:
    """sha256 of the batch's shape, dtype and bytes: two inputs with one digest are the same input."""
    h = hashlib.sha256(f"{batch.shape}{batch.dtype}".encode())
    h.update(np.ascontiguousarray(batch).tobytes())
    return h.hexdigest()


def make_input(kind: str, image: str | None, data_config: dict, batch_size: int, seed: int) -> tuple[np.ndarray, dict]:
    """The input batch and its description (kind, source, shape, sha256) for the report."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if kind == "random":
        batch = random_batch(data_config["input_size"], batch_size, seed)
        source = f"seeded normal (seed {seed})"
    else:
        path = Path(image) if image else default_image()
        batch = image_batch(path, data_config, batch_size)
        source = str(path)
    description = {"kind": kind, "source": source, "shape": list(batch.shape), "dtype": "float32", "sha256": digest(batch)}
    return batch, description
