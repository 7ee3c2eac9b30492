"""The exporter: trace timm Vision Transformers to verified ONNX artifacts at their native resolution, and
derive their reduced-precision graphs. It writes artifacts in the format of vitparity/artifact.py."""
import vitparity  # noqa: F401 - first: it keeps torch from auto-loading device backends (see vitparity/__init__.py)
