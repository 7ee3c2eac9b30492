"""Images as the model sees them: files found under a folder or glob, decoded through the model's own timm
eval transform. compare (--image, --images) and the exporter (--calibration-images) both read them here."""
from __future__ import annotations

import os
import stat
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

from .errors import UserError

SAMPLE_IMAGE = "grace_hopper.jpg"  # public domain, from matplotlib's sample data: compare's default input
MAX_PIXELS = 64_000_000  # refused above this, before decoding: a 15000x15000 image would need 675 MB as RGB
MAX_ENTRIES = 1_000_000  # entries a listing may visit: a tree larger than this is refused, never walked for ever


def list_images(spec: str, flag: str = "--images") -> list[Path]:
    """The entries under folder `spec` (recursively) or matching glob `spec` (`**` for any depth), in a fixed
    order (sorted by path). Files, and also what is not one (a pipe, a dangling link), so that the decoder
    names why each was skipped. Linked folders are followed, but no folder is visited twice (a link loop
    ends there) and no file is listed twice; at most MAX_ENTRIES entries are visited."""
    root = Path(spec)
    magic = any(ch in spec for ch in "*?[")
    if root.is_dir() and not magic:
        found = sorted(_walk(root, None, flag, spec), key=lambda p: str(p.relative_to(root)))
    elif magic:
        parts = Path(spec).parts
        fixed = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), len(parts))
        base = Path(*parts[:fixed]) if fixed else Path(".")
        found = sorted(_walk(base, parts[fixed:], flag, spec), key=str) if base.is_dir() else []
        if not fixed:  # a relative glob: paths as the user wrote them, not ./-prefixed
            found = [Path(os.path.relpath(p)) if not p.is_absolute() else p for p in found]
    elif root.exists():
        raise UserError(f"{flag} {spec} is a file; pass a folder or a glob such as 'photos/**/*.jpg'" + (" (or use --image)" if flag == "--images" else ""))
    else:
        raise UserError(f"{flag} {spec}: no such folder; pass a folder of images or a glob such as 'photos/*.jpg'")
    if not found:
        raise UserError(f"{flag} {spec} holds no files; pass a folder of images or a glob that matches some")
    return found


def _walk(base: Path, pattern: tuple[str, ...] | None, flag: str, spec: str) -> list[Path]:
    """Every non-folder entry under `base` whose path relative to it matches `pattern` (glob components,
    `**` for zero or more folders; None: every entry, hidden ones too), visiting each folder once by
    (device, inode) and each file once."""
    found, seen_folders, seen_files, visited = [], set(), set(), 0
    stack = [(base, ())]
    while stack:
        folder, parts = stack.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen_folders:
                continue  # a link back to a folder already listed: a loop or a second way in
            seen_folders.add((info.st_dev, info.st_ino))
            entries = list(os.scandir(folder))
        except OSError:
            continue  # unreadable: nothing listed from it
        for entry in entries:
            visited += 1
            if visited > MAX_ENTRIES:
                raise UserError(f"{flag} {spec}: more than {MAX_ENTRIES:,} entries to look through; pass a narrower folder or glob")
            relative = (*parts, entry.name)
            try:
                is_folder = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_folder = False
            if is_folder:
                if pattern is None or _may_match(relative, pattern):
                    stack.append((Path(entry.path), relative))
                continue
            if pattern is not None and not _matches(relative, pattern):
                continue
            try:
                info = os.stat(entry.path)
                key = (info.st_dev, info.st_ino) if stat.S_ISREG(info.st_mode) else None
            except OSError:  # a dangling link: listed, so that it is skipped with its reason
                key = None
            if key is not None and key in seen_files:
                continue  # the same file reached twice (through a link): used once
            if key is not None:
                seen_files.add(key)
            found.append(Path(entry.path))
    return found


def _component(name: str, pattern: str) -> bool:
    # As glob does: a wildcard does not match a leading dot (hidden files) unless the pattern starts with one.
    return fnmatchcase(name, pattern) and (not name.startswith(".") or pattern.startswith("."))


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return _matches(parts, pattern[1:]) or (bool(parts) and not parts[0].startswith(".") and _matches(parts[1:], pattern))
    return bool(parts) and _component(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def _may_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether a folder at `parts` can hold a match of `pattern`: a prefix of the pattern matches it."""
    if not parts:
        return True
    if not pattern:
        return False
    if pattern[0] == "**":
        return _may_match(parts, pattern[1:]) or (not parts[0].startswith(".") and _may_match(parts[1:], pattern))
    return _component(parts[0], pattern[0]) and _may_match(parts[1:], pattern[1:])


def printable(path) -> str:
    """A path as text that prints and encodes anywhere: bytes that are not UTF-8 (kept by Python as lone
    surrogates) become \\xNN escapes. For messages, tables and reports; the file is opened by its real name."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def default_image() -> Path:
    """The bundled photo (vitparity/data/grace_hopper.jpg)."""
    from importlib import resources

    return Path(str(resources.files("vitparity") / "data" / SAMPLE_IMAGE))


def photo_variations(count: int, seed: int) -> list:
    """The bundled photo and `count - 1` deterministic variations of it (crops, mirror images, colour shifts), as
    RGB PIL images: real-photo statistics without shipping a data set. Different seeds give different sets."""
    from PIL import Image, ImageOps

    base = Image.open(default_image()).convert("RGB")
    rng = np.random.default_rng(seed)
    width, height = base.size
    found = [base]
    for i in range(1, count):
        side = rng.uniform(0.55, 0.9)
        w, h = int(width * side), int(height * side)
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        image = base.crop((left, top, left + w, top + h))
        if i % 2:
            image = ImageOps.mirror(image)
        shift = rng.integers(-30, 30, 3)
        found.append(Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + shift, 0, 255).astype(np.uint8)))
    return found


def eval_transform(data_config: dict):
    """The model's own timm eval transform (resize, centre crop, normalise) from its data config."""
    from timm.data import create_transform

    config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    return create_transform(**config, is_training=False)


def preprocess(path: Path, data_config: dict, transform) -> np.ndarray:
    """One image as a float32 CHW array through `transform`; a UserError says why a file is not a usable image."""
    return transformed(open_rgb(path, data_config), transform)


def transformed(rgb, transform) -> np.ndarray:
    """A decoded image (open_rgb) as a float32 CHW array through `transform` (eval_transform)."""
    return transform(rgb).numpy().astype(np.float32)


def open_rgb(path: Path, data_config: dict):
    """The image at `path` decoded to 8-bit RGB (PIL), or a UserError saying why it is not a usable image.
    Needs no torch: compare checks --image with it in the parent, and the first worker transforms it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"image {printable(path)} is a folder; pass --image with a JPEG/PNG file, or --input random")
    if not path.exists():
        raise UserError(f"image {printable(path)} does not exist; pass --image with a JPEG/PNG file, or --input random")
    if not path.is_file():
        raise UserError(f"image {printable(path)} is not a regular file (a device, pipe or socket); pass --image with a JPEG/PNG file")
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > MAX_PIXELS:
                raise UserError(
                    f"image {printable(path)} is too large: {image.width}x{image.height} ({pixels / 1e6:.0f} Mpixels), over the limit of "
                    f"{MAX_PIXELS / 1e6:.0f} Mpixels; pass a smaller image (the model sees {data_config['input_size'][1]}x"
                    f"{data_config['input_size'][2]} anyway)"
                )
            rgb = to_rgb(image, path)
    except UserError:
        raise
    except Image.DecompressionBombError as error:  # PIL refuses far larger images before we can ask
        raise UserError(f"image {printable(path)} is too large: {error}; pass a smaller image") from error
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{printable(path)} is not an image PIL can read ({type(error).__name__}); pass a JPEG or PNG file") from error
    except Exception as error:  # noqa: BLE001 - see below
        # Pillow's decoders answer bad bytes with many exception types (SyntaxError for a damaged PNG chunk,
        # ValueError for a text chunk that inflates too far, struct.error, IndexError, EOFError...): each is
        # this file's fault, a skip with its reason, never the end of the run.
        why = (str(error).splitlines() or [""])[0][:120]
        raise UserError(f"{printable(path)} is a damaged or unsupported image ({type(error).__name__}: {why}); "
                        f"pass a JPEG or PNG file") from error
    return rgb


def to_rgb(image, path: Path):
    """8-bit RGB. 16-bit and 32-bit integer greyscale is scaled to 8 bits (PIL's own convert would clip
    every value above 255): 16-bit modes by 65535; the 32-bit mode "I" by the range its values need,
    255, 65535 or 2**31 - 1 (its top), so that nothing is clipped. Float images are refused, since their
    range is unknown."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        top = 65535.0 if image.mode.startswith("I;16") or 255 < peak <= 65535 else 2.0 ** 31 - 1 if peak > 65535 else 255.0
        image = Image.fromarray(np.round(values / top * 255.0).clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        raise UserError(f"image {printable(path)} holds floating-point pixels, whose range is unknown; save it as 8- or 16-bit PNG")
    return image.convert("RGB")
