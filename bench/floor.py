"""The one-process floor of `make compare`: the same work with no worker processes and no CLI.

It verifies the artifact's hashes, preprocesses the bundled photo with timm's eval transform, runs
eager torch-cpu, onnxruntime ort-cpu (the profiled first run included) and ort-cpu on each variant
graph the artifact has, compares their outputs by the same classes, and times each for the same
budget, one after the other. `python -m bench floor`
runs it against `make compare` in pairs (A B A B) and prints the ratio of their wall times.

Run as a script it does the work once: python bench/floor.py MODEL ARTIFACTS
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def floor(model: str, artifacts: str, budget_s: float = 3.0) -> dict:
    """Do the work of `make compare MODEL=model` (on this CPU-only host) in this process; return its verdict and timings."""
    from compare import inputs, latency
    from compare.backends.onnxruntime import OrtCpu
    from compare.backends.torch_cpu import TorchCpu
    from compare.judge import compare_outputs
    from vitparity import artifact, registry
    from vitparity.graphs import precision_variants
    from vitparity.tolerances import tolerance_for

    art = artifact.load(artifacts, registry.resolve(model).key)  # every hash checked
    batch, _ = inputs.make_input("image", None, art.manifest["data_config"], 1, 0)
    backends = [TorchCpu(), OrtCpu()]
    for variant in precision_variants(art.manifest):
        backends.append(OrtCpu())
        backends[-1].use_variant(variant)
    outputs, timings, passed = {}, {}, True
    for backend in backends:  # one runtime at a time: each is done before the next starts
        facts = backend.load(art, "fp32")
        outputs[backend.name] = backend.run(batch)
        timings[backend.name] = latency.measure(backend, batch, 10, None, budget_s).mean_ms
        if backend.name != "torch-cpu":
            tolerance = tolerance_for(facts.get("variant_class") or backend.tolerance, "fp32")
            passed = passed and all(row.passed for row in compare_outputs(backend.name, outputs[backend.name],
                                                                           outputs["torch-cpu"], tolerance))
    return {"passed": passed, "mean_ms": timings}


if __name__ == "__main__":
    started = time.perf_counter()
    found = floor(sys.argv[1], sys.argv[2])
    print(f"{'PASS' if found['passed'] else 'FAIL'} in {time.perf_counter() - started:.2f} s; "
          + ", ".join(f"{name} {ms:.1f} ms" for name, ms in found["mean_ms"].items()))
    sys.exit(0 if found["passed"] else 1)
