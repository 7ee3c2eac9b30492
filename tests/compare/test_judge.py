"""The one data path and the one judge, in-process on hand-made arrays with known answers: per-item figures,
the rows built from them, the folder's stream against one batch, neighbours, the truth and --batch-sizes rows."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from compare import dataset, judge
from compare.cli import main
from tests.helpers import TINY, call, make_images
from vitparity import metrics
from vitparity.tolerances import TOLERANCES

LAYOUT = {"cls": 1, "registers": 2, "patches": 5}
SAME_HOST, FP16 = TOLERANCES["same-host"], TOLERANCES["accelerator"]


def outputs(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"pooled": rng.standard_normal((count, 16)).astype(np.float32),
            "tokens": rng.standard_normal((count, 8, 16)).astype(np.float32)}


def rows_by_label(rows) -> dict:
    return {row.label: row for row in rows}


def test_the_whole_is_the_flattened_output_and_the_worst_item_is_judged_too():
    want = outputs(4)
    got = {name: array.copy() for name, array in want.items()}
    got["pooled"][2] += 0.05 * np.linalg.norm(want["pooled"][2]) / 4  # item 2 alone drifts: ||d|| = 5% of its norm
    rows = rows_by_label(judge.compare_outputs("x", got, want, SAME_HOST, LAYOUT, items=["a", "b", "c", "d"]))
    pooled = rows["pooled"]
    # The whole: exactly the figures of the flattened arrays; the worst item: item 2's own.
    assert pooled.cosine == pytest.approx(metrics.cosine(got["pooled"], want["pooled"]), abs=1e-12)
    assert pooled.rel_error == pytest.approx(metrics.relative_error(got["pooled"], want["pooled"]), rel=1e-9)
    assert pooled.worst_sample_cosine == pytest.approx(metrics.cosine(got["pooled"][2], want["pooled"][2]), abs=1e-12)
    assert pooled.images["rel_worst"] == pytest.approx(0.05, rel=1e-3) and pooled.rel_error < 0.05
    assert pooled.images["worst_image"] == "c" and pooled.images["worst_rel_image"] == "c" and pooled.images["count"] == 4
    assert pooled.shape == [4, 16] and not pooled.passed  # judged on the worst item: 5% > 1e-4
    # The tokens are untouched: every group passes, and each group's shape is its slice of the tokens.
    assert {label: (row.passed, row.shape) for label, row in rows.items() if label != "pooled"} == {
        "tokens": (True, [4, 8, 16]), "tokens[cls]": (True, [4, 1, 16]), "tokens[registers]": (True, [4, 2, 16]),
        "tokens[patches]": (True, [4, 5, 16])}
    cos_failure, rel_failure = SAME_HOST.judge(pooled.worst_sample_cosine, pooled.images["rel_worst"]).failures
    assert cos_failure.startswith("cosine 0.99") and rel_failure == "rel err 0.05 > 0.0001 (5e+02x the limit)"


def test_a_looser_class_passes_what_the_strict_one_fails_and_nan_and_shapes_fail_every_class():
    want = outputs(2)
    got = {name: array * np.float32(1.001) + np.float32(1e-3) for name, array in want.items()}
    assert not all(row.passed for row in judge.compare_outputs("x", got, want, SAME_HOST, LAYOUT))
    assert all(row.passed for row in judge.compare_outputs("x", got, want, FP16, LAYOUT))
    got["tokens"][1, 3, 0] = np.nan
    rows = rows_by_label(judge.compare_outputs("x", got, want, FP16, LAYOUT))
    assert rows["tokens"].nonfinite == 1 and not rows["tokens"].passed and math.isnan(rows["tokens"].cosine)
    assert rows["tokens[registers]"].nonfinite == 0 and rows["tokens[registers]"].passed  # token 3 is a patch
    assert not rows["tokens[patches]"].passed and rows["pooled"].passed
    wrong = {"pooled": want["pooled"][:, :8], "tokens": want["tokens"]}
    row = rows_by_label(judge.compare_outputs("x", wrong, want, FP16, LAYOUT))["pooled"]
    assert (row.shape_match, row.passed, row.shape, row.reference_shape) == (False, False, [2, 8], [2, 16])


def test_a_folder_streamed_in_batches_gives_the_rows_of_the_same_items_as_one_batch(tmp_path):
    """The worker's path (dataset.stream, batch by batch against the reference written to disk) and the parent's
    path for one batch give the same rows: same fields, same figures to the last bits summation order allows."""
    count, shape = 7, (3, 4, 4)
    inputs = np.random.default_rng(1).standard_normal((count, *shape)).astype(np.float32)
    inputs.tofile(tmp_path / dataset.INPUTS)
    reference, other = Model(0.0), Model(0.02)
    plan = {"inputs": str(tmp_path / dataset.INPUTS), "batch": 3, "shape": list(shape)}
    dataset.stream(reference, {**plan, "write": str(tmp_path / "reference"), "dtype": "float32"}, LAYOUT)
    arrays, _ = dataset.stream(other, {**plan, "reference": {"prefix": str(tmp_path / "reference")}}, LAYOUT)
    items = [f"image {i}" for i in range(count)]
    streamed = judge.accuracy_rows("x", judge.from_wire(arrays, "reference"), FP16, items)
    whole = judge.compare_outputs("x", other.run(inputs), reference.run(inputs), FP16, LAYOUT, items=items)
    assert [row.label for row in streamed] == [row.label for row in whole] == [
        "pooled", "tokens", "tokens[cls]", "tokens[registers]", "tokens[patches]"]
    for a, b in zip(streamed, whole):
        assert_same_row(asdict(a), asdict(b))
    assert np.array_equal(arrays["embeddings"], other.run(inputs)["pooled"])


class Model:
    """A stand-in backend of the stream's interface (run: batch -> outputs), in numpy: `noise` of relative size."""

    def __init__(self, noise: float):
        self.noise = noise

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        flat = batch.reshape(len(batch), -1)
        tokens = np.stack([flat[:, :16] * (k + 1) for k in range(8)], axis=1)
        tokens = tokens + self.noise * np.cos(7 * tokens)  # elementwise: an item's outputs do not depend on its batch
        return {"pooled": tokens.mean(axis=1).astype(np.float32), "tokens": tokens.astype(np.float32)}


def assert_same_row(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12, nan_ok=True), key
        elif isinstance(a[key], dict):
            assert_same_row(a[key], b[key])
        elif isinstance(a[key], list) and a[key] and not isinstance(a[key][0], int):
            assert len(a[key]) == len(b[key]), key
            assert_same_row(dict(enumerate(a[key])), dict(enumerate(b[key])))
        else:
            assert a[key] == b[key], key


def test_the_truth_error_is_the_whole_outputs_and_its_ratio_to_the_references():
    truth = outputs(3, seed=5)
    reference = {name: array + np.float32(1e-4) for name, array in truth.items()}
    other = {name: array + np.float32(3e-4) for name, array in truth.items()}
    images = {name: judge.wire("truth", judge.item_figures(found, truth, None))
              for name, found in (("ref", reference), ("other", other))}
    rows = {(row.backend, row.output): row for row in judge.truth_rows(images, "ref", "fp64")}
    for output in ("pooled", "tokens"):
        want = metrics.relative_error(other[output], truth[output])
        assert rows[("other", output)].rel_error == pytest.approx(want, rel=1e-9)
        assert rows[("other", output)].ratio == pytest.approx(want / metrics.relative_error(reference[output], truth[output]))
        assert rows[("other", output)].ratio == pytest.approx(3.0, rel=0.05)


def test_neighbours_are_judged_by_the_class_and_one_item_is_never_a_pass():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((12, 8))
    assert judge.neighbour_row("x", reference, reference.copy(), SAME_HOST).passed is True
    shuffled = reference[rng.permutation(12)]  # every image's embedding is another's: neighbours are lost
    row = judge.neighbour_row("x", reference, shuffled, SAME_HOST)
    assert row.passed is False and row.overlap < SAME_HOST.min_overlap
    one = judge.neighbour_row("x", reference[:1], reference[:1], SAME_HOST)
    assert (one.passed, one.k) == (None, 0) and "not judged" in one.note


def test_batch_size_rows_appear_only_where_the_judgement_differs_from_the_accuracy_batch():
    want = outputs(2)
    accuracy = judge.compare_outputs("x", want, want, SAME_HOST, LAYOUT)
    good = {f"{size}/{name}": np.resize(array, (size, *array.shape[1:])) for size in (1, 3) for name, array in want.items()}
    bad = dict(good, **{"3/pooled": good["3/pooled"] + np.float32(1.0)})
    assert judge.size_rows({"x": good}, want, "ref", accuracy, {"x": SAME_HOST}, LAYOUT) == []
    [row] = judge.size_rows({"x": bad}, want, "ref", accuracy, {"x": SAME_HOST}, LAYOUT)
    assert (row.label, row.passed, row.shape) == ("pooled @ batch 3", False, [3, 16])


def test_one_image_as_a_folder_and_as_image_give_the_same_rows(artifacts_root, capsys, tmp_path, ort_only):
    """The end-to-end check of the one data path: the same photo through --images (a folder of one) and through
    --image builds the same accuracy, per-image and neighbour rows (the truth's rows: test_the_truth_error_is_...).
    The parent's row building is the subject: ort-cpu-2 against ort-cpu, no torch worker."""
    folder = make_images(tmp_path / "one", 1, extras=False)
    [photo] = [path for path in Path(folder).rglob("*") if path.is_file()]
    base = [TINY, "--artifacts", str(artifacts_root), *ort_only[:4], "--no-latency"]
    found, terminal = {}, {}
    for mode, args in (("folder", ["--images", str(folder)]), ("image", ["--image", str(photo)])):
        code, terminal[mode], err = call(main, capsys, *base, *args, "--json", str(tmp_path / f"{mode}.json"))
        assert code == 0, terminal[mode] + err
        [found[mode]] = json.loads((tmp_path / f"{mode}.json").read_text())["reports"]
    folder_report, image_report = found["folder"], found["image"]
    assert folder_report["input"]["kind"] == "images" and image_report["input"]["kind"] == "image"
    for key in ("accuracy", "neighbours", "per_image"):
        assert folder_report[key], key
        assert_same_row({key: folder_report[key]}, {key: image_report[key]})
    for report in (folder_report, image_report):  # one readable image: no neighbour PASS, in the JSON and the terminal
        [neighbours] = report["neighbours"]
        assert neighbours["passed"] is None and "not judged" in neighbours["note"]
    assert "not judged" in terminal["folder"]
