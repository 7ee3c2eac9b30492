"""Eager PyTorch on one device: the shared code path of torch-cpu, torch-npu and torch-cuda."""
from __future__ import annotations

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

    def to_numpy(self, result) -> dict[str, np.ndarray]:
        pooled, tokens = result
        return {"pooled": pooled.float().cpu().numpy(), "tokens": tokens.float().cpu().numpy()}
