"""The derived graphs an artifact may hold beside model.onnx: their names, files and tolerance classes. Part of
the artifact format: the exporter writes them (exporter/variants.py holds the recipes), compare runs them."""
from __future__ import annotations

LN_DECOMPOSED = "model.ln-decomposed.onnx"  # LayerNorms as primitive ops, for providers without the kernel (CANN)

# Reduced-precision variants: another graph beside model.onnx, made by the field's libraries and
# verified against eager fp32 by a tolerance class of its own (vitparity/tolerances.py).
INT8, INT8_QDQ, FP16 = "int8", "int8-qdq", "fp16"
# The fused fp32 graph (onnxruntime's transformer optimizer), judged like model.onnx itself, and int8 made from it.
FUSED, INT8_FUSED = "fused", "int8-fused"
PRECISION_VARIANTS = {INT8: "int8", INT8_QDQ: "int8", FP16: "fp16", FUSED: "same-host", INT8_FUSED: "int8"}  # variant -> class
MADE_FROM = {INT8_FUSED: FUSED}  # a variant made from another variant's graph, which must be written first


def variant_file(variant: str) -> str:
    """model.int8.onnx, model.int8-qdq.onnx, model.fp16.onnx."""
    return f"model.{variant}.onnx"


def precision_variants(manifest: dict) -> dict[str, dict]:
    """The reduced-precision variants an artifact has: {variant: its manifest record (file, class, recipe, verify)}."""
    return {record["variant"]: {"file": name, **record} for name, record in manifest.get("variants", {}).items()
            if isinstance(record, dict) and record.get("variant") in PRECISION_VARIANTS and name in manifest.get("files", {})}
