"""Every documented variant (int8, int8-qdq, fp16, fused, int8-fused) made from a fresh artifact with a folder of
real photos, published, and passing compare on photos it never saw; a variant made again after its files were
removed by hand; a calibration folder with too few readable photos is one line."""
from __future__ import annotations

import json

import pytest

from compare.cli import main as compare_main
from exporter.cli import main as export_main
from tests.helpers import CALIBRATION_PHOTOS, TINY, TINY_INT8_KEEP, UNSEEN_PHOTOS, call, one_line_error, real_photos
from vitparity import artifact, blocks
from vitparity.errors import UserError
from vitparity.graphs import PRECISION_VARIANTS, precision_variants

VARIANTS = ("int8", "int8-qdq", "fp16", "fused", "int8-fused")


def test_every_variant_is_made_from_real_photos_passes_compare_on_unseen_ones_and_can_be_made_again(tmp_path, capsys):
    assert set(VARIANTS) == set(PRECISION_VARIANTS)  # the documented list is every variant there is
    photos, unseen = real_photos(tmp_path / "photos", CALIBRATION_PHOTOS), real_photos(tmp_path / "unseen", UNSEEN_PHOTOS)
    root = tmp_path / "artifacts"
    code, _, err = call(export_main, capsys, TINY, "--artifacts", str(root), "--weights", "random",
                        *(f"--variant={v}" for v in VARIANTS), "--calibration-images", str(photos),
                        "--int8-keep", TINY_INT8_KEEP)
    assert code == 0, err
    found = precision_variants(artifact.load(root, TINY).manifest)
    assert set(found) == set(VARIANTS)
    for name, record in found.items():
        inputs = record["verify"]["inputs"]
        assert inputs["calibration_images"] + inputs["held_out_images"] == len(CALIBRATION_PHOTOS), (name, inputs)
        assert inputs["held_out_images"] == len(CALIBRATION_PHOTOS) // 4 and "held_out" in record["verify"]
        assert "held_out_images" not in record["verify"]["searched_on"]
    qdq = found["int8-qdq"]["recipe"]
    assert qdq["call"] == "quantize_static" and qdq["options"]["calibration_inputs"] == 8 + 8  # photos + searched images
    searched = {v: record["search"]["keep_fp32"] for v, record in found.items() if "search" in record}
    assert not searched, f"with TINY_INT8_KEEP in float the plain recipes pass on any host: {searched}"
    code, _, err = call(compare_main, capsys, TINY, "--artifacts", str(root), "--images", str(unseen), "--backends",
                        "torch-cpu,ort-cpu", "--no-latency", "--json", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    rows = {r["backend"] for r in report["accuracy"]}
    assert rows == {"ort-cpu", *(f"ort-cpu:{v}" for v in VARIANTS)}
    assert code == 0 and report["verdict"] == "PASS", [(r["backend"], r["label"] if "label" in r else r["output"], r["cosine"])
                                                        for r in report["accuracy"] if not r["passed"]]
    # The fused graph keeps every block's output (no SkipLayerNormalization: variants.FUSED_WITHOUT), so its blocks
    # can be compared one by one; a graph whose optimizer fused them into its LayerNorms says so plainly, with no
    # hint that cannot help.
    import timm
    from onnxruntime.transformers import optimizer

    depth = len(timm.create_model(TINY, pretrained=False).blocks)
    assert blocks.build(root / TINY / "model.fused.onnx", tmp_path / "taps.onnx", root / TINY / "model.onnx") == depth
    optimizer.optimize_model(str(root / TINY / "model.onnx"), model_type="vit", num_heads=0, hidden_size=0,
                             use_gpu=False).save_model_to_file(str(tmp_path / "skip-fused.onnx"))
    with pytest.raises(UserError, match="fused them away") as found:
        blocks.build(tmp_path / "skip-fused.onnx", tmp_path / "taps.onnx", root / TINY / "model.onnx")
    assert "re-export" not in str(found.value)
    # Removed by hand, with its derived per-block graph: made again by --if-missing, and the artifact loads.
    art = artifact.load(root, TINY)
    blocks.ensure(art, "model.int8.onnx")
    for name in ("model.int8.onnx", "model.int8.blocks.onnx"):
        (root / TINY / name).unlink()
    code, _, err = call(export_main, capsys, TINY, "--artifacts", str(root), "--if-missing", "--variant", "int8",
                        "--int8-keep", TINY_INT8_KEEP)
    assert code == 0, err
    assert "int8" in precision_variants(artifact.load(root, TINY).manifest)
    assert (root / TINY / "model.int8.onnx").is_file()


def test_too_few_readable_calibration_photos_is_one_line_that_counts_them(tiny_copy, tmp_path, capsys):
    photos = real_photos(tmp_path / "photos", CALIBRATION_PHOTOS[:2])
    (photos / "notes.jpg").write_text("not a photo")
    code, _, err = call(export_main, capsys, TINY, "--artifacts", str(tiny_copy), "--if-missing", "--variant", "int8-qdq",
                        "--calibration-images", str(photos))
    line = one_line_error(err.split("\n", 1)[1] if err.startswith(f"{TINY}:") else err)
    assert code == 2 and "2 readable images of 3, 4 needed (1 skipped, the first:" in line and "notes.jpg" in line, line
