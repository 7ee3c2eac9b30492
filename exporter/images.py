"""Images as the model sees them: files found under a folder or glob, decoded through the model's own timm
eval transform. compare (--image, --images) and the exporter (--calibration-images) both read them here."""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from .errors import UserError

MAX_PIXELS = 64_000_000  # refused above this, before decoding: a 15000x15000 image would need 675 MB as RGB


def list_images(spec: str, flag: str = "--images") -> list[Path]:
    """The files under folder `spec` (recursively) or matching glob `spec`, in a fixed order (sorted by path)."""
    root = Path(spec)
    if root.is_dir():
        found = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: str(p.relative_to(root)))
    elif any(ch in spec for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    elif root.exists():
        raise UserError(f"{flag} {spec} is a file; pass a folder or a glob such as 'photos/**/*.jpg'" + (" (or use --image)" if flag == "--images" else ""))
    else:
        raise UserError(f"{flag} {spec}: no such folder; pass a folder of images or a glob such as 'photos/*.jpg'")
    if not found:
        raise UserError(f"{flag} {spec} holds no files; pass a folder of images or a glob that matches some")
    return found


def eval_transform(data_config: dict):
    """The model's own timm eval transform (resize, centre crop, normalise) from its data config."""
    from timm.data import create_transform

    config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    return create_transform(**config, is_training=False)


def preprocess(path: Path, data_config: dict, transform) -> np.ndarray:
    """One image as a float32 CHW array through `transform`; a UserError says why a file is not a usable image."""
    return transform(open_rgb(path, data_config)).numpy().astype(np.float32)


def open_rgb(path: Path, data_config: dict):
    """The image at `path` decoded to 8-bit RGB (PIL), or a UserError saying why it is not a usable image.
    Needs no torch: compare checks --image with it in the parent, and the first worker transforms it."""
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
    return rgb


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
