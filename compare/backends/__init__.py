"""Every backend the comparator knows, by name, in the order they are shown."""
from __future__ import annotations

from .base import Backend, BackendUnavailable
from .onnxruntime import OrtCann, OrtCpu, OrtCuda
from .torch_cpu import TorchCpu
from .torch_cuda import TorchCuda
from .torch_fp64 import TorchCpuFp64
from .torch_npu import TorchNpu

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TorchCpu, TorchNpu, TorchCuda, OrtCpu, OrtCann, OrtCuda)}
# What --truth NAME runs first: not a backend to compare, the yardstick for all of them.
TRUTHS: dict[str, type[Backend]] = {"fp64": TorchCpuFp64}



def split(name: str) -> tuple[type[Backend], str]:
    """The backend class of a row name and its variant: "ort-cpu:int8" -> (OrtCpu, "int8"), "ort-cpu" -> (OrtCpu, "").
    KeyError for a name that is not a backend."""
    base, _, variant = name.partition(":")
    return BACKENDS[base], variant


__all__ = ["BACKENDS", "TRUTHS", "Backend", "BackendUnavailable", "split"]
