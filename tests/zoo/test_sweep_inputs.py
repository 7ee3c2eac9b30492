"""The sweep's inputs are data: bad flags, files and resume rows are one line before any model runs, a
cut JSONL line loses nothing, list lines are model names (never options), and an address with no Ray
cluster answers in seconds."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from tests.helpers import ROOT, call, one_line_error
from vitparity.errors import UserError
from zoo.step import UNKNOWN, Row, Settings, run_local
from zoo.store import append_row, read_rows
from zoo.sweep import main, parse, select


def test_a_row_after_a_line_cut_short_starts_on_a_fresh_line(tmp_path):
    jsonl = tmp_path / "results.jsonl"
    first = Row("a", "m", 1, "224x224", compare="PASS", seconds=1.0)
    append_row(jsonl, first)
    jsonl.write_bytes(jsonl.read_bytes() + b'{"model": "b", "modu')  # a crash mid-write
    second = Row("c", "m", 1, "224x224", compare="FAIL", seconds=2.0)
    append_row(jsonl, second)
    assert read_rows(jsonl) == [first, second]


@pytest.mark.parametrize("bad", [{"params": "many"}, {"seconds": "x"}, {"unknown": 1}, {"params": True}])
def test_resume_rows_of_the_wrong_shape_are_ignored_not_crashed_on(tmp_path, bad):
    jsonl = tmp_path / "results.jsonl"
    good = Row("a", "m", 1, "224x224", compare="PASS", seconds=1.0)
    jsonl.write_text(json.dumps({**asdict(good), "model": "b", **bad}) + "\n" + json.dumps(asdict(good)) + "\n")
    assert read_rows(jsonl) == [good]


@pytest.mark.parametrize("args,message", [
    (["--max-params", "inf"], "--max-params 'INF' is not a size"),
    (["--max-params", "1e400"], "--max-params '1E400' is not a size"),
    (["--memory", "inf"], "--memory 'INF' is not a size"),
    (["--memory=-1G"], "--memory '-1G' is not a size"),
    (["--timeout", "-5"], "--timeout must be a finite number"),
    (["--timeout", "nan"], "--timeout must be a finite number"),
    (["--ray", ""], "--ray '' names no cluster"),
])
def test_bad_sweep_flags_are_one_line_before_any_model(capsys, tmp_path, args, message):
    code, _, err = call(main, capsys, "test_vit", "--out", str(tmp_path / "o"), *args)
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_an_explicit_shard_wins_over_broken_slurm_variables(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "abc")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert parse(["test_vit", "--shard", "1/1"]).shard == "1/1"
    with pytest.raises(UserError, match="are not numbers"):
        parse(["test_vit"])


def test_a_list_or_readme_that_is_not_utf8_is_one_line(capsys, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"test_vit\n\xff\xfe bad\n")
    code, _, err = call(main, capsys, "--list", str(listing), "--out", str(tmp_path / "o"))
    assert code == 2 and "is not UTF-8 text" in one_line_error(err)
    readme = tmp_path / "README.md"
    readme.write_bytes(b"\xff\xfe")
    code, _, err = call(main, capsys, "test_vit", "--readme", str(readme), "--out", str(tmp_path / "o"))
    assert code == 2 and "--readme" in one_line_error(err)


def test_an_output_folder_that_cannot_be_written_is_found_before_any_model(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    started = time.monotonic()
    code, _, err = call(main, capsys, "test_vit", "--out", str(blocker / "sweep"))
    assert code == 2 and "cannot be written" in one_line_error(err)
    assert time.monotonic() - started < 30  # no model was exported


def test_list_lines_are_model_names_never_options(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("-v\nnot_a_timm_model_at_all\n")
    chosen, _ = select([], str(listing), None)
    assert sorted(chosen) == [("-v", UNKNOWN, 0, "?"), ("not_a_timm_model_at_all", UNKNOWN, 0, "?")]
    settings = Settings(folder=tmp_path, keep=False, timeout=60, memory=None)
    started = time.monotonic()
    rows = [run_local(entry, settings) for entry in chosen]
    assert all("is not a timm model" in row.error and row.compare == "-" for row in rows)
    assert time.monotonic() - started < 5, "no exporter process was started for them"


def test_a_ray_address_with_nothing_there_answers_in_seconds(tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "zoo", "test_vit", "--ray", "127.0.0.1:1", "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no Ray cluster answers there" in one_line_error(done.stderr)
    assert time.monotonic() - started < 30
