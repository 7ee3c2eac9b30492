"""Hostile but honest input to the comparator: one-line errors with the right exit code, no PASS on
nothing, no lost data. Each test names the case from the field report it covers."""
from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from compare.cli import main
from compare.inputs import image_batch
from tests.helpers import ROOT, TINY, call, one_line_error, runnable
from vitparity import artifact

FAST = ["--iters", "1", "--warmup", "0"]


def _main(capsys, *args):
    return call(main, capsys, *args)


def test_against_and_save_reference_on_one_file_is_refused_and_the_file_kept(artifacts_root, capsys, tmp_path):
    stored = tmp_path / "R.npz"
    stored.write_bytes(b"the other host's outputs")
    code, _, err = _main(capsys, TINY, "--artifacts", str(artifacts_root), "--against", str(stored),
                         "--save-reference", str(tmp_path / "." / "R.npz"))
    assert code == 2 and "would overwrite the reference read with --against" in one_line_error(err)
    assert stored.read_bytes() == b"the other host's outputs"


def test_a_run_that_compared_nothing_is_not_a_pass_and_says_not_compared_and_exit_2_in_its_json(artifacts_root, capsys, tmp_path):
    backends = "ort-cpu,torch-npu,ort-cann"
    if runnable("torch-npu") or runnable("ort-cann"):
        pytest.skip(f"this host can run some of {backends}: the run compares something")
    code, out, err = _main(capsys, TINY, "--artifacts", str(artifacts_root), "--backends", backends, "--reference", "ort-cpu",
                           "--input", "random", *FAST, "--json", str(tmp_path / "r.json"))
    assert code == 2 and "PASS" not in out and "NOT COMPARED" in out
    assert "nothing was compared against ort-cpu" in err and "torch-npu (skipped)" in err and "Traceback" not in err
    data = json.loads((tmp_path / "r.json").read_text())
    [report] = data["reports"]
    assert data["exit_code"] == 2 and (report["verdict"], report["passed"], report["exit_code"]) == ("NOT COMPARED", False, 2)


def test_saving_the_reference_alone_is_a_real_use_and_passes(artifacts_root, capsys, tmp_path):
    code, _, _ = _main(capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "ort-cpu", "--reference", "ort-cpu",
                       "--input", "random", "--no-latency", "--save-reference", str(tmp_path / "cpu.npz"))
    assert code == 0 and (tmp_path / "cpu.npz").is_file()


@pytest.mark.parametrize("args,message", [
    (("--backends", ","), "--backends names no backend"),
    (("--require", "torch-npu", "--backends", "torch-cpu,ort-cpu"), "--require torch-npu, but torch-npu is not among --backends"),
    (("--batch-size", "0"), "--batch-size must be at least 1"),
    (("--warmup", "-5"), "--warmup must be at least 0"),
    (("--input", "random", "--seed", "-1"), "--seed must be at least 0"),
    (("--input", "random", "--image", "notes.txt"), "--image and --input random exclude each other"),
    (("--json", "."), "--json . is a folder"),
])
def test_bad_options_are_one_line_usage_errors_before_any_work(artifacts_root, capsys, args, message):
    started = time.monotonic()
    code, _, err = _main(capsys, TINY, "--artifacts", str(artifacts_root), *args)
    assert code == 2 and message in one_line_error(err)
    assert time.monotonic() - started < 5  # refused before loading anything heavy


def test_user_text_that_looks_like_markup_is_printed_as_written(tmp_path, capsys):
    code, _, err = _main(capsys, "dinov3", "--artifacts", str(tmp_path / "[draft]"))
    assert code == 2 and f"no artifact for dinov3 under {tmp_path / '[draft]'}" in one_line_error(err)


def test_an_image_path_that_is_a_folder_says_so(artifacts_root, capsys, tmp_path):
    code, _, err = _main(capsys, TINY, "--artifacts", str(artifacts_root), "--image", str(tmp_path))
    assert code == 2 and "is a folder" in one_line_error(err)


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height: enough for PIL to know the size without decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [15000, 9000])  # over PIL's bomb limit, and under it but over ours
def test_a_huge_image_is_refused_with_its_size(artifacts_root, capsys, tmp_path, side):
    _png_header_only(tmp_path / "huge.png", side, side)
    code, _, err = _main(capsys, TINY, "--artifacts", str(artifacts_root), "--image", str(tmp_path / "huge.png"))
    assert code == 2 and "too large" in one_line_error(err) and "smaller image" in err


def test_a_16_bit_png_is_scaled_not_clipped(artifacts_root, tmp_path):
    from PIL import Image

    values = np.tile(np.arange(256, dtype=np.uint16), (64, 1))
    Image.fromarray(values * 257).save(tmp_path / "deep.png")  # 16-bit greyscale, full range
    Image.fromarray(values.astype(np.uint8)).save(tmp_path / "flat.png")  # the same picture in 8 bits
    config = artifact.load(artifacts_root, TINY).manifest["data_config"]
    deep, flat = image_batch(tmp_path / "deep.png", config, 1), image_batch(tmp_path / "flat.png", config, 1)
    assert np.abs(deep - flat).max() < 1e-5


@pytest.mark.parametrize("edit,problem", [
    (lambda m: m.update(files=list(m["files"])), "'files' is missing or not an object"),
    (lambda m: m["files"].update({"model.onnx": "abc"}), "the record of model.onnx is not"),
    (lambda m: m.pop("timm_name"), "'timm_name' is missing"),
    (lambda m: [m], "it holds a list"),
])
def test_a_malformed_manifest_is_named_in_one_line(tiny_copy, capsys, edit, problem):
    path = tiny_copy / TINY / "manifest.json"
    manifest = json.loads(path.read_text())
    replaced = edit(manifest)
    path.write_text(json.dumps(replaced if isinstance(replaced, list) else manifest))
    code, _, err = _main(capsys, TINY, "--artifacts", str(tiny_copy), *FAST)
    assert code == 2 and "manifest.json is malformed" in one_line_error(err) and problem in err


def test_ctrl_c_while_starting_up_exits_130_without_a_traceback(artifacts_root):
    for delay in (0.3, 0.8, 2.0):
        # SIGINT as a terminal delivers it: a runner started in the background (`cmd &`) ignores SIGINT,
        # and Python keeps a signal that was ignored at start-up ignored.
        process = subprocess.Popen([sys.executable, "-m", "compare", TINY, "--artifacts", str(artifacts_root)],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130 and "Traceback" not in err, (delay, err)


def test_deleting_the_derived_blocks_onnx_keeps_the_artifact_usable(tiny_copy, capsys, ort_only):
    args = (TINY, "--artifacts", str(tiny_copy), *ort_only, "--layers", "--no-latency")
    assert _main(capsys, *args)[0] == 0
    (tiny_copy / TINY / "blocks.onnx").unlink()
    artifact.load(tiny_copy, TINY)  # still verifies
    code, out, _ = _main(capsys, *args)
    assert code == 0 and "no drift" in out and (tiny_copy / TINY / "blocks.onnx").is_file()


@pytest.fixture
def read_only(tiny_copy, tmp_path):
    """The tiny artifact root mounted read-only (a shared or mounted copy), as root can here."""
    for derived in (tiny_copy / TINY).glob("*blocks.onnx"):  # as shipped: a --layers run on the shared root may have added it
        derived.unlink()
    target = tmp_path / "ro"
    target.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(tiny_copy), str(target)], capture_output=True).returncode:
        pytest.skip("this host does not let the tests mount a read-only folder")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_layers_on_a_read_only_artifact_keep_derived_files_in_the_cache(read_only, capsys, monkeypatch, tmp_path, ort_only):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, out, err = _main(capsys, TINY, "--artifacts", str(read_only), *ort_only, "--layers", "--no-latency")
    assert code == 0, out + err
    assert "no drift" in out
    assert list((tmp_path / "cache" / "vit-parity" / "blocks").glob("*/blocks.onnx"))
    assert not (read_only / TINY / "blocks.onnx").exists()
