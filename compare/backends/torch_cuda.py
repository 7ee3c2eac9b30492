"""torch-cuda: eager on a CUDA GPU, the same code path as torch-npu; TF32 off unless fast-math."""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
from pathlib import Path

from .base import BackendUnavailable
from .torch_eager import TorchEager

CUDA_LIBRARIES = ("libtorch_cuda.so", "torch_cuda.dll")


class TorchCuda(TorchEager):
    name = "torch-cuda"
    accelerator = "cuda"
    device = "cuda:0"
    precisions = ("fp16", "bf16", "fast-math")

    @classmethod
    def probe(cls):
        # Without importing torch (1.2 s in the parent, which the worker pays again): a CUDA build ships
        # libtorch_cuda.so, and a Linux host with an NVIDIA device has its /dev/nvidiaN nodes. The
        # worker's open_device then asks torch itself.
        spec = importlib.util.find_spec("torch")
        folders = list(spec.submodule_search_locations or []) if spec else []
        if not any((Path(folder) / "lib" / name).exists() for folder in folders for name in CUDA_LIBRARIES):
            raise BackendUnavailable("this torch build has no CUDA support (no libtorch_cuda.so)")
        if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
            raise BackendUnavailable("no CUDA device: CUDA_VISIBLE_DEVICES hides them all")
        if sys.platform == "linux" and not glob.glob("/dev/nvidia[0-9]*") and not Path("/dev/dxg").exists():  # dxg: WSL
            raise BackendUnavailable("no CUDA device: no /dev/nvidiaN on this host")

    def open_device(self):
        import torch

        try:
            available = torch.cuda.is_available()
        except RuntimeError as error:
            raise BackendUnavailable(f"CUDA unavailable: {error}") from error
        if not available:
            raise BackendUnavailable("no CUDA device: torch.cuda.is_available() is False")
        return {"device_name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}

    def set_precision(self, precision):
        import torch

        if precision != "fast-math":
            # TF32 rounds fp32 matmul and conv inputs to 10 mantissa bits; fp32 here means fp32.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        return {
            "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        }

    def synchronize(self):
        import torch

        torch.cuda.synchronize()
