"""Shared fixtures: real exports made once per test session, and private copies to edit."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def _cores_of_own() -> None:
    """Under pytest-xdist (`make test` runs two workers), each worker and every process it starts (the backends'
    workers, the exporters) runs on cores of its own: the machine's cores split evenly between the workers (one each
    on a 2-core host). Two comparisons at once, each with thread pools as wide as the machine, spent about 100 s of
    the suite's CPU spin-waiting for each other: on the 2-core host 600 s of CPU and 303-331 s of wall, against 448 s
    and 258 s split. A run without xdist keeps every core, and the thread pools as users have them."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    try:
        cores, index, count = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), int(count)
        if worker.startswith("gw") and 2 <= len(cores) and count >= 2:
            share = max(1, len(cores) // count)
            os.sched_setaffinity(0, set(cores[index * share:(index + 1) * share]) or {cores[index % len(cores)]})
    except (AttributeError, OSError, ValueError):  # not Linux, not under xdist, or not allowed here: all cores shared
        pass


_cores_of_own()  # before torch or onnxruntime is imported: their thread pools are sized from it
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for the hub; the auto path is tested offline

from tests.helpers import ORT_ONLY, TINY, TINY_INT8_KEEP, SecondOrtCpu, shared  # noqa: E402 - after the environment is set


@pytest.fixture(scope="session")
def worker_id() -> str:
    """pytest-xdist's worker name (gw0, gw1, ...), or "master" in a run without xdist: xdist's own fixture, defined
    here too, so that where pytest-xdist is not installed (a host with its own Python, installing nothing) or is
    turned off (-p no:xdist) the suite runs one test at a time, as the Makefile says, instead of failing to set up."""
    return os.environ.get("PYTEST_XDIST_WORKER", "master")


def _exported(tmp_path_factory, worker_id, name: str, meanwhile: tuple[str, ...] = ()) -> Path:
    """The session-wide artifacts root, with model `name` exported into it once for the whole run: the pytest-xdist
    workers share it, each model under a lock of its own, so a model is never exported twice and one worker waits
    only for a model it needs. Tests edit copies, never it; what the tool itself adds there (blocks.onnx) it
    publishes under the artifact's lock. A worker that finds `name` being exported by another exports the models
    `meanwhile` that no one exports yet, instead of waiting idle (at the start of a run both workers ask for the tiny
    model: one waited 8.5 s for the other)."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base  # xdist: basetemp/popen-gwN, one parent per run
    root = shared / "artifacts-shared"
    root.mkdir(exist_ok=True)
    with open(shared / f"artifacts-shared.{name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another worker exports it now
            for other in meanwhile:
                with open(shared / f"artifacts-shared.{other}.lock", "a") as other_lock:
                    try:
                        fcntl.flock(other_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    try:
                        _export_once(root, other)
                    except Exception:  # noqa: BLE001 - not this fixture's model: its own fixture exports it again and fails there
                        pass
            fcntl.flock(lock, fcntl.LOCK_EX)
        _export_once(root, name)
    return root


def _export_once(root: Path, name: str) -> None:
    """Export `name` into `root` unless an earlier holder of its lock did."""
    from exporter.export import ExportOptions, export

    if not (root / f"{name}.done").is_file():
        export(name, root, ExportOptions(weights="random"))
        (root / f"{name}.done").touch()


def _asked_for(request) -> tuple[str, ...]:
    """The big models some test of this run asks for (by their fixtures): what a waiting worker may export meanwhile."""
    fixtures = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    return tuple(model for model in ("dinov3", "dinov2") if f"{model}_root" in fixtures)


@pytest.fixture(scope="session")
def artifacts_root(request, tmp_path_factory, worker_id) -> Path:
    """The artifacts root with the tiny ViT. dinov3 and dinov2 (about 20 and 30 s of export here) are there only for
    the tests that ask for `dinov3_root` or `dinov2_root`: a worker that starts on tests of the tiny model never
    waits for them (it exports them only while it would otherwise wait for the tiny one)."""
    return _exported(tmp_path_factory, worker_id, TINY, meanwhile=_asked_for(request))


@pytest.fixture(scope="session")
def dinov3_root(artifacts_root, tmp_path_factory, worker_id) -> Path:
    """The same root, with dinov3 exported into it too."""
    return _exported(tmp_path_factory, worker_id, "dinov3")


@pytest.fixture(scope="session")
def dinov2_root(artifacts_root, tmp_path_factory, worker_id) -> Path:
    """The same root, with dinov2 exported into it too."""
    return _exported(tmp_path_factory, worker_id, "dinov2")


@pytest.fixture
def tiny_copy(artifacts_root, tmp_path) -> Path:
    """A private copy of the tiny artifact, as root folder; tests may change it freely."""
    root = tmp_path / "artifacts"
    shutil.copytree(artifacts_root / TINY, root / TINY)
    return root


@pytest.fixture(scope="session")
def variants_root(artifacts_root, tmp_path_factory, worker_id) -> Path:
    """The tiny artifact with its int8 and fp16 variants added (exporter/precision.py), once per run; int8 with the
    modules TINY_INT8_KEEP in float, so that the plain recipe passes on any host and nothing is searched."""
    from exporter.precision import VariantOptions, add_variants

    def make(root):
        shutil.copytree(artifacts_root / TINY, root / TINY)
        add_variants(root, TINY, VariantOptions(variants=("int8", "fp16"), int8_keep=tuple(TINY_INT8_KEEP.split(","))))

    return shared(tmp_path_factory, worker_id, "variants", make)


@pytest.fixture(scope="session")
def saved_tiny(artifacts_root, tmp_path_factory, worker_id) -> Path:
    """A reference of the tiny model, saved once per run: torch-cpu and ort-cpu on the bundled photo, with
    per-block taps. Tests read or damage copies of it, never it."""
    from compare.cli import main

    def make(folder):
        assert main([TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu,ort-cpu", "--no-latency", "--layers",
                     "--save-reference", str(folder / "tiny.npz")]) == 0

    return shared(tmp_path_factory, worker_id, "reference", make) / "tiny.npz"


@pytest.fixture(scope="session")
def decomposed_root(tmp_path_factory, worker_id) -> Path:
    """The tiny model exported with --decompose-layernorm through the exporter's CLI (in-process), once per run."""
    from exporter.cli import main

    def make(root):
        assert main([TINY, "--weights", "random", "--decompose-layernorm", "--artifacts", str(root)]) == 0

    return shared(tmp_path_factory, worker_id, "decomposed", make)


OUTLIER_BLOCK, OUTLIER_CHANNEL = 2, 3


@pytest.fixture(scope="session")
def outlier_weights(tmp_path_factory):
    """test_vit with one outlier channel in block 2's MLP: fc1's output channel 3 scaled 100x. fc2's input then
    has one channel 100x the others, and dynamic int8 quantizes that input per tensor, so every other channel
    loses about 7 bits: the classic outlier failure of int8 transformers (LLM.int8, ViT PTQ papers)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    fc1 = model.blocks[OUTLIER_BLOCK].mlp.fc1
    with torch.no_grad():
        fc1.weight[OUTLIER_CHANNEL].mul_(100)
        fc1.bias[OUTLIER_CHANNEL].mul_(100)
    path = tmp_path_factory.mktemp("weights") / "outlier.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def ort_only(monkeypatch) -> list[str]:
    """The flags of a run with no torch process (tests/helpers.py ORT_ONLY), its second backend registered."""
    from compare.backends import BACKENDS

    monkeypatch.setitem(BACKENDS, SecondOrtCpu.name, SecondOrtCpu)
    return list(ORT_ONLY)


# The longest tests that cannot be split (a sweep, Ray, whole exports of other models, the replays, the image runs)
# are collected first: the xdist workers then end together on short tests, instead of one of them finishing alone
# on a 45 s sweep that happened to be collected last.
LONG_FIRST = (
    "tests/zoo/test_sweep.py::test_a_sweep_records",
    "tests/zoo/test_ray.py",
    "tests/compare/test_layers.py::test_layers_",  # other models exported
    "tests/compare/test_replay.py",
    "tests/compare/test_images.py::test_an_image_set",
    "tests/compare/test_images.py::test_the_parent",
    "tests/exporter/test_every_variant.py::test_every_variant",  # five variants made, searched and compared
    "tests/exporter/test_one_judge.py::test_a_failing_int8_row",  # a replay, an advised export, a compare
)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))  # stable: the order within each part stays
