"""Input sizes: what an artifact's graph accepts (its native size, or any multiple of the patch when it was exported
with dynamic height and width), the sizes it was verified at, and what changes with the size (the token layout, the
data config). Shared by the exporter (which records them in the manifest) and compare (which runs at them)."""
from __future__ import annotations

import re

from .errors import UserError

# The sizes a dynamic graph is verified at besides its native one, as shares of the native side: a smaller, a larger,
# and a non-square one (the height kept, the width cut). Each is rounded to the patch (DINOv2: 518 -> 252, 644, 518x392).
SMALLER, LARGER, NARROWER = 0.5, 1.25, 0.75


def parse(text: str, flag: str = "--size") -> tuple[int, int]:
    """'448' -> (448, 448); '518x392' -> (518, 392) (height x width); anything else is a one-line UserError."""
    found = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not found:
        raise UserError(f"{flag} {text!r}: write a size as H or HxW in pixels, e.g. 448 or 518x392")
    height = int(found.group(1))
    width = int(found.group(2)) if found.group(2) else height
    if height < 1 or width < 1:
        raise UserError(f"{flag} {text!r}: a size is at least 1 pixel on each side")
    return height, width


def parse_list(text: str, flag: str = "--size") -> list[tuple[int, int]]:
    """'224,448,518x392' -> [(224, 224), (448, 448), (518, 392)], each once, in the order given."""
    sizes = [parse(part, flag) for part in str(text).split(",") if part.strip()]
    if not sizes:
        raise UserError(f"{flag} {text!r} names no size; e.g. {flag} 224,448,518x392")
    return list(dict.fromkeys(sizes))


def label(size) -> str:
    return f"{int(size[0])}x{int(size[1])}"


def _round(value: float, patch: int) -> int:
    return max(patch, int(round(value / patch)) * patch)


def checked_sizes(native, patch, extra=()) -> list[tuple[int, int]]:
    """The sizes a dynamic graph is verified at: native first, then a smaller, a larger and a non-square one, then
    `extra` (each once)."""
    height, width = int(native[0]), int(native[1])
    ph, pw = int(patch[0]), int(patch[1])
    found = [(height, width), (_round(height * SMALLER, ph), _round(width * SMALLER, pw)),
             (_round(height * LARGER, ph), _round(width * LARGER, pw)), (height, _round(width * NARROWER, pw))]
    return list(dict.fromkeys([*found, *((int(h), int(w)) for h, w in extra)]))


def record(manifest: dict) -> dict:
    """The manifest's size record; an artifact from before it records one fixed size: its data config's."""
    native = manifest["data_config"]["input_size"][1:]
    return manifest.get("sizes") or {"dynamic": False, "native": list(native), "verified": [list(native)]}


def native(manifest: dict) -> tuple[int, int]:
    height, width = record(manifest)["native"]
    return int(height), int(width)


def check(manifest: dict, size, flag: str = "--size") -> tuple[int, int]:
    """`size` if the artifact's graph takes it, else a one-line UserError that says which sizes it takes and how to
    get a graph that takes this one."""
    found = record(manifest)
    size = (int(size[0]), int(size[1]))
    model = manifest.get("model", "the model")
    if tuple(found["native"]) == size:
        return size
    if not found.get("dynamic"):
        why = f" ({found['why']})" if found.get("why") else ""
        raise UserError(f"{flag} {label(size)}: the {model} artifact's graph takes {label(found['native'])} only{why}; "
                        f"export one for every size with python -m exporter {model} --dynamic-size")
    ph, pw = found["patch"]
    if size[0] % ph or size[1] % pw:
        raise UserError(f"{flag} {label(size)}: {model} takes sizes in multiples of its {ph}x{pw} patch; e.g. "
                        f"{label((_round(size[0], ph), _round(size[1], pw)))}")
    return size


def verified(manifest: dict, size) -> bool:
    return [int(size[0]), int(size[1])] in [list(map(int, s)) for s in record(manifest)["verified"]]


def layout_at(layout: dict | None, size, patch) -> dict | None:
    """The token layout at another size: the same prefix tokens (1 cls, the registers), then H/p x W/p patches."""
    if not layout:
        return layout
    grid = [int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1])]
    return {**layout, "patches": grid[0] * grid[1], "grid": grid}


def manifest_at(manifest: dict, size) -> dict:
    """The manifest as a run at `size` sees it: the data config's input size and the token layout at that size (its
    transform scales with the size: timm resizes to size / crop_pct, then crops the center)."""
    size = (int(size[0]), int(size[1]))
    if size == native(manifest):
        return manifest
    config = {**manifest["data_config"], "input_size": [manifest["data_config"]["input_size"][0], *size]}
    return {**manifest, "data_config": config,
            "token_layout": layout_at(manifest.get("token_layout"), size, record(manifest)["patch"]),
            "input": {**manifest.get("input", {}), "shape": ["batch", config["input_size"][0], *size]}}
