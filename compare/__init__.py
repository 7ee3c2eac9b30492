"""Compare a model across eager CPU, eager accelerators and onnxruntime: agreement and latency."""
import os

# See exporter/__init__.py: torch must not auto-load torch_npu, which crashes without CANN.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
