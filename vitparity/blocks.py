"""The per-block variant of an artifact: model.onnx with each transformer block's output as a graph output.

The variant is derived from model.onnx itself rather than traced again, so the ONNX side of a
per-block comparison is exactly the deployed graph. The dynamo exporter tags every node with the
module scopes it came from (`pkg.torch.onnx.name_scopes`); block i's output is the value made
inside scope `blocks.i` that leaves it with the shape of the token stream.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import tempfile
from pathlib import Path

from . import artifact
from .errors import UserError

BLOCKS_FILE = "blocks.onnx"
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
BLOCK_SCOPE = re.compile(r"(?:.*\.)?blocks\.(\d+)")


def tap_names(count: int) -> list[str]:
    """The taps in order: block_0 .. block_{count-1}, then the final norm."""
    return [f"block_{i}" for i in range(count)] + ["norm"]


def _block_of(node) -> int | None:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            for scope in ast.literal_eval(prop.value):
                match = BLOCK_SCOPE.fullmatch(scope)
                if match:
                    return int(match.group(1))
    return None


def _shape(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def block_outputs(graph) -> list[str]:
    """Names of the values that carry each block's output tokens, in block order."""
    owner = [_block_of(node) for node in graph.node]
    blocks = sorted({b for b in owner if b is not None})
    if not blocks:
        raise UserError("the graph carries no module scopes (fused by onnxruntime's optimizer, or not written by this "
                        "tool's exporter): its blocks cannot be compared one by one; see the fp32 graph's row (ort-cpu) per "
                        "block")
    shapes = {v.name: _shape(v) for v in [*graph.value_info, *graph.output]}
    token_shape = shapes.get("tokens")
    consumers: dict[str, set] = {}
    for node, block in zip(graph.node, owner):
        for name in node.input:
            consumers.setdefault(name, set()).add(block)
    floats = {v.name for v in [*graph.value_info, *graph.output] if v.type.tensor_type.elem_type in FLOAT_TYPES}
    outputs = []
    for block in blocks:
        leaving = [
            name
            for node, b in zip(graph.node, owner) if b == block
            for name in node.output
            if (consumers.get(name, set()) - {block} or name == "tokens") and name in floats
        ]
        # The token stream where blocks keep the output's shape; else (SAM's NHWC windows, CaiT's and
        # XCiT's patch-only blocks) the one float tensor that leaves the block.
        streams = [name for name in leaving if shapes.get(name) == token_shape]
        chosen = streams if len(streams) == 1 else leaving
        if len(chosen) != 1:
            raise UserError(f"cannot tell block {block}'s output in model.onnx ({len(chosen)} candidates); re-export the model")
        outputs.append(chosen[0])
    return outputs


SOFTMAX = "attn.softmax"  # the attention's probabilities: eager's attn.attn_drop output, the graph's Softmax


def block_parts(graph, index: int) -> dict[str, str]:
    """{part: value name} inside block `index`, from the nodes' module scopes, in the order the graph computes
    them: each sub-module of the block (timm's names: norm1, attn.qkv, attn.proj, attn, ls1, norm2, mlp.fc1,
    mlp.act, mlp.fc2, mlp...) is the output of the last node made in its scope, and the attention's Softmax
    node is "attn.softmax". Nothing for a graph without scopes (variants drop them: read the source graph)."""
    prefix = re.compile(rf"(?:.*\.)?blocks\.{index}\.(.+)")
    found: dict[str, tuple[int, str]] = {}
    for order, node in enumerate(graph.node):
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == SCOPES_KEY), [])
        names = [match.group(1) for match in map(prefix.fullmatch, scopes) if match]
        if not names or not node.output:
            continue
        for name in names:  # every enclosing sub-module: its output is its last node's
            found[name] = (order, node.output[0])
        if node.op_type == "Softmax" and any(name.split(".")[0] == "attn" for name in names):
            found[SOFTMAX] = (order, node.output[0])
    # A sub-module and its last child end at the same node (attn and attn.proj): the child is listed first.
    return {name: value for name, (order, value) in sorted(found.items(), key=lambda item: (item[1][0], -item[0].count(".")))}


def block_boundaries(graph) -> list[tuple[str, str]]:
    """(input, output) value names of each block's token stream, in block order: block i's input is block i-1's
    output; block 0's is the one token-shaped float value its nodes take from outside any block."""
    outputs = block_outputs(graph)
    owner = [_block_of(node) for node in graph.node]
    produced = {name: block for node, block in zip(graph.node, owner) for name in node.output}
    shapes = {v.name: _shape(v) for v in [*graph.value_info, *graph.output]}
    entering = {name for node, block in zip(graph.node, owner) if block == min(b for b in owner if b is not None)
                for name in node.input if name in produced and produced[name] is None and shapes.get(name) == shapes.get("tokens")}
    if len(entering) != 1:
        raise UserError(f"cannot tell block 0's input in the graph ({len(entering)} candidates)")
    return list(zip([entering.pop(), *outputs[:-1]], outputs))


def load_graph(path: Path):
    """model.onnx without its external data: weights over 2 GB stay in model.onnx.data and are referenced,
    never copied (a protobuf cannot hold more than 2 GB, so loading them in makes the graph unsavable)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def link_external_data(model, source_folder: Path, folder: Path) -> None:
    """Make the external data files `model` refers to (relative to `source_folder`) present in `folder` too.

    A hard link where the filesystem allows, else a copy: onnxruntime refuses external data that
    resolves outside the model's folder, so a symbolic link will not do.
    """
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if Path(source_folder).resolve() == Path(folder).resolve():
        return
    # The dynamo exporter keeps every weight in an initializer of the main graph.
    for location in {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}:
        source, target = Path(source_folder) / location, Path(folder) / location
        if target.exists():
            continue
        try:
            os.link(source, target)
        except OSError:  # another filesystem, or links not allowed
            fd, tmp = tempfile.mkstemp(prefix=".data-", dir=folder)
            os.close(fd)
            try:
                shutil.copyfile(source, tmp)
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)


def build(model_path: Path, out_path: Path, taps_from: Path | None = None) -> int:
    """Write the per-block graph of `model_path` to `out_path`; return the number of blocks.

    The taps are found in `taps_from` (default: the graph itself), the graph a variant was derived
    from: the libraries that write variants (quantization, fp16 conversion) drop the module scopes of
    the nodes they make, but keep the names of the values they leave alone, the token stream among
    them. Each tap leaves through a Cast to float32, so it is float32 whatever the variant computes in.
    External data (weights over 2 GB) is referenced, not copied: blocks.onnx must sit beside
    model.onnx.data, or be given a link to it (see `link_external_data`)."""
    import onnx

    model = load_graph(model_path)
    source = load_graph(taps_from) if taps_from else model
    if not any(v.name == "tokens" for v in source.graph.value_info):
        source = onnx.shape_inference.infer_shapes(source)
    # A graph output is not in value_info: where the final norm is Identity (gap/fc_norm models, EVA),
    # the last block's output is the graph's `tokens` output itself.
    values = {v.name: v for v in [*source.graph.value_info, *source.graph.output]}
    taps = block_outputs(source.graph)
    made = {name for node in model.graph.node for name in node.output}
    graph = model.graph
    for i, name in enumerate(taps):
        if name not in made:
            fused = any(node.domain == "com.microsoft" for node in graph.node)
            raise UserError(
                f"{Path(model_path).name} has no block boundaries to tap: onnxruntime's optimizer fused them away (block "
                f"{i}'s output {name} is inside a fused node); its blocks cannot be compared one by one: see the "
                f"fp32 graph's row (ort-cpu) per block" if fused else
                f"{Path(model_path).name} no longer has block {i}'s output ({name}): its converter renamed the token "
                f"stream, so its blocks cannot be compared one by one; see the graph it was made from per block")
        # A Cast gives each tap a stable name (block_i) whatever the exporter called the value.
        graph.node.append(onnx.helper.make_node("Cast", [name], [f"block_{i}"], name=f"tap_block_{i}", to=onnx.TensorProto.FLOAT))
        tap = onnx.ValueInfoProto()
        tap.CopyFrom(values[name])
        tap.name = f"block_{i}"
        tap.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        graph.output.append(tap)
    onnx.save(model, str(out_path))
    return len(taps)


def blocks_file(source: str) -> str:
    """The per-block graph's file name for graph `source`: blocks.onnx for model.onnx, else e.g.
    model.ln-decomposed.blocks.onnx, so that taps come from the very graph an accuracy row ran."""
    return BLOCKS_FILE if source == "model.onnx" else source.removesuffix(".onnx") + ".blocks.onnx"


def ensure(art: artifact.Artifact, source: str = "model.onnx") -> Path:
    """The per-block graph of the artifact's graph `source`, derived from it and added to the manifest on first use.

    It is rebuilt when it is missing, damaged, or derived from another file (its source hash is
    recorded). On a read-only artifact (a shared or mounted copy) it goes to the user's cache
    instead, keyed by the source's sha256: a derived file never makes the artifact unusable.
    """
    # Read from disk, not art.manifest: another backend of this run may have added blocks.onnx since.
    manifest = artifact.read_manifest(art.folder)
    name = blocks_file(source)
    key = "blocks" if name == BLOCKS_FILE else f"blocks of {source}"
    digest = manifest["files"][source]["sha256"]
    record = manifest["files"].get(name)
    path = art.path(name)
    if record and manifest.get(key, {}).get("model_sha256") == digest and _intact(path, record):
        return path
    origin = manifest.get("variants", {}).get(source, {}).get("from")  # a variant: its taps are found in its source graph
    taps_from = art.path(origin) if origin else None
    try:
        with artifact.staging(art.folder) as stage:
            count = build(art.path(source), stage / name, taps_from)
            artifact.publish(
                art.folder, {name: stage / name},
                {key: {"model_sha256": digest, "source": source, "count": count, "taps": tap_names(count)}},
                replace=False,
            )
        return path
    except OSError:  # the artifact cannot be written to
        return _cached(art, source, digest, taps_from)


def cache_folder() -> Path:
    """Where derived files of read-only artifacts go: $XDG_CACHE_HOME/vit-parity, else ~/.cache/vit-parity."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vit-parity"


def _cached(art: artifact.Artifact, source: str, digest: str, taps_from: Path | None) -> Path:
    path = cache_folder() / "blocks" / digest / blocks_file(source)
    if not path.is_file():  # written atomically below, so a file that is there is whole
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".blocks-", suffix=".onnx", dir=path.parent)
        os.close(fd)
        try:
            build(art.path(source), Path(tmp), taps_from)
            link_external_data(load_graph(art.path(source)), art.folder, path.parent)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def _intact(path: Path, record: dict) -> bool:
    return path.is_file() and path.stat().st_size == record["bytes"] and artifact.sha256(path) == record["sha256"]
