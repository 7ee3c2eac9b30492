"""The one input every backend gets: a preprocessed photo or a seeded random batch."""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

from exporter.errors import UserError

SAMPLE_IMAGE = "grace_hopper.jpg"  # public domain, from matplotlib's sample data
MAX_PIXELS = 64_000_000  # refused above this, before decoding: a 15000x15000 image would need 675 MB as RGB


def default_image() -> Path:
    return Path(str(resources.files("compare") / "data" / SAMPLE_IMAGE))


def eval_transform(data_config: dict):
    """The model's own timm eval transform (resize, centre crop, normalise) from its data config."""
    from timm.data import create_transform

    config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    return create_transform(**config, is_training=False)


def image_batch(path: Path, data_config: dict, batch_size: int) -> np.ndarray:
    """The image at `path` through the model's own timm eval transform, repeated `batch_size` times."""
    tensor = preprocess(Path(path), data_config, eval_transform(data_config))
    return np.repeat(tensor[None], batch_size, axis=0)


def preprocess(path: Path, data_config: dict, transform) -> np.ndarray:
    """One image as a float32 CHW array through `transform`; a UserError says why a file is not a usable image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"image {path} is a folder; pass --image with a JPEG/PNG file, or --input random")
    if not path.exists():
        raise UserError(f"image {path} does not exist; pass --image with a JPEG/PNG file, or --input random")
    if not path.is_file():
        raise UserError(f"image {path} is not a regular file (a device, pipe or socket); pass --image with a JPEG/PNG file")
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > MAX_PIXELS:
                raise UserError(
                    f"image {path} is too large: {image.width}x{image.height} ({pixels / 1e6:.0f} Mpixels), over the limit of "
                    f"{MAX_PIXELS / 1e6:.0f} Mpixels; pass a smaller image (the model sees {data_config['input_size'][1]}x"
                    f"{data_config['input_size'][2]} anyway)"
                )
            rgb = to_rgb(image, path)
    except Image.DecompressionBombError as error:  # PIL refuses far larger images before we can ask
        raise UserError(f"image {path} is too large: {error}; pass a smaller image") from error
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{path} is not an image PIL can read ({type(error).__name__}); pass a JPEG or PNG file") from error
    return transform(rgb).numpy().astype(np.float32)


def to_rgb(image, path: Path):
    """8-bit RGB. 16-bit and 32-bit integer greyscale is scaled to 8 bits (PIL's own convert would clip
    every value above 255); float images are refused, since their range is unknown."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.round(values / top * 255.0).clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        raise UserError(f"image {path} holds floating-point pixels, whose range is unknown; save it as 8- or 16-bit PNG")
    return image.convert("RGB")


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
