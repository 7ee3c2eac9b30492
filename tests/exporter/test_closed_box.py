"""The artifact is a closed box: nothing outside it is read, written, chmod-ed or removed through a link or a
crafted path, and no user weights are ever traded for others. Each test is one class of the hostile-input
report (issue: "Nothing outside the artifact is touched...")."""
from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compare.orchestrate import COMPILE_CACHE, compile_cache
from exporter.cli import main
from tests.helpers import TINY, call, one_line_error
from vitparity import artifact
from vitparity.errors import UserError


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _save_manifest(folder, manifest):
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _rehash(folder, name):
    manifest = _manifest(folder)
    path = folder / name
    manifest["files"][name] = {"sha256": artifact.sha256(path), "bytes": path.stat().st_size}
    _save_manifest(folder, manifest)


def _as_user_weights(folder):
    """The manifest of an artifact exported with the user's own weights file (what --weights FILE records)."""
    manifest = _manifest(folder)
    manifest["weights_source"] = "file /home/user/finetuned.safetensors"
    _save_manifest(folder, manifest)


def test_a_symlinked_compile_cache_is_replaced_and_its_target_left_whole(tiny_copy, tmp_path):
    outside = tmp_path / "users-folder"
    (outside / "precious").mkdir(parents=True)
    (outside / "precious" / "sentinel.txt").write_text("keep me")
    shutil.rmtree(tiny_copy / TINY / COMPILE_CACHE, ignore_errors=True)  # copied from a shared artifact that had one
    (tiny_copy / TINY / COMPILE_CACHE).symlink_to(outside, target_is_directory=True)
    folder = compile_cache(artifact.load(tiny_copy, TINY), "fp32")
    assert (outside / "precious" / "sentinel.txt").read_text() == "keep me", "a folder outside the artifact was emptied"
    cache = tiny_copy / TINY / COMPILE_CACHE
    assert not cache.is_symlink() and cache.is_dir() and folder.is_dir() and cache in folder.parents


def test_a_link_inside_the_compile_cache_is_removed_as_a_link(tiny_copy, tmp_path):
    outside = tmp_path / "users-folder"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "sentinel.txt").write_text("keep me")
    cache = tiny_copy / TINY / COMPILE_CACHE
    cache.mkdir(exist_ok=True)
    (cache / ("0" * 64)).symlink_to(outside, target_is_directory=True)  # a stale entry that is a link
    compile_cache(artifact.load(tiny_copy, TINY), "fp32")
    assert (outside / "sub" / "sentinel.txt").read_text() == "keep me"


def test_an_artifact_file_that_is_a_link_is_refused_and_its_target_keeps_its_mode(tiny_copy, tmp_path, capsys):
    target = tmp_path / "private.safetensors"
    folder = tiny_copy / TINY
    shutil.move(folder / "weights.safetensors", target)
    target.chmod(0o600)
    (folder / "weights.safetensors").symlink_to(target)
    _as_user_weights(folder)
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tiny_copy), "--if-missing", "--variant", "fp16")
    line = one_line_error(err)
    assert code == 2 and "weights.safetensors" in line and "symbolic link" in line
    assert stat.S_IMODE(target.stat().st_mode) == 0o600, "a chmod went through the link"
    assert (folder / "weights.safetensors").is_symlink(), "the user's link was replaced"


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", ".hidden", "a/b"])
def test_manifest_file_names_outside_the_folder_are_refused(tiny_copy, name):
    folder = tiny_copy / TINY
    manifest = _manifest(folder)
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    _save_manifest(folder, manifest)
    with pytest.raises(UserError, match="not a plain name inside the artifact folder"):
        artifact.load(tiny_copy, TINY)


def test_a_digest_that_is_a_path_is_refused(tiny_copy):
    folder = tiny_copy / TINY
    manifest = _manifest(folder)
    manifest["files"]["model.onnx"]["sha256"] = "../../../../tmp/x"
    _save_manifest(folder, manifest)
    with pytest.raises(UserError, match="64 hex digits"):
        artifact.load(tiny_copy, TINY)


@pytest.mark.parametrize("location", ["../../../../etc/passwd", "/etc/passwd"])
def test_external_data_outside_the_artifact_is_refused_even_with_matching_hashes(tiny_copy, capsys, location):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], np.zeros(4, np.float32).tobytes(), raw=True)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    folder = tiny_copy / TINY
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    _rehash(folder, "model.onnx")  # the hashes fixed up: only the path gives it away
    _as_user_weights(folder)
    with pytest.raises(UserError, match="outside the artifact folder"):
        artifact.load(tiny_copy, TINY)
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tiny_copy), "--if-missing", "--variant", "fp16")
    assert code == 2 and "outside the artifact folder" in one_line_error(err)


def test_the_published_folder_is_as_shareable_as_its_files(artifacts_root):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((artifacts_root / TINY).stat().st_mode) == 0o777 & ~umask


@pytest.fixture
def variants_copy(variants_root, tmp_path):
    """A private copy of the tiny artifact with its int8 and fp16 variants, marked as exported with the user's weights."""
    root = tmp_path / "artifacts"
    shutil.copytree(variants_root / TINY, root / TINY)
    _as_user_weights(root / TINY)
    return root


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_variant_is_dropped_and_the_users_weights_kept(variants_copy, capsys):
    folder = variants_copy / TINY
    weights = artifact.sha256(folder / "weights.safetensors")
    graph = artifact.sha256(folder / "model.onnx")
    _flip_one_byte(folder / "model.fp16.onnx")
    code, _, err = call(main, capsys, TINY, "--artifacts", str(variants_copy), "--if-missing")
    assert code == 0 and "dropped model.fp16.onnx" in err, err
    found = artifact.load(variants_copy, TINY)  # whole again
    assert found.manifest["weights_source"].startswith("file "), "re-exported with other weights"
    assert artifact.sha256(folder / "weights.safetensors") == weights and artifact.sha256(folder / "model.onnx") == graph
    assert "model.fp16.onnx" not in found.manifest["files"] and "model.int8.onnx" in found.manifest["variants"]
    assert not (folder / "model.fp16.onnx").exists()


def test_a_damaged_variant_that_is_asked_for_is_rebuilt_from_the_artifacts_own_graph(variants_copy, capsys):
    folder = variants_copy / TINY
    weights = artifact.sha256(folder / "weights.safetensors")
    _flip_one_byte(folder / "model.fp16.onnx")
    code, _, err = call(main, capsys, TINY, "--artifacts", str(variants_copy), "--if-missing", "--variant", "fp16")
    assert code == 0, err
    found = artifact.load(variants_copy, TINY)
    assert "model.fp16.onnx" in found.manifest["variants"] and artifact.sha256(folder / "weights.safetensors") == weights


def test_damaged_core_files_of_user_weights_are_an_error_that_names_them(variants_copy, capsys):
    folder = variants_copy / TINY
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    _flip_one_byte(folder / "model.onnx")
    before["model.onnx"] = (folder / "model.onnx").read_bytes()
    code, _, err = call(main, capsys, TINY, "--artifacts", str(variants_copy), "--if-missing")
    line = one_line_error(err)
    assert code == 2 and "model.onnx" in line and "never replaced" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before, "the artifact was changed"


def test_an_unreadable_manifest_is_not_exported_over(variants_copy, capsys):
    folder = variants_copy / TINY
    (folder / "manifest.json").write_text("{ not json")
    code, _, err = call(main, capsys, TINY, "--artifacts", str(variants_copy), "--if-missing")
    assert code == 2 and "cannot say whose weights" in one_line_error(err)
    assert (folder / "manifest.json").read_text() == "{ not json"


@pytest.mark.parametrize("keep,message", [("NotAnOp,AlsoJunk", "'NotAnOp' is not an ONNX operator"),
                                          ("LayerNormalization,Softmaxx", "'Softmaxx' is not an ONNX operator")])
def test_fp16_keep_takes_only_onnx_operators(capsys, tmp_path, keep, message):
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--variant", "fp16", "--fp16-keep", keep)
    assert code == 2 and message in one_line_error(err)
    assert not any(tmp_path.iterdir()), "refused before any work"
