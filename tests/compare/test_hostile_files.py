"""Hostile files and folders for the comparator: a bad image is a skip with its reason, never the end of a
run; a crafted reference file is one line, never a traceback or gigabytes read; image listing ends on
link loops; nothing is judged PASS on nothing; killed runs leave nothing behind for long."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from compare import reference
from compare.cli import main
from compare.inputs import default_image
from compare.judge import neighbour_row
from tests.helpers import TINY, call, make_images, one_line_error
from vitparity import artifact, processes
from vitparity.errors import UserError
from vitparity.images import list_images, open_rgb, to_rgb
from vitparity.tolerances import TOLERANCES


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(*chunks: bytes) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def _ihdr(width=8, height=8) -> bytes:
    return _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def damaged_images(folder):
    """Files whose bytes make Pillow raise something other than OSError: each must be a skip with a reason."""
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good, format="PNG")
    files = {
        "bad_chunk_header.png": good.getvalue()[:33] + b"\x00\x00\x00\x05\xff\xfe\xfd\xfc" + good.getvalue()[41:],
        "short_ihdr.png": _png(_png_chunk(b"IHDR", b"\x00\x00\x00\x08")),
        # A text chunk that inflates far beyond Pillow's limit for text (a decompression bomb in a small file).
        "text_bomb.png": _png(_ihdr(), _png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * 50_000_000, 9)),
                              _png_chunk(b"IDAT", zlib.compress(b"\x00" + b"\x00" * 24 * 8)), _png_chunk(b"IEND", b"")),
        "bad_header.ppm": b"P6\n-3 8\n255\n" + b"\x00" * 10,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def test_every_decoder_failure_is_a_user_error_naming_the_file(tmp_path):
    config = {"input_size": [3, 160, 160]}
    for path in damaged_images(tmp_path):
        with pytest.raises(UserError) as raised:
            open_rgb(path, config)
        assert path.name in str(raised.value)


def test_a_damaged_image_given_with_image_is_one_line(artifacts_root, capsys, tmp_path):
    [path, *_] = damaged_images(tmp_path)
    code, _, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--image", str(path), "--no-latency",
                        "--backends", "torch-cpu,ort-cpu")
    assert code == 2 and path.name in one_line_error(err)


def test_32_bit_greyscale_above_16_bits_is_scaled_not_clipped():
    values = np.array([[0, 70_000, 1_000_000, 2**31 - 1]], dtype=np.int32)
    rgb = np.asarray(to_rgb(Image.fromarray(values, mode="I"), "x"))[..., 0]
    assert list(rgb[0]) == [0, 0, 0, 255] and rgb[0, 2] < rgb[0, 3]
    assert list(np.asarray(to_rgb(Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I"), "x"))[0, :, 0]) == [0, 255]


def test_image_listing_ends_on_link_loops_and_uses_each_file_once(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    Image.open(default_image()).save(folder / "a.jpg")
    Image.open(default_image()).save(folder / "sub" / "b.jpg")
    (folder / "l1").symlink_to(".", target_is_directory=True)
    (folder / "l2").symlink_to(".", target_is_directory=True)
    (folder / "sub" / "up").symlink_to("..", target_is_directory=True)
    os.mkfifo(folder / "pipe.jpg")
    (folder / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    started = time.monotonic()
    for spec in (f"{folder}/**/*.jpg", str(folder)):
        found = list_images(spec)
        names = sorted(p.name for p in found)
        assert names == ["a.jpg", "b.jpg", "dangling.jpg", "pipe.jpg"], (spec, found)
    assert time.monotonic() - started < 10


def test_a_symlinked_subfolder_is_read_by_both_forms(tmp_path):
    (tmp_path / "real").mkdir()
    Image.open(default_image()).save(tmp_path / "real" / "x.jpg")
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    assert [p.name for p in list_images(str(tmp_path / "top"))] == ["x.jpg"]
    assert [p.name for p in list_images(f"{tmp_path}/top/**/*.jpg")] == ["x.jpg"]


def test_a_neighbour_row_of_one_image_is_not_judged_and_never_passes():
    row = neighbour_row("ort-cpu", np.ones((1, 8)), np.ones((1, 8)), TOLERANCES["same-host"])
    assert row.passed is None and "not judged" in row.note and row.k == 0


def test_images_with_damaged_files_and_a_non_utf8_name_run_time_the_real_batch_and_report(artifacts_root, capsys, tmp_path):
    """One run for several classes: damaged files are skipped with reasons, a name that is not UTF-8 is printed
    and written safely, the latency is timed at the --images batch size (never batch 0), and the report is written."""
    photos = make_images(tmp_path / "photos", 3, extras=False)
    damaged_images(photos)
    odd = os.fsencode(photos) + b"/caf\xe9.jpg"  # Latin-1 bytes: not a UTF-8 name
    with open(odd, "wb") as handle:
        handle.write((photos / "photo_000.png").read_bytes())
    os.mkfifo(photos / "pipe.jpg")
    code, out, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu,ort-cpu",
                          "--images", str(photos), "--batch-size", "2", "--iters", "2", "--warmup", "0",
                          "--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "r.md"))
    assert code == 0 and "Traceback" not in err, out + err
    [report] = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert report["input"]["count"] == 4 and any("caf\\xe9.jpg" in i["path"] for i in report["input"]["images"])
    skipped = {entry["path"].rsplit("/", 1)[1] for entry in report["input"]["skipped"]}
    assert skipped == {"bad_chunk_header.png", "short_ihdr.png", "text_bomb.png", "bad_header.ppm", "pipe.jpg"}
    assert {(row["backend"], row["batch"]) for row in report["latency"]} == {("torch-cpu", 2), ("ort-cpu", 2)}
    assert not any("batch 0" in w for w in report["warnings"])
    written = (tmp_path / "r.md").read_text()
    assert "pipe.jpg" in written and "text_bomb.png" in written, "the report lists what was skipped"


def test_a_folder_without_readable_images_blames_the_images_not_the_backend(artifacts_root, capsys, tmp_path):
    damaged_images(tmp_path)
    code, _, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu,ort-cpu",
                        "--images", str(tmp_path), "--no-latency")
    line = one_line_error(err)
    assert code == 2 and "none of the 4 files is a readable image" in line and "--reference" not in line


def test_a_batch_that_cannot_fit_in_memory_is_one_line(artifacts_root, capsys):
    code, _, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--input", "random",
                        "--batch-size", "1000000", "--no-latency")
    assert code == 2 and "--batch-size 1000000" in one_line_error(err)


def test_an_empty_variants_list_is_refused(artifacts_root, capsys):
    code, _, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--variants", "")
    assert code == 2 and "--variants '' names no variant" in one_line_error(err)


def test_abandoned_image_folders_are_removed_by_any_command(tmp_path, monkeypatch, capsys):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f"{processes.IMAGES_PREFIX}{dead}-abc"
    (stale / "x").mkdir(parents=True)
    processes.hold(stale).close()  # its owner's lock, released: the owner is gone (kill -9 leaves it so)
    older = tmp_path / f"{processes.IMAGES_PREFIX}{dead}-old"  # an older version's folder: no lock, untouched for hours
    older.mkdir()
    os.utime(older, (time.time() - 2 * processes.UNLOCKED_GRACE_S,) * 2)
    mine_context = processes.owned_folder(processes.IMAGES_PREFIX, tmp_path)
    mine = mine_context.__enter__()  # a live run's folder: its lock held
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / f"{processes.IMAGES_PREFIX}{dead}-link").symlink_to(outside, target_is_directory=True)
    from exporter.cli import main as export_main

    assert call(export_main, capsys, "--list")[0] == 0
    assert not stale.exists() and not older.exists() and mine.exists() and outside.exists()
    mine_context.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------
# Crafted --against files: every field checked against the schema, sizes before any array is read.


@pytest.fixture(scope="module")
def saved(artifacts_root, saved_tiny):
    """A real reference saved from the tiny ViT (conftest.py), and the artifact's manifest."""
    return saved_tiny, artifact.load(artifacts_root, TINY).manifest


def _rewrite(source, target, metadata=None, drop=(), extra=None):
    with np.load(source, allow_pickle=False) as found:
        arrays = {key: found[key] for key in found.files if key not in drop}
    meta = json.loads(str(arrays.pop("metadata")))
    if metadata:
        meta = metadata(meta)
    buffer = io.BytesIO()
    np.savez(buffer, metadata=np.array(json.dumps(meta)), **arrays, **(extra or {}))
    target.write_bytes(buffer.getvalue())
    return target


CRAFTED = {
    "backends as a list": dict(metadata=lambda m: {**m, "backends": list(m["backends"])}),
    "details: 1": dict(metadata=lambda m: {**m, "backends": {k: {**v, "details": 1} for k, v in m["backends"].items()}}),
    "input: x": dict(metadata=lambda m: {**m, "input": "x"}),
    "input without sha256": dict(metadata=lambda m: {**m, "input": {"shape": m["input"]["shape"]}}),
    "unknown tolerance": dict(metadata=lambda m: {**m, "backends": {k: {**v, "tolerance": "lax"} for k, v in m["backends"].items()}}),
    "truth rows of strings": dict(metadata=lambda m: {**m, "truth": ["x"]}),
    "host a number": dict(metadata=lambda m: {**m, "host": 5}),
    "no tokens": dict(drop=("outputs/torch-cpu/tokens",)),
    "an output of another backend": dict(extra={"outputs/ghost/pooled": np.zeros((1, 4), np.float32)}),
    "a string array": dict(extra={"taps/torch-cpu/x": np.array(["a"])}),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_reference_is_one_line_never_a_traceback(saved, tmp_path, capsys, artifacts_root, case):
    source, manifest = saved
    path = _rewrite(source, tmp_path / "crafted.npz", **CRAFTED[case])
    with pytest.raises(UserError, match="malformed|not a reference|truncated"):
        reference.load(path, manifest)
    code, _, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu",
                        "--no-latency", "--against", str(path))
    assert code == 2 and str(path) in one_line_error(err)


def test_a_member_declaring_a_trillion_elements_is_refused_unread(saved, tmp_path):
    source, manifest = saved
    header = {"descr": "<f4", "fortran_order": False, "shape": (1_000_000_000_000,)}
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    path = tmp_path / "huge.npz"
    path.write_bytes(source.read_bytes())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("taps/torch-cpu/huge.npy", member.getvalue() + b"\x00" * 64)
    started = time.monotonic()
    with pytest.raises(UserError, match="declares 4,000,000,000,000 bytes"):
        reference.load(path, manifest)
    assert time.monotonic() - started < 10


def test_a_reference_from_other_images_is_refused_before_any_backend_runs(artifacts_root, capsys, tmp_path, monkeypatch):
    first = make_images(tmp_path / "first", 3, extras=False)
    saved_path = tmp_path / "ref.npz"
    assert call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu", "--no-latency",
                "--images", str(first), "--save-reference", str(saved_path))[0] == 0
    other = tmp_path / "other"
    other.mkdir()
    for i, path in enumerate(sorted(first.rglob("*.*"))):
        Image.open(path).convert("RGB").rotate(90).save(other / f"{i}.png")
    from compare import launch

    def no_worker(*args, **kwargs):
        raise AssertionError("a backend ran before the images were checked against the reference")

    monkeypatch.setattr(launch, "run_backend", no_worker)
    code, _, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu,ort-cpu",
                        "--no-latency", "--images", str(other), "--against", str(saved_path))
    assert code == 2 and "the images differ from those stored" in one_line_error(err)
