"""The coverage sweep: one subprocess per model, a failing model is a row, a rerun resumes, shards split cleanly."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.helpers import ROOT, call, children, gone, one_line_error, wait_for
from vitparity.errors import UserError
from zoo.step import _last_error, _report_of
from zoo.store import read_rows
from zoo.sweep import main, parse, parse_shard, parse_size, shard, slurm_shard


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


def test_a_slurm_array_task_takes_its_own_slice_with_no_arguments(monkeypatch):
    assert slurm_shard({}) is None
    assert slurm_shard({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}) == "1/4"
    assert slurm_shard({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}) == "4/4"
    with pytest.raises(UserError, match="outside the array of 4"):
        slurm_shard({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4"})
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.delenv("SLURM_ARRAY_TASK_MIN", raising=False)
    args = parse(["test_vit"])
    assert (args.shard, args.out) == ("2/4", "sweep/shard-2-of-4")
    assert parse(["test_vit", "--shard", "1/2", "--out", "o"]).shard == "1/2"  # given flags win


def test_a_sweep_records_each_model_and_its_failure_and_resumes_without_redoing(tmp_path, capsys, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    names = tmp_path / "models.txt"
    names.write_text("test_vit2  # timm's tiny ViT with avg pooling: the final norm is Identity\nnot_a_model\n")
    out = tmp_path / "sweep"
    assert main(["--list", str(names), "--out", str(out), "--timeout", "300"]) == 1  # one model failed
    rows = {row.model: row for row in read_rows(out / "results.jsonl")}
    assert set(rows) == {"test_vit2", "not_a_model"}
    assert rows["test_vit2"].compare == "PASS" and not rows["test_vit2"].error
    assert rows["test_vit2"].layers.endswith("no drift: every block within same-host fp32 thresholds")
    assert rows["test_vit2"].module == "vision_transformer" and rows["test_vit2"].input == "160x160"
    assert rows["test_vit2"].sizes == "fixed 160x160"  # the graph takes its native size (the sweep ran no --dynamic-size)
    assert rows["test_vit2"].attention.startswith("fused")  # the per-block taps of a gap model (test_layers: relpos, EVA, XCiT)
    assert rows["not_a_model"].error == "sweep: not_a_model is not a timm model (timm.is_model); check the list file"
    log = capsys.readouterr().err
    assert "not_a_model: sweep: not_a_model is not a timm model" in log and "test_vit2: PASS, layers ort-cpu: no drift" in log
    assert not list(scratch.glob("vit-parity-sweep-*")) and not list(out.glob("*sweep*")), "artifacts are deleted after each model"
    matrix = json.loads((out / "coverage.json").read_text())
    assert [row["model"] for row in matrix] == ["not_a_model", "test_vit2"]
    assert "| test_vit2 | vision_transformer |" in (out / "coverage.md").read_text()
    lines = (out / "results.jsonl").read_text()
    assert main(["--list", str(names), "--out", str(out)]) == 1
    assert "2 already in" in capsys.readouterr().err and (out / "results.jsonl").read_text() == lines
    if importlib.util.find_spec("ray") is not None:  # the same models as Ray tasks: the same rows (tests/zoo/test_ray.py)
        from tests.zoo.test_ray import ray_sweep

        # And test_vit, whose task is killed twice (the task, then Ray's one retry of it): an error row, the others
        # untouched. One Ray for both: starting one costs seconds.
        (tmp_path / "ray-models.txt").write_text(names.read_text() + "test_vit\n")
        found = ray_sweep(tmp_path / "ray-models.txt", tmp_path / "ray", kill="test_vit")
        assert found.pop("test_vit").error == "sweep: the Ray task was lost (WorkerCrashedError) and its retry too"
        assert {model: _findings(row) for model, row in found.items()} == {model: _findings(row) for model, row in rows.items()}


def _findings(row) -> dict:
    """A row without what differs between two runs of the same model: timings, the host, and the verify cosine's
    last digits (a Ray task runs with the threads its CPUs allow, and a sum in another order rounds otherwise:
    0.9999999999998246 on Ray, ...239 here, for test_vit2)."""
    found = {k: v for k, v in asdict(row).items() if k not in ("seconds", "export_s", "node")}
    return {**found, "verify_cosine": None if row.verify_cosine is None else round(row.verify_cosine, 9)}


def test_the_readme_block_is_filled_by_the_sweep_not_by_hand(tmp_path):
    from zoo.render import summary_markdown, update_readme
    from zoo.step import Row

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- coverage:start -->\nold\n<!-- coverage:end -->\noutro\n")
    rows = [Row("test_vit", "vision_transformer", 306240, "160x160", compare="PASS", layers="ort-cpu: no drift", seconds=4.0),
            Row("test_vit2", "vision_transformer", 400000, "224x224", compare="PASS", layers="skipped: no taps", seconds=4.0),
            Row("samvit_x", "vision_transformer_sam", 90e6, "1024x1024", error="export: out of memory", seconds=9.0),
            Row("later", "eva", 1e6, "224x224")]
    update_readme(readme, summary_markdown(rows, "cmd", "0.1.0", "docs/coverage.md", [("big", "eva", 3e8, "224x224")], "100M"))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text and "`cmd`" in text
    assert "| vision_transformer | 2 | 0.3M to 0.4M | 160x160, 224x224 | 2 | 1 | 1 | 0 |" in text
    assert "| vision_transformer_sam | 1 | 90.0M | 1024x1024 | 0 | 0 | 0 | 1 |" in text
    assert "- `samvit_x` (90M, 1024x1024): export: out of memory" in text and "- `test_vit2` (0M, 224x224): skipped: no taps" in text
    assert "Not run yet: 1 (the sweep" in text and "1 architectures over 100M" in text and "(docs/coverage.md)" in text


def test_a_step_stopped_by_the_memory_ceiling_is_named_out_of_memory():
    # onnxruntime's words when samvit_base_patch16 (1024x1024) hit the 16G ceiling in the sweep.
    arena = ("error: onnxruntime cannot run the graph at batch 3: [ONNXRuntimeError] : 1 : FAIL : Non-zero status code "
             "returned while running FusedMatMul node. Status Message: bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal "
             "Failed to allocate memory for requested buffer of size 2415919104")
    assert _last_error(2, arena, "export", 900).startswith("export: out of memory under the ceiling (--memory)")
    assert _last_error(1, "Traceback\nMemoryError\n", "compare", 900).startswith("compare: out of memory")
    assert _last_error(-signal.SIGKILL, "", "export", 900) == "export: killed by SIGKILL (memory ceiling?)"
    assert _last_error("timeout", "", "export", 900) == "export: no answer in 900 s"
    assert _last_error(2, "error: model 'x' is not known\n", "export", 900) == "export: model 'x' is not known"


def test_the_parameter_limit_is_for_patterns_and_modules_and_a_listed_model_always_runs(tmp_path):
    from zoo.sweep import select

    listed = tmp_path / "big.txt"
    listed.write_text("vit_base_patch16_224  # 86M, over the limit below\n")
    chosen, over = select(["vit_base_patch32_224"], str(listed), 10_000_000)
    assert [entry[0] for entry in chosen] == ["vit_base_patch16_224"]
    assert [entry[0] for entry in over] == ["vit_base_patch32_224"] and over[0][1:] == ("vision_transformer", 87455232, "224x224")


def test_patterns_that_match_nothing_are_a_usage_error(tmp_path, capsys):
    code, _, err = call(main, capsys, "no_such_vit_*", "--out", str(tmp_path / "sweep"))
    assert code == 2 and "no timm model matches no_such_vit_*" in one_line_error(err)


def test_a_report_is_used_only_if_it_names_the_model(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"reports": [{"model": "test_vit", "timm_name": "test_vit", "verdict": "PASS"}]}))
    assert _report_of(path, "test_vit")["verdict"] == "PASS"
    assert _report_of(path, "vit_small_patch16_224") is None  # another model's report is never taken
    path.write_text('{"reports": [')  # cut short
    assert _report_of(path, "test_vit") is None and _report_of(tmp_path / "missing.json", "test_vit") is None


def test_ctrl_c_stops_the_sweep_and_its_steps_and_the_model_in_flight_is_not_recorded(tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    # SIGINT back to its default first: a shell's background job (make test &) starts with it ignored,
    # and a program started so rightly keeps ignoring it.
    sweep = subprocess.Popen([sys.executable, "-m", "zoo", "test_vit", "--out", str(out), "--timeout", "300"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    step = wait_for(lambda: children(sweep.pid), 120)  # the export step is running
    assert step, sweep.communicate()
    sweep.send_signal(signal.SIGINT)
    _, err = sweep.communicate(timeout=30)
    assert sweep.returncode == 130, err
    assert "the model in flight was not recorded" in err and "Traceback" not in err
    assert all(gone(pid, 10) for pid in step), "a sweep step outlived the sweep"
    assert read_rows(out / "results.jsonl") == []  # a resume runs test_vit again
    assert not list(Path(tmp_path).glob("vit-parity-sweep-*"))


def test_the_sizes_cell_says_whether_a_graph_takes_every_size_and_which_were_verified():
    from zoo.step import _sizes

    config = {"data_config": {"input_size": [3, 224, 224]}}
    assert _sizes(config) == "fixed 224x224"  # a manifest from before sizes were recorded
    assert _sizes({**config, "sizes": {"dynamic": True, "patch": [14, 14], "native": [518, 518],
                                       "verified": [[518, 518], [252, 252], [518, 392]]}}) == \
        "dynamic (x14): 518x518, 252x252, 518x392"
    assert _sizes({**config, "sizes": {"dynamic": False, "native": [224, 224], "verified": [[224, 224]],
                                       "why": "timm's xcit has no dynamic_img_size option"}}) == \
        "fixed 224x224: timm's xcit has no dynamic_img_size option"
