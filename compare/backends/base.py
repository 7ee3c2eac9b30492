"""The backend contract: load an artifact, prepare an input on the device, run it, read outputs back."""
from __future__ import annotations

from typing import Any

import numpy as np


class BackendUnavailable(Exception):
    """This backend cannot run on this host; the message says why and what to do about it."""


class Backend:
    """One way of computing an artifact's outputs. Subclasses live one per file in this package.

    `tolerance` names the accuracy class the backend is judged by when it runs in fp32
    (see compare/tolerances.py); `follows_dtype` says whether --dtype applies to it.
    """

    name: str = ""
    tolerance: str = "accelerator"
    follows_dtype: bool = False

    def load(self, artifact, dtype: str) -> dict[str, Any]:
        """Get ready to run `artifact` in `dtype`; return facts worth reporting (device, options).

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

    def layers(self, artifact, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Each block's output tokens and the final norm (exporter.blocks.tap_names), as float32 numpy."""
        raise BackendUnavailable(f"{self.name} cannot report per-block outputs")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.to_numpy(self.infer(self.prepare(batch)))
