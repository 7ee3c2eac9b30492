"""Compare a model across eager CPU, eager accelerators and onnxruntime: agreement and latency. It reads
artifacts in the format of vitparity/artifact.py and never imports the exporter."""
import vitparity  # noqa: F401 - first: it keeps torch from auto-loading device backends (see vitparity/__init__.py)
