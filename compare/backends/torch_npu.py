"""torch-npu: eager on an Ascend NPU through torch_npu, imported only here."""
from __future__ import annotations

from .base import BackendUnavailable
from .torch_eager import TorchEager


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
    device = "npu:0"
    follows_dtype = True

    def open_device(self):
        try:
            import torch
            import torch_npu  # optional: only on Ascend hosts
        except ImportError as error:
            if getattr(error, "name", None) == "torch_npu":
                raise BackendUnavailable("torch_npu is not installed; on an Ascend host: pip install torch-npu (matching torch and CANN)") from error
            raise BackendUnavailable(_reason(error)) from error
        except (OSError, RuntimeError) as error:
            raise BackendUnavailable(_reason(error)) from error
        try:
            if not torch.npu.is_available():
                raise BackendUnavailable("torch_npu is installed but sees no NPU; check npu-smi info and ASCEND_RT_VISIBLE_DEVICES")
            torch.npu.set_device(self.device)
            name = torch.npu.get_device_name(0)
        except (RuntimeError, OSError) as error:
            raise BackendUnavailable(_reason(error)) from error
        return {
            "device_name": name,
            "torch_npu": getattr(torch_npu, "__version__", "unknown"),
            "cann": _cann_version(torch_npu),
            # HF32 is the NPU's TF32: fp32 convolutions use it by default. Left as deployed, but recorded,
            # since it explains fp32 differences of ~1e-3 against the CPU.
            "hf32": {kind: getattr(getattr(torch.npu, kind, None), "allow_hf32", None) for kind in ("matmul", "conv")},
        }

    def synchronize(self):
        import torch

        torch.npu.synchronize()


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "libhccl" in text or "libascend" in text or ".so" in text:
        return f"torch_npu unavailable: {text}; install CANN and source set_env.sh (e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh)"
    return f"torch_npu unavailable: {text}"
