"""torch-cpu-fp64: eager float64 on the CPU, the truth that --truth fp64 measures every backend against.

fp32 on the CPU is itself rounded. Against a float64 run of the same weights, each backend's error
can be put next to the fp32 CPU reference's own: "torch-npu 3.2x torch-cpu" says how much worse the
device is than the CPU, which is the question the reference comparison alone cannot answer.
"""
from __future__ import annotations

import numpy as np

from .torch_cpu import TorchCpu


class TorchCpuFp64(TorchCpu):
    name = "torch-cpu-fp64"
    precisions = ("fp64",)

    def to_numpy(self, result) -> dict[str, np.ndarray]:
        pooled, tokens = result  # kept in float64: rounding the truth to fp32 would hide the CPU's own error
        return {"pooled": pooled.double().cpu().numpy(), "tokens": tokens.double().cpu().numpy()}
