"""torch-cuda: eager on a CUDA GPU, the same code path as torch-npu; TF32 off unless fast-math."""
from __future__ import annotations

from .base import BackendUnavailable
from .torch_eager import TorchEager


class TorchCuda(TorchEager):
    name = "torch-cuda"
    device = "cuda:0"
    precisions = ("fp16", "bf16", "fast-math")

    @classmethod
    def probe(cls):
        import torch

        if not torch.backends.cuda.is_built():
            raise BackendUnavailable(f"this torch build ({torch.__version__}) has no CUDA support")
        # Counts devices without creating a CUDA context, so the parent stays free of one.
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device: torch.cuda.is_available() is False")

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
