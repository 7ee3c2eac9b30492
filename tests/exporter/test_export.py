"""The exporter end to end: real dynamo exports of dinov2 and dinov3, checked with onnx and onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporter.export import ExportOptions
from tests.helpers import TINY, call
from vitparity import artifact

EXPECTED = {
    "dinov2": ("vit_small_patch14_reg4_dinov2.lvd142m", 518, 1374),
    "dinov3": ("vit_small_patch16_dinov3.lvd1689m", 256, 261),
}


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _root(request, key):
    return request.getfixturevalue(f"{key}_root")


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_registered_model_exports_at_native_size_with_dynamic_batch(request, key):
    timm_name, size, tokens = EXPECTED[key]
    art = artifact.load(_root(request, key), key)
    graph = onnx.load(str(art.path("model.onnx"))).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch = _dims(graph.input[0])[0]
    assert isinstance(batch, str) and batch, "the batch axis must be symbolic"
    assert _dims(graph.input[0])[1:] == [3, size, size]
    assert {o.name: _dims(o)[1:] for o in graph.output} == {"pooled": [384], "tokens": [tokens, 384]}
    manifest = art.manifest
    assert manifest["timm_name"] == timm_name and manifest["alias"] == key
    assert manifest["data_config"]["input_size"] == [3, size, size]
    assert manifest["outputs"] == {"pooled": ["batch", 384], "tokens": ["batch", tokens, 384]}
    assert manifest["exporter"].startswith("torch.onnx.export(dynamo=True)")
    for name in ("python", "torch", "timm", "onnx", "onnxruntime"):
        assert manifest["versions"][name]
    assert manifest["weights_source"] == "random-init (seed 0)"
    assert set(manifest["files"]) >= set(artifact.CORE_FILES)


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_onnx_passes_full_checker_and_matches_eager_at_batch_1_and_3(request, key):
    art = artifact.load(_root(request, key), key)
    onnx.checker.check_model(str(art.path("model.onnx")), full_check=True)
    sample = np.load(art.path("sample.npz"), allow_pickle=False)
    session = ort.InferenceSession(str(art.path("model.onnx")), providers=["CPUExecutionProvider"])
    for rows in ([0], [0, 1, 0]):
        pooled, tokens = session.run(["pooled", "tokens"], {"pixel_values": sample["pixel_values"][rows]})
        assert pooled.shape[0] == tokens.shape[0] == len(rows)
        for got, want in ((pooled, sample["pooled"][rows]), (tokens, sample["tokens"][rows])):
            cos = float(np.dot(got.ravel(), want.ravel()) / np.linalg.norm(got) / np.linalg.norm(want))
            assert cos >= 0.99999
            assert np.abs(got - want).max() <= 1e-4


def test_failed_verification_exits_1_and_leaves_the_good_artifact_untouched(tiny_copy, capsys):
    from exporter.cli import main

    before = {p.name: p.read_bytes() for p in (tiny_copy / TINY).iterdir() if p.is_file()}
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tiny_copy), "--weights", "random", "--seed", "7", "--max-abs", "1e-12")
    assert code == 1, err
    assert "differs from eager" in err and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in (tiny_copy / TINY).iterdir() if p.is_file()}
    assert after == before
    assert not list(tiny_copy.glob(f".{TINY}.staging-*"))


def test_cli_prints_summary_table_and_json(tmp_path, capsys):
    from exporter.cli import main

    code, out, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--weights", "random", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert rows[0]["model"] == TINY and rows[0]["input_size"] == [3, 160, 160]
    assert rows[0]["cosine"] >= 0.99999 and rows[0]["nodes"] > 0
    assert "WARNING" in err and "random weights" in err
    code, out, _ = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--weights", "random")
    assert code == 0
    assert "Exported artifacts" in out and "random-init (seed 0)" in out


def test_unknown_model_exits_2_with_closest_names_and_no_traceback(capsys):
    from exporter.cli import main

    code, _, err = call(main, capsys, "dinov4")
    assert code == 2
    assert "model 'dinov4' is not known" in err
    assert "dinov2" in err and "dinov3" in err
    assert "Traceback" not in err


def test_list_shows_the_aliases(capsys):
    from exporter.cli import main

    code, out, _ = call(main, capsys, "--list")
    assert code == 0
    assert "vit_small_patch14_reg4_dinov2.lvd142m" in out
    assert "vit_small_patch16_dinov3.lvd1689m" in out


def test_if_missing_exports_only_what_is_not_there_and_any_timm_vit_name_exports(tiny_copy, capsys):
    from exporter.cli import main

    manifest = tiny_copy / TINY / "manifest.json"
    before = manifest.read_bytes()
    code, _, err = call(main, capsys, TINY, "test_vit2.r160_in1k", "--artifacts", str(tiny_copy), "--weights", "random", "--if-missing")
    assert code == 0, err
    assert f"{TINY}: an artifact exists" in err
    assert manifest.read_bytes() == before
    # A timm name that is no alias, with a pretrained tag, exports under that name.
    art = artifact.load(tiny_copy, "test_vit2.r160_in1k")
    assert art.manifest["model"] == "test_vit2.r160_in1k" and art.manifest["alias"] is None
    assert art.manifest["pretrained_tag"] == "r160_in1k"


def test_verify_bounds_the_abs_diff_per_unit_of_the_outputs_peak(tmp_path):
    from onnx import TensorProto, helper

    from exporter.export import verify_onnx
    from vitparity.errors import CheckFailed

    # pooled = x * 100 and tokens = x: an eager reference 1e-3 away is fp32 rounding at values near
    # 100 (within 1e-4 per unit of the peak) but a real difference at values within +-1.
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 4])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 4]) for name in ("pooled", "tokens")]
    hundred = helper.make_tensor("hundred", TensorProto.FLOAT, [], [100.0])
    graph = helper.make_graph([helper.make_node("Mul", ["pixel_values", "hundred"], ["pooled"]),
                               helper.make_node("Identity", ["pixel_values"], ["tokens"])], "scaled", [x], outputs, [hundred])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    sample = np.linspace(0.5, 0.9, 8, dtype=np.float32).reshape(2, 4)
    near = {"pooled": sample * 100 + 1e-3, "tokens": sample}
    cos, diff = verify_onnx(path, sample, near, ExportOptions())
    assert cos > 0.99999 and diff == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(CheckFailed, match=r"output tokens at batch 2 differs from eager: max abs diff 0.001 > 0.0001$"):
        verify_onnx(path, sample, {"pooled": sample * 100, "tokens": sample + 1e-3}, ExportOptions())
    with pytest.raises(CheckFailed, match=r"output pooled .* max abs diff 0.02 > 0.009 = 0.0001 x peak 90$"):
        verify_onnx(path, sample, {"pooled": sample * 100 + 2e-2, "tokens": sample}, ExportOptions())


@pytest.mark.parametrize("words,message", [
    (("depth",), "--model-kwargs takes KEY=VALUE words"),
    (("checkpoint_path=/etc/passwd",), "--model-kwargs checkpoint_path=... is set by vit-parity itself"),
    (("dephth=2",), "--model-kwargs dephth=...: timm's test_vit does not take it"),
    (("global_pool=bogus",), "timm's test_vit cannot be built with --model-kwargs global_pool=bogus: Only avg"),
])
def test_bad_model_kwargs_are_one_line_errors_and_write_nothing(tmp_path, capsys, words, message):
    from exporter.cli import main

    code, _, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--weights", "random", "--model-kwargs", *words)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_model_kwargs_are_kept_in_the_manifest_and_every_rebuild_takes_them(tiny_copy, tmp_path, capsys):
    """timm's --model-kwargs (global_pool=token: the CLS token as the pooled output, as upstream DINOv3 pools)."""
    from compare.cli import main as compare
    from exporter.cli import main
    from vitparity.eager import rebuild_model

    code, out, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--weights", "random",
                          "--model-kwargs", "depth=2", "global_pool=token")
    assert code == 0, err
    assert f"{TINY} (depth=2 global_pool=token)" in out
    art = artifact.load(tmp_path, TINY)
    assert art.manifest["model_kwargs"] == {"depth": 2, "global_pool": "token"}
    model = rebuild_model(art)  # a strict load: two blocks, or it would not fit
    assert len(model.blocks) == 2 and model.global_pool == "token"
    with np.load(art.path("sample.npz")) as sample:  # the pooled output is the CLS token of the final norm
        assert np.array_equal(sample["pooled"], sample["tokens"][:, 0])
    code, out, err = call(compare, capsys, TINY, "--artifacts", str(tmp_path), "--backends", "torch-cpu,ort-cpu",
                          "--no-latency")
    assert code == 0 and "(depth=2 global_pool=token)" in out, out + err
    # --if-missing never takes an artifact made otherwise for the one asked for, and without the flag takes any.
    manifest = (tiny_copy / TINY / "manifest.json").read_bytes()
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tiny_copy), "--if-missing", "--model-kwargs", "depth=2")
    assert code == 2 and "was made with model kwargs (none), not depth=2" in err, err
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--if-missing")
    assert code == 0 and f"{TINY}: an artifact exists" in err, err
    assert (tiny_copy / TINY / "manifest.json").read_bytes() == manifest
    # A manifest is data: a key that reads files is refused, never handed to timm.
    edited = json.loads((tmp_path / TINY / "manifest.json").read_text())
    edited["model_kwargs"]["checkpoint_path"] = "/etc/passwd"
    (tmp_path / TINY / "manifest.json").write_text(json.dumps(edited))
    from vitparity.errors import UserError

    with pytest.raises(UserError, match="checkpoint_path=... is set by vit-parity itself"):
        rebuild_model(artifact.load(tmp_path, TINY))
