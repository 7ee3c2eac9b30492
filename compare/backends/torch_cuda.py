"""torch-cuda: eager on a CUDA GPU, the same code path as torch-npu, with TF32 off."""
from __future__ import annotations

from .base import BackendUnavailable
from .torch_eager import TorchEager


class TorchCuda(TorchEager):
    name = "torch-cuda"
    device = "cuda:0"
    follows_dtype = True

    def open_device(self):
        import torch

        try:
            available = torch.cuda.is_available()
        except RuntimeError as error:
            raise BackendUnavailable(f"CUDA unavailable: {error}") from error
        if not available:
            raise BackendUnavailable("no CUDA device: torch.cuda.is_available() is False")
        # TF32 would round fp32 matmuls to 10 mantissa bits; fp32 here means fp32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return {"device_name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}

    def synchronize(self):
        import torch

        torch.cuda.synchronize()
