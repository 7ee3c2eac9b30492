"""Saved references: the round trip, what they carry, and every way a wrong or damaged file is refused."""
from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest

from compare import reference
from compare.cli import main
from tests.helpers import TINY, rewrite_weights, runnable

HOST = socket.gethostname()
FAST = ["--backends", "torch-cpu,ort-cpu", "--iters", "1", "--warmup", "0"]


def cli(root: Path, model: str, *args: str) -> int:
    return main([model, "--artifacts", str(root), *FAST, *args])


def test_round_trip_passes_and_shows_stored_rows_and_taps_in_json_and_table(artifacts_root, saved_tiny, tmp_path, capsys):
    capsys.readouterr()
    report_path = tmp_path / "report.json"
    code = cli(artifacts_root, TINY, "--layers", "--against", str(saved_tiny), "--json", str(report_path))
    out = capsys.readouterr().out
    assert code == 0
    [report] = json.loads(report_path.read_text())["reports"]
    stored = {f"torch-cpu@{HOST}", f"ort-cpu@{HOST}"}
    assert stored <= {row["backend"] for row in report["accuracy"] if row["passed"]}
    assert {b["name"]: b["status"] for b in report["backends"] if b["name"] in stored} == dict.fromkeys(stored, "stored")
    assert all(b["details"]["host"] == HOST for b in report["backends"] if b["name"] in stored)
    for name in stored:
        assert name in out
    # The per-block taps travelled in the file and compare on the way back.
    assert stored <= {row["backend"] for row in report["layers"] if row["passed"]}


def test_saved_file_loads_without_pickle_and_carries_input_outputs_and_metadata(saved_tiny):
    with np.load(saved_tiny, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    metadata = json.loads(str(arrays["metadata"]))
    assert arrays["batch"].dtype == np.float32
    assert any(key.startswith("taps/torch-cpu/") for key in arrays)
    assert {"outputs/torch-cpu/pooled", "outputs/torch-cpu/tokens", "outputs/ort-cpu/pooled", "outputs/ort-cpu/tokens"} <= set(arrays)
    assert (metadata["version"], metadata["model"], metadata["host"], metadata["reference"]) == (2, TINY, HOST, "torch-cpu")
    assert metadata["input"]["sha256"] and metadata["weights_sha256"] and metadata["environment"]["torch"]
    assert metadata["backends"]["torch-cpu"]["tolerance"] == "same-host"
    assert metadata["backends"]["ort-cpu"]["precision"] == "fp32"


def test_loaded_reference_keys_backends_by_host_with_their_saved_tolerance(artifacts_root, saved_tiny):
    manifest = json.loads((artifacts_root / TINY / "manifest.json").read_text())
    stored = reference.load(str(saved_tiny), manifest)
    assert set(stored.outputs) == {f"torch-cpu@{HOST}", f"ort-cpu@{HOST}"}
    assert stored.tolerance_class(f"torch-cpu@{HOST}") == "same-host"
    assert stored.tolerance_class(f"ort-cpu@{HOST}") == "same-host"
    assert stored.precision(f"torch-cpu@{HOST}") == "fp32"
    assert set(stored.taps) == {f"torch-cpu@{HOST}", f"ort-cpu@{HOST}"}
    taps = stored.taps[f"torch-cpu@{HOST}"]
    assert {"block_0", "norm"} <= set(taps) and all(name == "norm" or name.startswith("block_") for name in taps)
    assert {(s.name, s.status, s.details["host"]) for s in stored.statuses()} == {
        (f"torch-cpu@{HOST}", "stored", HOST), (f"ort-cpu@{HOST}", "stored", HOST)}
    assert stored.batch.dtype == np.float32 and list(stored.batch.shape) == stored.input["shape"]


def test_only_backends_that_ran_are_saved_under_the_file_name_exactly_as_given(artifacts_root, tmp_path):
    path = tmp_path / "npu-host.reference"
    code = main([TINY, "--artifacts", str(artifacts_root), "--backends", "ort-cpu,torch-npu", "--reference", "ort-cpu",
                 "--input", "random", "--no-latency", "--save-reference", str(path)])
    assert code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["npu-host.reference"]  # no ".npz" added
    with np.load(path, allow_pickle=False) as data:
        saved = set(json.loads(str(data["metadata"]))["backends"])
        keys = set(data.files)
    assert saved == {"ort-cpu", *runnable("torch-npu")}  # torch-npu is skipped on a host without torch_npu
    assert any("torch-npu" in key for key in keys) == bool(runnable("torch-npu"))


def test_reference_of_another_model_is_refused(dinov3_root, saved_tiny, capsys):
    capsys.readouterr()
    assert cli(dinov3_root, "dinov3", "--against", str(saved_tiny)) == 2
    err = capsys.readouterr().err
    assert f"was saved for {TINY}" in err and "not dinov3" in err and "compare the same model" in err


def test_reference_of_other_weights_is_refused(saved_tiny, tiny_copy, capsys):
    rewrite_weights(tiny_copy / TINY, lambda state: state[next(iter(state))].add_(1.0))
    capsys.readouterr()
    assert cli(tiny_copy, TINY, "--against", str(saved_tiny)) == 2
    err = capsys.readouterr().err
    assert "other weights" in err and "same artifact" in err


def test_reference_of_another_input_is_refused(artifacts_root, saved_tiny, capsys):
    capsys.readouterr()  # saved from the bundled image: a seeded batch is another input, refused before any worker
    assert cli(artifacts_root, TINY, "--no-latency", "--input", "random", "--seed", "2", "--against", str(saved_tiny)) == 2
    assert "input differs" in capsys.readouterr().err


def test_missing_reference_is_a_clear_error(artifacts_root, tmp_path, capsys):
    assert cli(artifacts_root, TINY, "--against", str(tmp_path / "nowhere.npz")) == 2
    assert "does not exist" in capsys.readouterr().err


def _npz(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "cut-by-one-byte": lambda data: data[:-1],
    "empty": lambda data: b"",
    "text": lambda data: b"not a reference\n",
    "npz-without-metadata": lambda data: _npz({"batch": np.zeros(3, np.float32)}),
    "single-npy": lambda data: _npy(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_reference_is_a_clear_error_without_traceback(artifacts_root, saved_tiny, tmp_path, capsys, damage):
    path = tmp_path / "damaged.npz"
    path.write_bytes(DAMAGE[damage](saved_tiny.read_bytes()))
    capsys.readouterr()
    assert cli(artifacts_root, TINY, "--against", str(path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "truncated or not a reference file" in err or "is not a reference file" in err
    assert len(err.strip().splitlines()) == 1


def test_reference_of_an_unsupported_format_version_is_refused(artifacts_root, saved_tiny, tmp_path, capsys):
    with np.load(saved_tiny, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    metadata = json.loads(str(arrays["metadata"]))
    arrays["metadata"] = np.array(json.dumps({**metadata, "version": 99}))
    path = tmp_path / "future.npz"
    path.write_bytes(_npz(arrays))
    capsys.readouterr()
    assert cli(artifacts_root, TINY, "--against", str(path)) == 2
    assert "format version 99" in capsys.readouterr().err
