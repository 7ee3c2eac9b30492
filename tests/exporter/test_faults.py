"""Hostile input and faults for the exporter: one line, the right exit code, the old artifact kept."""
from __future__ import annotations

import pickle
import shutil
import subprocess
import time

import pytest

from exporter.cli import main
from tests.helpers import TINY, call, one_line_error
from vitparity import artifact


def _main(capsys, *args):
    return call(main, capsys, *args)


def test_a_name_that_looks_like_markup_is_printed_as_written(capsys):
    code, _, err = _main(capsys, "vit[/x]")
    assert code == 2 and "model 'vit[/x]' is not known" in one_line_error(err)


def test_weights_of_another_architecture_name_the_keys(dinov3_root, capsys, tmp_path):
    code, _, err = _main(capsys, TINY, "--weights", str(dinov3_root / "dinov3" / "weights.safetensors"),
                         "--artifacts", str(tmp_path))
    line = one_line_error(err)
    assert code == 2 and "missing keys [" in line and "unexpected keys [" in line and "more" in line


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_disguised_as_weights_is_refused_in_one_line(capsys, tmp_path):
    with open(tmp_path / "model.pth", "wb") as handle:
        pickle.dump({"blocks.0.weight": Payload()}, handle)
    code, out, err = _main(capsys, TINY, "--weights", str(tmp_path / "model.pth"), "--artifacts", str(tmp_path))
    line = one_line_error(err)
    assert code == 2 and "holds pickled Python objects" in line and "weights_only" not in line
    assert "this must never run" not in out + err


@pytest.mark.parametrize("args,message", [
    (("--opset", "99"), "--opset 99 is out of range"),
    (("--opset", "11"), "--opset 11 is out of range"),
    (("--seed", "-1"), "--seed must be at least 0"),
])
def test_bad_options_are_refused_before_any_tracing(capsys, tmp_path, args, message):
    started = time.monotonic()
    code, _, err = _main(capsys, TINY, "--artifacts", str(tmp_path), "--weights", "random", *args)
    assert code == 2 and message in one_line_error(err)
    assert time.monotonic() - started < 5


def test_if_missing_exports_random_weights_again_over_a_damaged_artifact(tiny_copy, capsys):
    model = tiny_copy / TINY / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    code, _, err = _main(capsys, TINY, "--artifacts", str(tiny_copy), "--weights", "random", "--if-missing")
    assert code == 0 and "exporting again with the same seed, the artifact there is unusable" in err and "truncated" in err
    artifact.load(tiny_copy, TINY)  # whole again


def _folder_bytes(folder) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A factory of small filesystems (tmpfs of a given size in bytes), unmounted afterwards."""
    mounted = []

    def make(size: int):
        target = tmp_path / f"small{len(mounted)}"
        target.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True).returncode:
            pytest.skip("this host does not let the tests mount a small filesystem")
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", str(target)], check=True)


def test_a_full_disk_is_an_environment_error_and_keeps_the_previous_artifact(artifacts_root, small_disk, capsys):
    size = _folder_bytes(artifacts_root / TINY)
    fresh = small_disk(size // 3)  # not even room for one artifact
    code, _, err = _main(capsys, TINY, "--artifacts", str(fresh), "--weights", "random")
    assert code == 2 and "no space left on the device" in one_line_error(err)
    assert not any(fresh.rglob("*.onnx")), "nothing half-written is left"
    full = small_disk(int(size * 1.5))  # room for the artifact once, not for a second copy while staging
    shutil.copytree(artifacts_root / TINY, full / TINY)
    before = artifact.load(full, TINY).manifest
    code, _, err = _main(capsys, TINY, "--artifacts", str(full), "--weights", "random", "--seed", "3")
    assert code == 2 and "no space left on the device" in one_line_error(err)
    assert artifact.load(full, TINY).manifest == before
