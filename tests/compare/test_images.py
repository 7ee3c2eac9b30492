"""Evidence on many images (--images): streamed in batches, per-image results with the worst image named,
neighbour agreement, the fp64 truth, and memory that does not grow with the folder."""
from __future__ import annotations

import contextlib
import io
import json
import tracemalloc

import pytest

from compare.cli import main
from compare.plan import CompareOptions
from compare.run import compare
from tests.helpers import (
    TINY,
    call,
    make_images,
    one_line_error,
    rewrite_weights,
    shared,
)

BASE = ["--backends", "torch-cpu,ort-cpu", "--no-latency"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, worker_id):
    """12 photos made from the bundled one (crops, flips, colour shifts, sizes, a 16-bit PNG), a corrupt JPEG and a text file."""
    return shared(tmp_path_factory, worker_id, "photos", lambda folder: make_images(folder, 12))


@pytest.fixture(scope="module")
def photos_run(artifacts_root, photos, tmp_path_factory, worker_id):
    """One run over the photos for several tests, made once per run: per image, neighbours, the fp64 truth, and a
    saved reference. Batches of 5 over 12 images: the last batch is short. Returns (exit code, terminal text, report,
    saved file)."""
    def make(out):
        terminal = io.StringIO()
        with contextlib.redirect_stdout(terminal):
            code = main([TINY, "--artifacts", str(artifacts_root), *BASE, "--images", str(photos), "--batch-size", "5",
                         "--truth", "fp64", "--save-reference", str(out / "photos.npz"), "--json", str(out / "r.json")])
        (out / "terminal.txt").write_text(terminal.getvalue())
        (out / "exit-code").write_text(str(code))

    out = shared(tmp_path_factory, worker_id, "photos-run", make)
    [report] = json.loads((out / "r.json").read_text())["reports"]
    return int((out / "exit-code").read_text()), (out / "terminal.txt").read_text(), report, out / "photos.npz"


def test_a_folder_of_images_gives_per_image_results_and_names_what_it_skipped(artifacts_root, photos, photos_run, tmp_path):
    code, out, report, _ = photos_run
    assert code == 0 and report["verdict"] == "PASS", out
    described = report["input"]
    paths = [image["path"] for image in described["images"]]
    assert described["count"] == 12 and len(paths) == 12
    assert paths == sorted(paths, key=lambda p: p.replace(str(photos) + "/", ""))  # a fixed order: sorted by path
    assert any("/more/" in p for p in paths)  # the folder is read recursively
    skipped = {entry["path"].rsplit("/", 1)[1]: entry["reason"] for entry in described["skipped"]}
    assert set(skipped) == {"broken.jpg", "notes.txt"} and all("not an image" in why for why in skipped.values())
    assert sum("skipped" in w for w in report["warnings"]) == 2
    rows = {r["output"] + (f"[{r['group']}]" if r["group"] else ""): r for r in report["accuracy"]}
    assert set(rows) == {"pooled", "tokens", "tokens[cls]", "tokens[patches]"}
    for row in rows.values():
        assert row["images"]["count"] == 12 and row["images"]["worst_image"] in paths
        assert row["images"]["cos_worst"] <= row["images"]["cos_p1"] <= row["images"]["cos_median"]
    assert all(len(v["cosine"]) == 12 for v in report["per_image"]["ort-cpu"].values())
    [neighbours] = report["neighbours"]
    assert (neighbours["k"], neighbours["overlap"], neighbours["nearest_unchanged"]) == (10, 1.0, 1.0)
    assert "Per image (12 images" in out and "Neighbour agreement" in out and "images/s" in out
    # --limit 3: the decoder the first worker runs stops after the first 3 readable images, in the same order.
    from compare.dataset import preprocess
    from vitparity.images import list_images

    config = json.loads((artifacts_root / TINY / "manifest.json").read_text())["data_config"]
    limited, _ = preprocess(list_images(str(photos)), config, tmp_path, limit=3)
    assert [image["path"] for image in limited] == paths[:3]


def test_a_perturbed_artifact_lowers_neighbour_agreement_names_the_worst_image_and_the_truth_ratio(
        tiny_copy, photos, capsys, tmp_path):
    def perturb(state):
        state["blocks.1.mlp.fc1.weight"] *= 2.0
        state["blocks.3.attn.qkv.weight"] *= 1.5

    rewrite_weights(tiny_copy / TINY, perturb)
    code, out, _ = call(main, capsys, TINY, "--artifacts", str(tiny_copy), *BASE, "--images", str(photos),
                        "--batch-size", "4", "--truth", "fp64", "--json", str(tmp_path / "r.json"))
    [report] = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert code == 1 and report["verdict"] == "FAIL"
    [neighbours] = report["neighbours"]
    assert neighbours["overlap"] < 1.0 and not neighbours["passed"]
    worst = next(r for r in report["accuracy"] if r["output"] == "pooled" and not r["group"])["images"]["worst_image"]
    assert worst in out
    truth = {(r["backend"], r["output"]): r for r in report["truth"]}
    # The eager model and the fp64 truth share the perturbed weights; model.onnx does not.
    own = truth[("torch-cpu", "pooled")]["rel_error"]
    assert 0 < own < 1e-5 and truth[("torch-cpu", "pooled")]["ratio"] == pytest.approx(1.0)
    assert truth[("ort-cpu", "pooled")]["ratio"] > 1000


def test_the_fp64_truth_puts_the_cpu_references_own_error_next_to_each_backend(photos_run):
    code, out, report, _ = photos_run
    assert code == 0
    truth = {(r["backend"], r["output"]): r for r in report["truth"]}
    assert set(truth) == {(b, o) for b in ("torch-cpu", "ort-cpu") for o in ("pooled", "tokens")}
    assert all(0 < r["rel_error"] < 1e-5 for r in truth.values())  # fp32 is rounded: small, never zero
    assert 0.1 < truth[("ort-cpu", "tokens")]["ratio"] < 10
    assert "Against the fp64 truth" in out


def _peak_bytes(root, folder) -> int:
    tracemalloc.start()
    try:  # ort-cpu-2 against ort-cpu: the parent's memory is the subject, and only the decoding worker imports torch
        report, _ = compare(TINY, CompareOptions(artifacts=str(root), backends=("ort-cpu", "ort-cpu-2"), reference="ort-cpu",
                                                 latency=False, images=folder and str(folder), batch_size=8,
                                                 input=None if folder else "random"))
        assert report.verdict.status == "PASS" and (folder is None or report.input["count"] > 0)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_parent_holds_no_image_or_tokens_per_image(artifacts_root, tmp_path, ort_only):
    few = make_images(tmp_path / "few", 10, extras=False)
    many = make_images(tmp_path / "many", 110, extras=False)
    # What a process's first run of the images path allocates once (imports, caches) is not growth: warm it first,
    # then the few images, then the many (a one-off import would otherwise land on whichever ran first).
    _peak_bytes(artifacts_root, few)
    small = _peak_bytes(artifacts_root, few)
    grown = _peak_bytes(artifacts_root, many) - small
    # 100 more images: holding their inputs would take 31 MB, their tokens 2.6 MB per backend. Per-image
    # figures and the 64-float pooled embeddings take well under 1 MB.
    assert grown < 2_000_000, f"peak grew by {grown / 1e6:.1f} MB for 100 more images"


@pytest.mark.parametrize("args,message", [
    (("--images", "{empty}"), "holds no files"),
    (("--images", "{junk}"), "none of the 1 files is a readable image"),
    (("--limit", "3"), "--limit takes a count of at least 1, and goes with --images"),
    (("--images", "{junk}", "--image", "x.jpg"), "--images replaces --image"),
])
def test_bad_image_sets_are_one_line_errors(artifacts_root, capsys, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("not an image")
    args = [a.format(empty=tmp_path / "empty", junk=tmp_path / "junk") for a in args]
    code, _, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), *BASE, *args)
    assert code == 2 and message in one_line_error(err)


def test_an_image_set_travels_by_content_hash_and_a_tampered_one_fails(artifacts_root, photos, photos_run, capsys, tmp_path):
    import numpy as np

    saved = photos_run[3]
    base = [TINY, "--artifacts", str(artifacts_root), "--no-latency", "--images", str(photos), "--batch-size", "5"]
    code, out, _ = call(main, capsys, *base, "--backends", "torch-cpu", "--against", str(saved), "--json", str(tmp_path / "r.json"))
    [report] = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert code == 0 and report["verdict"] == "PASS", out
    stored = {r["backend"] for r in report["accuracy"]}
    assert {b.split("@")[0] for b in stored} == {"torch-cpu", "ort-cpu"} and all("@" in b for b in stored)
    assert {r["backend"] for r in report["neighbours"]} == stored and all(r["overlap"] == 1.0 for r in report["neighbours"])
    # Another image set is refused, by content: here the first 3 images only.
    code, _, err = call(main, capsys, *base, "--limit", "3", "--backends", "torch-cpu", "--against", str(saved))
    assert code == 2 and "the images differ from those stored" in one_line_error(err)
    # A stored embedding that was changed is caught, and the image named.
    with np.load(saved, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["embeddings/ort-cpu/pooled"][3] = arrays["embeddings/ort-cpu/pooled"][3][::-1].copy()  # another direction
    np.savez(tmp_path / "tampered.npz", **arrays)
    code, out, _ = call(main, capsys, *base, "--backends", "torch-cpu", "--against", str(tmp_path / "tampered.npz"),
                        "--json", str(tmp_path / "t.json"))
    [report] = json.loads((tmp_path / "t.json").read_text())["reports"]
    assert code == 1 and report["verdict"] == "FAIL"
    [row] = [r for r in report["accuracy"] if r["backend"].startswith("ort-cpu@") and not r["passed"]]
    assert row["images"]["worst_image"] == report["input"]["images"][3]["path"]
