"""The position-embedding resample on its own: a graph with dynamic height and width resizes the model's learned
position table to each input's patch grid with an ONNX Resize (timm: bicubic, antialiased), and exporters get its
attributes wrong (the cubic coefficient, exclude_outside, a missing antialias). Here the graph's own Resize runs alone
(the subgraph from the input to its output, on an input of that size: the table does not depend on the pixels) and is
judged against eager timm's resample of the same table, so a wrong attribute is named where it is, not seen as drift
in block 0. Models with rotary embeddings (DINOv3) have no table to resample: their tables come from the grid."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifact import INPUT_NAME

# The resample is fp32 arithmetic on a constant table: anything past rounding is a different interpolation.
MIN_COSINE, MAX_ABS_PER_PEAK = 0.99999, 1e-4


def resize_nodes(path: Path) -> list:
    """The graph's Resize nodes (usually none, or the position table's one)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [node for node in graph.node if node.op_type == "Resize"]


SHOWN = {"mode": "mode", "cubic_coeff_a": "a", "antialias": "antialias", "exclude_outside": "exclude_outside",
         "coordinate_transformation_mode": "coordinates"}


def attributes(node) -> str:
    """The Resize attributes that decide its numbers, short: "mode cubic, a -0.5, antialias 1, exclude_outside 1"."""
    import onnx

    found = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    found = {k: v.decode() if isinstance(v, bytes) else v for k, v in found.items()}
    if found.get("coordinate_transformation_mode", "half_pixel") == "half_pixel":  # ONNX's default: said only when not
        found.pop("coordinate_transformation_mode", None)
    return ", ".join(f"{SHOWN[k]} {found[k]:g}" if isinstance(found[k], float) else f"{SHOWN[k]} {found[k]}"
                     for k in SHOWN if k in found)


def graph_tables(path: Path, size, folder: Path) -> dict[str, np.ndarray]:
    """Each Resize output of the graph at `path` for one input of `size`, by node name (onnxruntime, CPU)."""
    import onnx
    import onnx.utils

    from . import runtime

    nodes = resize_nodes(path)
    if not nodes:
        return {}
    cut = folder / "resample.onnx"
    onnx.utils.extract_model(str(path), str(cut), [INPUT_NAME], [node.output[0] for node in nodes])
    session = runtime.session(cut)
    blank = np.zeros((1, 3, int(size[0]), int(size[1])), dtype=np.float32)
    return dict(zip([node.name for node in nodes], session.run(None, {INPUT_NAME: blank})))


def eager_table(model, size) -> np.ndarray | None:
    """timm's own resampled position table for `size`, as (1, C, H/p, W/p), or None when the model has none to
    resample (rotary embeddings, or no dynamic size)."""
    import torch

    if getattr(model, "pos_embed", None) is None or not getattr(model, "dynamic_img_size", False) \
            or not hasattr(model, "_pos_embed"):
        return None
    patch = model.patch_embed.patch_size
    grid = (int(size[0]) // patch[0], int(size[1]) // patch[1])
    with torch.inference_mode():
        blank = torch.zeros(1, *grid, model.embed_dim)  # NHWC, as the dynamic-size path hands it over
        tokens = model._pos_embed(blank)  # the prefix tokens, then blank + the resampled table
    table = tokens[:, -grid[0] * grid[1]:, :].reshape(1, *grid, model.embed_dim).permute(0, 3, 1, 2)
    return table.numpy()


def check(model, path: Path, size, folder: Path) -> dict | None:
    """The graph's resample against eager's at `size`: {"node", "attributes", "cosine", "max_abs", "peak", "passed",
    "reason"}, or None when there is nothing to resample."""
    want = eager_table(model, size)
    if want is None:
        return None
    for name, got in graph_tables(path, size, folder).items():
        if got.shape != want.shape:
            continue
        node = next(n for n in resize_nodes(path) if n.name == name)
        diff = float(np.abs(got.astype(np.float64) - want).max())
        peak = max(1.0, float(np.abs(want).max()))
        a, b = got.ravel().astype(np.float64), want.ravel().astype(np.float64)
        cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
        passed = cosine >= MIN_COSINE and diff <= MAX_ABS_PER_PEAK * peak
        reason = "" if passed else (
            f"the position-embedding resample (Resize {name}: {attributes(node)}) differs from eager timm's at "
            f"{size[0]}x{size[1]}: max abs {diff:.3g}, cosine {cosine:.6f}; the exporter wrote other interpolation "
            f"attributes than eager uses")
        return {"node": name, "attributes": attributes(node), "cosine": cosine, "max_abs": diff, "peak": peak,
                "passed": passed, "reason": reason}
    return {"node": None, "attributes": "", "cosine": 0.0, "max_abs": float("inf"), "peak": 0.0, "passed": False,
            "reason": f"the graph has no Resize that makes the {want.shape[1]}-wide position table at {size[0]}x{size[1]}"}
