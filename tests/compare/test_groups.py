"""Token groups: the manifest records cls, registers and patches from timm's own attributes. The accuracy rows and
per-block drift given per group, so that a drifting register token is named: test_replay's dinov3 run."""
from __future__ import annotations

import json

import pytest

from compare.plan import layout
from tests.helpers import TINY


@pytest.mark.parametrize("model,expected", [
    ("dinov2", {"cls": 1, "registers": 4, "patches": 1369, "grid": [37, 37]}),
    ("dinov3", {"cls": 1, "registers": 4, "patches": 256, "grid": [16, 16]}),
    (TINY, {"cls": 1, "registers": 0, "patches": 100, "grid": [10, 10]}),
])
def test_the_manifest_records_the_token_layout_and_older_artifacts_derive_it(request, model, expected):
    root = request.getfixturevalue(f"{model}_root" if model in ("dinov2", "dinov3") else "artifacts_root")
    manifest = json.loads((root / model / "manifest.json").read_text())
    assert manifest["token_layout"] == expected
    older = {k: v for k, v in manifest.items() if k != "token_layout"}  # exported before the layout was recorded
    assert layout(older) == expected
