"""The backend contract: probe the host, load an artifact, prepare an input on the device, run it, read outputs back."""
from __future__ import annotations

from typing import Any

import numpy as np

# fp32 means true fp32 on every backend. fast-math keeps each vendor's shipped fp32 shortcuts
# (TF32 on CUDA, HF32 on Ascend, CANN's default precision_mode), judged by a class of its own.
PRECISIONS = ("fp32", "fp16", "bf16", "fast-math", "fp64")  # fp64: only the --truth run


# torch and timm, and the eager loader: what a torch-cpu worker imports first, and what the worker that makes a run's
# input (timm's transform of the photo, --images' decoding) imports whatever its backend. Workers that import them may be
# forked from one server that imported them already (vitparity/warm.py, compare/launch.py).
TORCH_AND_TIMM = ("torch", "timm", "vitparity.eager")


class BackendUnavailable(Exception):
    """This backend cannot run on this host; the message says why and what to do about it."""


class Backend:
    """One way of computing an artifact's outputs. Subclasses live one per file in this package.

    `tolerance` names the accuracy class the backend is judged by when it runs in true fp32
    (see compare/tolerances.py). `precisions` lists the other precision modes it follows; asked for
    any other mode, it runs in fp32. A backend knows nothing about processes: compare/worker.py
    runs each one in a child process of its own.
    """

    name: str = ""
    tolerance: str = "accelerator"
    precisions: tuple[str, ...] = ()
    accelerator = ""  # the accelerator it runs on ("ascend", "cuda": vitparity.environment.DEVICE_FILES); "" for the CPU
    runs_variants = False  # runs an artifact's reduced-precision graphs (model.int8.onnx...) as rows "<name>:<variant>"
    variant = ""
    # Modules its load() imports that start no device runtime when imported (torch, timm for eager on the CPU): a
    # worker for it may be forked from a process that imported them already (vitparity/warm.py). Empty: a fresh one.
    imports_first: tuple[str, ...] = ()

    def use_variant(self, variant: str) -> None:
        """Run the artifact's `variant` graph instead of model.onnx; this row is then named "<name>:<variant>"."""
        raise BackendUnavailable(f"{self.name} runs the eager model, not a graph; variants are rows of the onnxruntime backends")

    @classmethod
    def probe(cls) -> None:
        """Raise BackendUnavailable when this host plainly cannot run the backend.

        Called in the parent process before a worker is started, so it must be cheap and must not
        initialise a device runtime (no aclInit, no CUDA context): only a worker may do that.
        """

    @classmethod
    def effective_precision(cls, requested: str) -> str:
        """The precision mode this backend really runs when `requested` is asked for."""
        return requested if requested in cls.precisions else "fp32"

    def load(self, artifact, precision: str) -> dict[str, Any]:
        """Get ready to run `artifact` in `precision`; return facts worth reporting (device, switches read back).

        Raises BackendUnavailable when this host cannot run the backend. Any other exception means
        the backend is here but fails on this artifact, which the comparison reports as a failure.
        """
        raise NotImplementedError

    def prepare(self, batch: np.ndarray) -> Any:
        """Put a float32 NCHW batch where `infer` wants it (on the device, in the right dtype). Not timed."""
        raise NotImplementedError

    def infer(self, prepared: Any) -> Any:
        """Compute the outputs and return once they are ready (the device is synchronized). Timed."""
        raise NotImplementedError

    def to_numpy(self, result: Any) -> dict[str, np.ndarray]:
        """The outputs of `infer` as float32 numpy arrays, by output name. Not timed."""
        raise NotImplementedError

    def timed(self) -> str:
        """What the latency clock covers for this backend, in words."""
        return "the forward call only; the input is on the device before the clock starts, outputs stay there"

    def observed(self) -> dict[str, Any]:
        """Facts only a run can show (e.g. where each node ran), read after the first `run`."""
        return {}

    def layers(self, artifact, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Each block's output tokens and the final norm (vitparity.blocks.tap_names), as float32 numpy."""
        raise BackendUnavailable(f"{self.name} cannot report per-block outputs")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.to_numpy(self.infer(self.prepare(batch)))
