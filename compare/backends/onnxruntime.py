"""ort-cpu, ort-cann, ort-cuda: the ONNX artifact on onnxruntime with one execution provider each."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .base import Backend, BackendUnavailable


class OnnxRuntime(Backend):
    """Runs model.onnx with `provider`; the session options are set on purpose and reported."""

    provider = "CPUExecutionProvider"
    install_hint = ""

    def load(self, artifact, dtype: str) -> dict[str, Any]:
        import onnxruntime as ort

        from exporter.export import ort_session

        available = ort.get_available_providers()
        if self.provider not in available:
            raise BackendUnavailable(
                f"{self.provider} is not in onnxruntime.get_available_providers() ({', '.join(available)}); {self.install_hint}"
            )
        self.threads = threads = os.cpu_count() or 1
        # A model this onnxruntime cannot open is a finding about the artifact, not a missing
        # backend: the error propagates and the comparison reports it as a failure.
        self.session = ort_session(artifact.path("model.onnx"), providers=(self.provider,), threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        return {
            "device": self.provider,
            "dtype": "float32 (ONNX graph)",
            "onnxruntime": ort.__version__,
            "providers": self.session.get_providers(),
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "intra_op_num_threads": threads,
        }

    def prepare(self, batch: np.ndarray):
        return np.ascontiguousarray(batch, dtype=np.float32)

    def infer(self, prepared):
        return self.session.run(self.output_names, {self.input_name: prepared})

    def layers(self, artifact, batch: np.ndarray) -> dict[str, np.ndarray]:
        from exporter import blocks
        from exporter.export import ort_session

        session = ort_session(blocks.ensure(artifact), providers=(self.provider,), threads=self.threads)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {self.input_name: self.prepare(batch)})))
        names = blocks.tap_names(sum(name.startswith("block_") for name in got))
        # The final norm's output is the graph's `tokens` output.
        return {name: np.asarray(got["tokens" if name == "norm" else name], dtype=np.float32) for name in names}

    def to_numpy(self, result) -> dict[str, np.ndarray]:
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self.output_names, result)}


class OrtCpu(OnnxRuntime):
    name = "ort-cpu"
    provider = "CPUExecutionProvider"
    tolerance = "same-host"


class OrtCann(OnnxRuntime):
    name = "ort-cann"
    provider = "CANNExecutionProvider"
    install_hint = "on an Ascend host install an onnxruntime build with the CANN execution provider"


class OrtCuda(OnnxRuntime):
    name = "ort-cuda"
    provider = "CUDAExecutionProvider"
    install_hint = "install onnxruntime-gpu on a host with CUDA"
