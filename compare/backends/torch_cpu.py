"""torch-cpu: eager fp32 on the CPU, the default reference."""
from __future__ import annotations

import platform
from pathlib import Path

from .base import TORCH_AND_TIMM
from .torch_eager import TorchEager


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class TorchCpu(TorchEager):
    name = "torch-cpu"
    device = "cpu"
    tolerance = "same-host"  # judged strictly when another backend is the reference
    imports_first = TORCH_AND_TIMM  # nearly all of a fresh worker's 6-7 s of CPU

    def open_device(self):
        return {"device_name": cpu_name()}
