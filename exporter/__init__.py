"""Export timm Vision Transformers to verified ONNX artifacts at their native resolution."""
import os

# torch auto-loads device backends such as torch_npu on import; on a host where torch_npu is
# installed but CANN is not, that makes `import torch` itself crash (libhccl.so). Backends that
# need torch_npu import it explicitly, so auto-loading is never needed here.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
