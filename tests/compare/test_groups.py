"""Token groups: the manifest records cls, registers and patches from timm's own attributes, and the
accuracy rows and per-block drift are given per group, so a drifting register token is named."""
from __future__ import annotations

import json
import shutil

import pytest

from compare.cli import main
from compare.plan import layout
from tests.helpers import TINY, call, rewrite_weights


@pytest.mark.parametrize("model,expected", [
    ("dinov2", {"cls": 1, "registers": 4, "patches": 1369, "grid": [37, 37]}),
    ("dinov3", {"cls": 1, "registers": 4, "patches": 256, "grid": [16, 16]}),
    (TINY, {"cls": 1, "registers": 0, "patches": 100, "grid": [10, 10]}),
])
def test_the_manifest_records_the_token_layout_and_older_artifacts_derive_it(artifacts_root, model, expected):
    manifest = json.loads((artifacts_root / model / "manifest.json").read_text())
    assert manifest["token_layout"] == expected
    older = {k: v for k, v in manifest.items() if k != "token_layout"}  # exported before the layout was recorded
    assert layout(older) == expected


def test_a_perturbed_register_token_shows_its_largest_error_in_the_registers_group(artifacts_root, tmp_path, capsys):
    root = tmp_path / "artifacts"
    shutil.copytree(artifacts_root / "dinov3", root / "dinov3")

    def perturb(state):
        state["reg_token"] = state["reg_token"] * 1.2

    rewrite_weights(root / "dinov3", perturb)
    code, out, _ = call(main, capsys, "dinov3", "--artifacts", str(root), "--backends", "torch-cpu,ort-cpu",
                        "--no-latency", "--layers", "--json", str(tmp_path / "r.json"))
    [report] = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert code == 1
    groups = {r["group"]: r for r in report["accuracy"] if r["output"] == "tokens" and r["group"]}
    assert set(groups) == {"cls", "registers", "patches"}
    assert max(groups, key=lambda g: groups[g]["rel_error"]) == "registers"
    assert all({"cosine", "rel_error", "max_abs", "nonfinite"} <= set(row) for row in groups.values())
    assert "tokens[registers]" in out
    assert "first token group to drift: registers at block 0" in report["drift"]["ort-cpu"]
