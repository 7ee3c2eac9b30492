"""torch-npu: eager on an Ascend NPU through torch_npu, imported only here (and only in a worker)."""
from __future__ import annotations

import importlib.util

from .base import BackendUnavailable
from .torch_eager import TorchEager

NOT_INSTALLED = "torch_npu is not installed; on an Ascend host: pip install torch-npu (matching torch and CANN)"
# torch_npu's fp32 shortcuts: HF32 rounds fp32 inputs of matmul and conv kernels to 11 mantissa bits.
HF32_SWITCHES = ("matmul", "conv")


def _cann_version(torch_npu) -> str | None:
    # Where the version lives moved between torch_npu releases; ask each known place.
    for read in (
        lambda: torch_npu.npu.utils.get_cann_version(module="CANN"),
        lambda: __import__("torch").version.cann,
    ):
        try:
            version = read()
        except Exception:  # noqa: BLE001 - a missing attribute or an old CANN both mean "unknown"
            continue
        if version:
            return str(version)
    return None


class TorchNpu(TorchEager):
    name = "torch-npu"
    accelerator = "ascend"
    device = "npu:0"
    precisions = ("fp16", "bf16", "fast-math")

    @classmethod
    def probe(cls):
        # Only whether it is installed: importing torch_npu here would start CANN in the parent.
        if importlib.util.find_spec("torch_npu") is None:
            raise BackendUnavailable(NOT_INSTALLED)

    def open_device(self):
        try:
            import torch
            import torch_npu  # optional: only on Ascend hosts
        except ImportError as error:
            if getattr(error, "name", None) == "torch_npu":
                raise BackendUnavailable(NOT_INSTALLED) from error
            raise BackendUnavailable(_reason(error)) from error
        except (OSError, RuntimeError) as error:
            raise BackendUnavailable(_reason(error)) from error
        try:
            if not torch.npu.is_available():
                raise BackendUnavailable("torch_npu is installed but sees no NPU; check npu-smi info and ASCEND_RT_VISIBLE_DEVICES")
            torch.npu.set_device(self.device)
        except (RuntimeError, OSError) as error:
            raise BackendUnavailable(_reason(error)) from error
        try:
            name = torch.npu.get_device_name(0)
        except (AssertionError, RuntimeError):  # some torch_npu releases assert on an unknown SoC name
            name = "unknown Ascend NPU"
        return {
            "device_name": name,
            "torch_npu": getattr(torch_npu, "__version__", "unknown"),
            "cann": _cann_version(torch_npu),
        }

    def set_precision(self, precision):
        import torch

        # torch_npu's defaults differ by release (2.14: conv HF32 on, matmul off); set both.
        if precision != "fast-math":
            for kind in HF32_SWITCHES:
                getattr(torch.npu, kind).allow_hf32 = False
        return {f"torch.npu.{kind}.allow_hf32": getattr(torch.npu, kind).allow_hf32 for kind in HF32_SWITCHES}

    def synchronize(self):
        import torch

        torch.npu.synchronize()


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "libhccl" in text or "libascend" in text or ".so" in text:
        return f"torch_npu unavailable: {text}; install CANN and source set_env.sh (e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh)"
    return f"torch_npu unavailable: {text}"
