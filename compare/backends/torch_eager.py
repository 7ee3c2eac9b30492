"""Eager PyTorch on one device: the shared code path of torch-cpu, torch-npu and torch-cuda."""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import Backend

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TorchEager(Backend):
    """Runs the artifact's eager model, rebuilt from weights.safetensors, on `device`.

    Subclasses only say how to reach their device: `open_device` imports what it needs and
    returns facts about it, and `synchronize` waits for queued work.
    """

    device = "cpu"

    def open_device(self) -> dict[str, Any]:
        return {}

    def synchronize(self) -> None:
        pass

    def load(self, artifact, dtype: str) -> dict[str, Any]:
        import torch

        from exporter.export import TwoOutputs, rebuild_model

        facts = self.open_device()
        self.dtype = getattr(torch, DTYPES[dtype if self.follows_dtype else "fp32"])
        self.module = TwoOutputs(rebuild_model(artifact)).to(device=self.device, dtype=self.dtype)
        return {
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
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
        import torch

        from exporter.blocks import tap_names

        model = self.module.model
        prefix = bool(getattr(model, "num_prefix_tokens", 0))
        with torch.inference_mode():
            # forward_intermediates splits off the prefix tokens (cls, registers); glue them back
            # so each tap is the block's whole output, as in the ONNX graph.
            final, taps = model.forward_intermediates(
                self.prepare(batch), indices=len(model.blocks), return_prefix_tokens=prefix, norm=False, output_fmt="NLC"
            )
            taps = [torch.cat([tap[1], tap[0]], dim=1) if prefix else tap for tap in taps] + [final]
        self.synchronize()
        return {name: tap.float().cpu().numpy() for name, tap in zip(tap_names(len(taps) - 1), taps)}

    def to_numpy(self, result) -> dict[str, np.ndarray]:
        pooled, tokens = result
        return {"pooled": pooled.float().cpu().numpy(), "tokens": tokens.float().cpu().numpy()}
