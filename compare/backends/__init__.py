"""Every backend the comparator knows, by name, in the order they are shown."""
from __future__ import annotations

from .base import Backend, BackendUnavailable
from .onnxruntime import OrtCann, OrtCpu, OrtCuda
from .torch_cpu import TorchCpu
from .torch_cuda import TorchCuda
from .torch_npu import TorchNpu

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TorchCpu, TorchNpu, TorchCuda, OrtCpu, OrtCann, OrtCuda)}

__all__ = ["BACKENDS", "Backend", "BackendUnavailable"]
