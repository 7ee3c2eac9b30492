"""torch-cpu: eager fp32 on the CPU, the default reference."""
from __future__ import annotations

import platform

from .torch_eager import TorchEager


class TorchCpu(TorchEager):
    name = "torch-cpu"
    device = "cpu"
    tolerance = "same-host"  # judged strictly when another backend is the reference

    def open_device(self):
        return {"device_name": platform.processor() or platform.machine()}
