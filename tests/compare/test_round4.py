"""Hostile round 4, the comparator's side: a reference saved with --replay is used like any other; several models
in one run each get their result written, whatever happens to one; errors say what happened."""
from __future__ import annotations

import errno
import json
import shutil
import tempfile

from compare.cli import main
from tests.helpers import TINY, call, one_line_error
from vitparity.cli import console, guarded, os_error_line


def test_a_reference_saved_with_replay_loads_and_compares_like_any_other(artifacts_root, capsys, tmp_path):
    saved = tmp_path / "r.npz"
    code, _, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu,ort-cpu", "--replay",
                        "--no-latency", "--save-reference", str(saved))
    assert code == 0, err
    code, out, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--backends", "torch-cpu", "--no-latency",
                          "--against", str(saved), "--json", str(tmp_path / "back.json"))
    assert code == 0, out + err
    report = json.loads((tmp_path / "back.json").read_text())["reports"][0]
    assert report["verdict"] == "PASS" and any("@" in r["backend"] for r in report["accuracy"])


def test_several_models_write_every_result_though_one_cannot_be_compared(artifacts_root, capsys, tmp_path, ort_only):
    """test_vit compares; dinov2 has no artifact under this root. Both are in the JSON and the report, the missing
    one said in one line, and the exit code is the worst: 2 here (1, a FAIL, would outrank it)."""
    root = tmp_path / "artifacts"
    shutil.copytree(artifacts_root / TINY, root / TINY)  # the root holds test_vit only
    code, _, err = call(main, capsys, TINY, "dinov2", "--artifacts", str(root), *ort_only, "--no-latency",
                        "--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "r.md"))
    results = json.loads((tmp_path / "r.json").read_text())
    assert code == 2 == results["exit_code"]
    assert [r["model"] for r in results["reports"]] == [TINY] and results["reports"][0]["verdict"] == "PASS"
    assert [e["model"] for e in results["errors"]] == ["dinov2"] and "no artifact for dinov2" in results["errors"][0]["error"]
    assert "dinov2" in (tmp_path / "r.md").read_text() and "error: no artifact for dinov2" in err


def test_a_full_disk_names_its_folder_and_a_vanished_temp_folder_is_ours(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.json"))
    assert f"no space left on the device that holds {tmp_path / 'out.json'}" in os_error_line(full)
    gone = FileNotFoundError(errno.ENOENT, "No such file or directory",
                             f"{tempfile.gettempdir()}/vit-parity-worker-1-x/worker.log")
    line = os_error_line(gone)
    assert line.startswith("internal error:") and "check the path" not in line
    assert os_error_line(PermissionError(errno.EACCES, "Permission denied", "/etc/x")).endswith("check the path and the free space")


def test_a_package_that_cannot_be_imported_is_one_line(capsys):
    def body():
        raise SystemError("initialization of _ml_dtypes_ext raised unreported exception")

    assert guarded(body, console(stderr=True)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "a package cannot be imported: SystemError" in line and "make host-deps" in line


def test_compare_if_missing_exports_a_missing_artifact_in_a_process_of_its_own_and_nothing_when_present(
        artifacts_root, tmp_path, capsys, ort_only):
    """make compare is one process: compare --if-missing starts the exporter only for an artifact that is not there."""
    from vitparity import artifact

    code, _, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--if-missing", "--weights", "random", *ort_only,
                        "--no-latency")
    assert code == 0 and "exporting what is missing: test_vit" in err, err
    assert artifact.load(tmp_path, TINY).manifest["weights_source"] == "random-init (seed 0)"
    code, _, err = call(main, capsys, TINY, "--artifacts", str(artifacts_root), "--if-missing", *ort_only, "--no-latency")
    assert code == 0 and "exporting" not in err
    code, _, err = call(main, capsys, TINY, "--artifacts", str(tmp_path), "--weights", "random", "--no-latency")
    assert code == 2 and "--weights is for the export --if-missing may run" in one_line_error(err)
