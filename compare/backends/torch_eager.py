"""Eager PyTorch on one device: the shared code path of torch-cpu, torch-npu and torch-cuda."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import Backend, BackendUnavailable

# fast-math is fp32 weights and activations with the device's shipped fp32 shortcuts left on.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fast-math": "float32", "fp64": "float64"}


class TorchEager(Backend):
    """Runs the artifact's eager model, rebuilt from weights.safetensors, on `device`.

    Subclasses only say how to reach their device: `open_device` imports what it needs and
    returns facts about it, `set_precision` sets the device's fp32 switches and returns them as
    read back, and `synchronize` waits for queued work.
    """

    device = "cpu"
    records_replay = True  # as the reference, it records each block's inputs for the others (replay)

    def open_device(self) -> dict[str, Any]:
        return {}

    def set_precision(self, precision: str) -> dict[str, Any]:
        """Turn the device's reduced-precision fp32 shortcuts off, unless `precision` is fast-math; return them as read back."""
        return {}

    def synchronize(self) -> None:
        pass

    def load(self, artifact, precision: str) -> dict[str, Any]:
        import torch

        from vitparity.eager import TwoOutputs, rebuild_model

        facts = self.open_device()
        precision = self.effective_precision(precision)
        switches = self.set_precision(precision)
        self.dtype = getattr(torch, DTYPES[precision])
        self.module = TwoOutputs(rebuild_model(artifact)).to(device=self.device, dtype=self.dtype)
        # Where the weights really are, read back rather than assumed.
        parameter = next(self.module.parameters())
        return {
            "device": str(parameter.device),
            "dtype": str(parameter.dtype).replace("torch.", ""),
            "precision": precision,
            **({"switches": switches} if switches else {}),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            **facts,
        }

    def prepare(self, batch: np.ndarray):
        import torch

        prepared = torch.from_numpy(np.ascontiguousarray(batch)).to(device=self.device, dtype=self.dtype)
        self.synchronize()
        return prepared

    def infer(self, prepared):
        import torch

        with torch.inference_mode():
            result = self.module(prepared)
        self.synchronize()
        return result

    def resample(self, artifact, size) -> dict | None:
        """model.onnx's position-embedding resample at `size` against this model's own (vitparity/resample.py); None
        when the model has no table to resample. onnxruntime runs the graph's Resize alone, after every timing."""
        import tempfile

        from vitparity import resample

        with tempfile.TemporaryDirectory() as folder:
            return resample.check(self.module.model, artifact.path("model.onnx"), size, Path(folder))

    def layers(self, artifact, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Each block's output as the model's own forward computes it (a forward hook on every entry of
        `model.blocks`), then the final norm's, which is `tokens`. Hooks need no per-family API: prefix
        tokens, NHWC windows (SAM) and patch-only blocks (CaiT, XCiT) are tapped as they are."""
        import torch

        from vitparity.blocks import tap_names

        model = self.module.model
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)) or not len(blocks):
            raise BackendUnavailable(f"{type(model).__name__} (timm {type(model).__module__.rsplit('.', 1)[-1]}) has no `blocks` list to tap")
        taps = []

        def keep(module, args, output):
            taps.append(output[0] if isinstance(output, (tuple, list)) else output)

        hooks = [block.register_forward_hook(keep) for block in blocks]
        try:
            with torch.inference_mode():
                final = model.forward_features(self.prepare(batch))
        finally:
            for hook in hooks:
                hook.remove()
        self.synchronize()
        if len(taps) != len(blocks):
            raise RuntimeError(f"{len(blocks)} blocks but {len(taps)} block outputs in one forward pass")
        return {name: tap.float().cpu().numpy() for name, tap in zip(tap_names(len(taps)), [*taps, final])}

    def replay(self, artifact, batch: np.ndarray, folder: str, write: bool) -> dict:
        """Each block run on the reference's input to it, so that its own error is measured apart from the error
        it was given; and its parts (norm1, attn.qkv, the softmax, attn.proj, norm2, mlp.fc1, mlp.act, mlp.fc2...,
        timm's own module names) compared the same way.

        The reference (`write`) records, in `folder`, each block's inputs as its own forward calls it (positional
        and keyword arguments: the token stream and, for rotary models, the rope) and what the block and each part
        computes from them (the parts as plain arrays, block_i.parts.npz, which the onnxruntime rows read too). Every other eager backend reads them one block at a time, runs that block on those
        inputs on its own device and precision, and returns the figures: {"block_0": {"": whole block,
        "mlp.fc1": ...}, ...}. The attention runs unfused there, so that its softmax probabilities show (the
        output of attn.attn_drop, an identity in eval mode, named "attn.softmax")."""
        import torch

        from vitparity import metrics

        model = self.module.model
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)) or not len(blocks):
            raise BackendUnavailable(f"{type(model).__name__} has no `blocks` list to replay")
        folder = Path(folder)
        if write:
            inputs = []

            def keep(module, args, kwargs):
                inputs.append((args, kwargs))

            hooks = [block.register_forward_pre_hook(keep, with_kwargs=True) for block in blocks]
            try:
                with torch.inference_mode():
                    model.forward_features(self.prepare(batch))
            finally:
                for hook in hooks:
                    hook.remove()
            for index, (block, (args, kwargs)) in enumerate(zip(blocks, inputs)):
                output, parts = _run_block(block, args, kwargs)
                # The token stream in and out as plain arrays too: what the onnxruntime rows replay from.
                np.save(folder / f"block_{index}.in.npy", _to_cpu(args[0]).numpy() if args else np.zeros(0, np.float32))
                np.save(folder / f"block_{index}.out.npy", _to_cpu(output).numpy())
                np.savez(folder / f"block_{index}.parts.npz", **{name: _to_cpu(value).numpy() for name, value in parts.items()})
                torch.save({"args": _to_cpu(args), "kwargs": _to_cpu(kwargs), "output": _to_cpu(output)}, folder / f"block_{index}.pt")
            return {}
        figures = {}
        for index, block in enumerate(blocks):
            saved = torch.load(folder / f"block_{index}.pt", weights_only=True)
            output, parts = _run_block(block, self._here(saved["args"]), self._here(saved["kwargs"]))
            self.synchronize()
            found = {"": _figures(metrics, output, saved["output"])}
            with np.load(folder / f"block_{index}.parts.npz", allow_pickle=False) as recorded:
                for name in recorded.files:
                    if name in parts:
                        found[name] = _figures(metrics, parts[name], torch.from_numpy(recorded[name]))
            figures[f"block_{index}"] = found
        return figures

    def _here(self, value):
        """Saved inputs moved to this backend's device, floating point ones in its dtype."""
        import torch

        if isinstance(value, torch.Tensor):
            return value.to(device=self.device, dtype=self.dtype if value.is_floating_point() else value.dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(self._here(v) for v in value)
        if isinstance(value, dict):
            return {k: self._here(v) for k, v in value.items()}
        return value

    def to_numpy(self, result) -> dict[str, np.ndarray]:
        pooled, tokens = result
        return {"pooled": pooled.float().cpu().numpy(), "tokens": tokens.float().cpu().numpy()}


# Parts of a block that compute nothing of their own in eval mode: skipped, except the attention's dropout,
# whose input (and output) is the softmax's probabilities once the attention runs unfused.
SOFTMAX = "attn.softmax"


def _run_block(block, args, kwargs):
    """(output, {part: output}) of one block on `args`/`kwargs`, its attention unfused, every part hooked."""
    import torch

    parts, hooks = {}, []
    for name, module in block.named_modules():
        if not name or isinstance(module, torch.nn.Identity):
            continue
        if isinstance(module, torch.nn.Dropout) and not name.endswith("attn_drop"):
            continue
        label = SOFTMAX if name.endswith("attn_drop") else name

        def keep(module, inputs, output, label=label):
            found = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(found, torch.Tensor):
                parts[label] = found

        hooks.append(module.register_forward_hook(keep))
    attention = getattr(block, "attn", None)
    fused = getattr(attention, "fused_attn", None)
    try:
        if fused is not None:
            attention.fused_attn = False
        with torch.inference_mode():
            output = block(*args, **kwargs)
    finally:
        if fused is not None:
            attention.fused_attn = fused
        for hook in hooks:
            hook.remove()
    return (output[0] if isinstance(output, (tuple, list)) else output), parts


def _to_cpu(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", dtype=torch.float32 if value.is_floating_point() else value.dtype).contiguous()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _figures(metrics, got, want) -> dict:
    a, b = got.float().cpu().numpy(), want.float().cpu().numpy()
    if a.shape != b.shape:
        return {"cosine": float("nan"), "rel_error": float("nan"), "max_abs": float("nan"), "nonfinite": 0,
                "shape": list(a.shape)}
    return {"cosine": metrics.cosine(a, b), "rel_error": metrics.relative_error(a, b), "max_abs": metrics.max_abs_diff(a, b),
            "nonfinite": metrics.nonfinite_count(a)}
