"""The coverage sweep: one subprocess per model, a failing model is a row, a rerun resumes, shards split cleanly."""
from __future__ import annotations

import json

import pytest

from exporter.sweep import main, parse_shard, parse_size, read_rows, shard


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_cover_the_list_without_overlap_or_gap(count):
    names = [f"model_{i:02d}" for i in range(20)]
    slices = [shard(names, index, count) for index in range(1, count + 1)]
    flat = [name for part in slices for name in part]
    assert sorted(flat) == names and len(flat) == len(set(flat))
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_shard_and_size_arguments_are_checked():
    assert parse_shard("2/4") == (2, 4) and parse_size("100M") == 100_000_000 and parse_size("1.5G") == 1_500_000_000
    for bad in ("0/4", "5/4", "x"):
        with pytest.raises(Exception, match="--shard"):
            parse_shard(bad)


def test_a_sweep_records_each_model_and_its_failure_and_resumes_without_redoing(tmp_path, capsys):
    names = tmp_path / "models.txt"
    names.write_text("test_vit\ntest_vit2  # gap model: norm is Identity, fc_norm after pooling\nnot_a_model\n")
    out = tmp_path / "sweep"
    assert main(["--list", str(names), "--out", str(out), "--timeout", "300"]) == 0
    rows = {row.model: row for row in read_rows(out / "results.jsonl")}
    assert set(rows) == {"test_vit", "test_vit2", "not_a_model"}
    for name in ("test_vit", "test_vit2"):
        assert rows[name].compare == "PASS" and not rows[name].error
        assert rows[name].layers.endswith("no drift: every block within same-host fp32 thresholds")
        assert rows[name].module == "vision_transformer" and rows[name].input == "160x160"
    assert rows["not_a_model"].error.startswith("export: model 'not_a_model' is not known")
    assert not list(out.glob("sweep-*")), "artifacts are deleted after each model"
    matrix = json.loads((out / "coverage.json").read_text())
    assert [row["model"] for row in matrix] == ["not_a_model", "test_vit", "test_vit2"]
    assert "| `test_vit2` | vision_transformer |" in (out / "coverage.md").read_text()
    lines = (out / "results.jsonl").read_text()
    capsys.readouterr()
    assert main(["--list", str(names), "--out", str(out)]) == 0
    assert "3 already in" in capsys.readouterr().err and (out / "results.jsonl").read_text() == lines


def test_the_readme_block_is_filled_by_the_sweep_not_by_hand(tmp_path):
    from exporter.sweep import Row, matrix_markdown, update_readme

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- coverage:start -->\nold\n<!-- coverage:end -->\noutro\n")
    update_readme(readme, matrix_markdown([Row("test_vit", "vision_transformer", 306240, "160x160", compare="PASS")], "cmd", "0.1.0"))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| `test_vit` | vision_transformer | 0.3M | 160x160 |" in text and "`cmd`" in text
