"""Weights come from real files: safetensors, .bin, a Hugging Face cache layout, or a seeded random init."""
from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter import weights
from exporter.export import ExportOptions, build_model, export
from tests.helpers import TINY
from vitparity import registry
from vitparity.errors import UserError

REPO = "timm/test_vit.r160_in1k"


def _reference_state(seed: int = 5) -> dict:
    model, _ = build_model(registry.resolve(TINY), "random", seed)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def _assert_loaded(model, state):
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def _hf_cache(root, state, filename="model.safetensors"):
    """The layout huggingface_hub writes for timm/<model>: blobs, snapshots/<rev>/file, refs/main."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    if filename.endswith(".safetensors"):
        save_file(state, str(snapshot / filename))
    else:
        torch.save(state, snapshot / filename)
    return root


def test_weights_load_from_a_safetensors_file_and_are_exported_exactly(tmp_path):
    state = _reference_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    result = export(TINY, tmp_path / "art", ExportOptions(weights=str(tmp_path / "w.safetensors")))
    assert result.weights_source == f"file {tmp_path / 'w.safetensors'}"
    exported = load_file(str(tmp_path / "art" / TINY / "weights.safetensors"))
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)


def test_weights_load_from_a_hub_download_folder(tmp_path):
    state = _reference_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    model = registry.create(registry.resolve(TINY))
    assert weights.load_weights(model, str(tmp_path)) == f"file {tmp_path / 'model.safetensors'}"
    _assert_loaded(model, state)


def test_bin_weights_load_with_weights_only(tmp_path):
    state = _reference_state()
    torch.save({"state_dict": state}, tmp_path / "pytorch_model.bin")
    model = registry.create(registry.resolve(TINY))
    weights.load_weights(model, str(tmp_path / "pytorch_model.bin"))
    _assert_loaded(model, state)


class Payload:
    """An arbitrary object: a pickle that carries one could run code when loaded."""


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"state_dict": _reference_state(), "extra": Payload()}, tmp_path / "evil.pth")
    model = registry.create(registry.resolve(TINY))
    with pytest.raises(UserError, match="holds pickled Python objects"):
        weights.load_weights(model, str(tmp_path / "evil.pth"))


def test_weights_that_do_not_fit_name_missing_and_unexpected_keys(tmp_path):
    state = _reference_state()
    state["blocks.99.extra"] = state.pop("blocks.0.attn.qkv.weight")
    save_file(state, str(tmp_path / "bad.safetensors"))
    model = registry.create(registry.resolve(TINY))
    with pytest.raises(UserError, match=r"missing keys \[blocks.0.attn.qkv.weight\]; unexpected keys \[blocks.99.extra\]"):
        weights.load_weights(model, str(tmp_path / "bad.safetensors"))


def test_a_missing_weights_path_is_a_clear_error(tmp_path):
    model = registry.create(registry.resolve(TINY))
    with pytest.raises(UserError, match="does not exist"):
        weights.load_weights(model, str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_auto_finds_weights_in_the_hf_cache_offline(tmp_path, monkeypatch, variable):
    state = _reference_state()
    cache = _hf_cache(tmp_path / "hub", state)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(cache if variable == "HF_HUB_CACHE" else tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = registry.create(registry.resolve(TINY))
    assert weights.load_weights(model, "auto") == f"hf-cache {REPO}"
    _assert_loaded(model, state)


def test_auto_falls_back_to_random_init_quickly_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    model = registry.create(registry.resolve(TINY))
    started = time.monotonic()
    source = weights.load_weights(model, "auto", seed=4)
    # random, and why: recorded in the manifest and said in compare's verdict line
    assert source.startswith("random-init (seed 4; --weights auto fell back: ") and weights.is_random(source), source
    assert "http://127.0.0.1:9 gave no weights" in source or "names no hub repository" in source, source
    # huggingface_hub alone would retry for about a minute; the probe decides in seconds.
    assert time.monotonic() - started < 10


def test_random_init_is_seeded():
    a, b, c = _reference_state(1), _reference_state(1), _reference_state(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _pooled(model, x):
    with torch.inference_mode():
        return model(x)


def _block_sensitivity(model, block: int, x, base=None) -> float:
    """Relative change of the pooled output when 5% noise is added to one block's fc1 weight (`base`: the pooled
    output without it, when already known)."""
    base = _pooled(model, x) if base is None else base
    fc1 = model.blocks[block].mlp.fc1.weight
    saved = fc1.detach().clone()
    with torch.no_grad():
        fc1.add_(0.05 * fc1.std() * torch.randn(fc1.shape, generator=torch.Generator().manual_seed(block)))
    moved = _pooled(model, x)
    with torch.no_grad():
        fc1.copy_(saved)
    return float((moved - base).norm() / base.norm())


def test_random_init_makes_every_block_of_dinov3_matter():
    model, _ = build_model(registry.resolve("dinov3"), "random", 0)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    base = _pooled(model, x)
    changes = [_block_sensitivity(model, block, x, base) for block in range(len(model.blocks))]
    assert min(changes) > 1e-3, changes


def test_timm_default_init_would_hide_a_broken_block():
    # Why trained_like_init exists: with timm's LayerScale gammas of 1e-5 a block barely matters.
    torch.manual_seed(0)
    model = registry.create(registry.resolve("dinov3"))
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    assert _block_sensitivity(model, 5, x) < 1e-4
