"""ort-cpu, ort-cann, ort-cuda: the ONNX artifact on onnxruntime with one execution provider each.

A row counts only if the requested provider did the work: onnxruntime quietly falls back to the
CPU when a provider cannot be created, so the session's providers are read back after creation,
and the profile of the first run says where every node ran.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vitparity.graphs import precision_variants, variant_file

from .base import Backend, BackendUnavailable
from .profile import CPU, computed_in, placement_summary, prove_placement

# What onnxruntime prints when it gives up on a provider, most telling first: the missing library,
# then the provider it did not create. The first line with such words is the reason shown.
FALLBACK_HINTS = ("cannot open shared object", "failed to create", "not in available provider", "ep error", "error", "fail")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class OnnxRuntime(Backend):
    """Runs model.onnx with `provider`, the CPU taking any node the provider has no kernel for.

    `device_type` is where IOBinding keeps the input and outputs, so host-device copies stay
    outside the clock as they do for the eager backends.
    """

    provider = CPU
    device_type = "cpu"
    install_hint = ""
    runs_variants = True

    def use_variant(self, variant: str) -> None:
        self.variant, self.name = variant, f"{self.name}:{variant}"

    @classmethod
    def probe(cls):
        ort = _onnxruntime()
        available = ort.get_available_providers()
        if cls.provider not in available:
            raise BackendUnavailable(
                f"{cls.provider} is not in onnxruntime.get_available_providers() ({', '.join(available)}); {cls.install_hint}"
            )

    def provider_options(self, precision: str) -> dict[str, str]:
        """The provider's options for `precision` (already the effective one); none for the CPU."""
        return {}

    def model_file(self, artifact) -> Path:
        """The graph this provider runs: the row's reduced-precision variant, else model.onnx (or the
        verified graph a subclass prefers)."""
        return artifact.path(variant_file(self.variant)) if self.variant else artifact.path("model.onnx")

    def variant_facts(self, artifact) -> dict[str, Any]:
        """What the row's variant is, from the manifest: its class (which judges it) and its recipe."""
        if not self.variant:
            return {}
        record = precision_variants(artifact.manifest).get(self.variant)
        if record is None:
            raise BackendUnavailable(f"the artifact has no {self.variant} variant; add it: python -m exporter "
                                     f"{artifact.key} --if-missing --variant {self.variant}")
        return {"variant": self.variant, "variant_class": record["class"], "recipe": record["recipe"],
                "variant_verify": {k: record["verify"][k] for k in ("cosine", "rel_error")}}

    def open_session(self, path: Path, options: dict[str, str]):
        """A profiled session on `path` whose first provider is checked to be the one asked for.

        Accuracy rows and layer taps both come through here, so both carry the same proof.
        """
        from vitparity import runtime

        providers = [(self.provider, options)] + ([] if self.provider == CPU else [CPU])
        # In a worker this folder lies inside the worker's own temp folder, which the parent always removes.
        profile_dir = tempfile.mkdtemp(prefix="ort-profile-")
        # A model this onnxruntime cannot open is a finding about the artifact, not a missing
        # backend: the error propagates and the comparison reports it as a failure.
        try:
            with runtime.captured_output() as said:
                session = runtime.session(path, providers, self.threads, profile_prefix=str(Path(profile_dir) / "run"))
            if session.get_providers()[0] != self.provider:
                del session  # its destructor may still write a profile: let it, before the folder goes
                raise BackendUnavailable(f"onnxruntime fell back to the CPU: {self.provider} was not created ({_reason(said)})")
        except BaseException:
            shutil.rmtree(profile_dir, ignore_errors=True)
            raise
        return session

    def proven_run(self, session, feed) -> tuple[list, dict[str, dict[str, int]], dict[str, float]]:
        """Run `session` once, profiled, and prove the provider did the work: (outputs, placement, kernel-time share).

        onnxruntime may give up on the provider during the run ("EP Error ... Falling back to
        ['CPUExecutionProvider']") and rebuild the session, and a provider may take only a few nodes:
        under MIN_SHARE of the kernel time, the result is the CPU's, and is not an accelerator row.
        """
        from vitparity import runtime

        try:
            with runtime.captured_output() as said:
                outputs = feed()
            fell_back = session.get_providers()[0] != self.provider
        finally:
            written = session.end_profiling()
            profile_path = Path(written) if written else None
            profile = json.loads(profile_path.read_text()) if profile_path and profile_path.is_file() else []
            if profile_path and profile_path.parent.name.startswith("ort-profile-"):
                shutil.rmtree(profile_path.parent, ignore_errors=True)  # the folder open_session made for it
        if fell_back:
            raise BackendUnavailable(f"onnxruntime fell back to the CPU during the run: {_reason(said)}")
        if session is getattr(self, "session", None):
            self.computed = computed_in(profile)
        return (outputs, *prove_placement(profile, self.provider))

    def load(self, artifact, precision: str) -> dict[str, Any]:
        from vitparity import environment, runtime

        self.probe()
        facts = self.variant_facts(artifact)
        self.variant_class = facts.get("variant_class", "")
        # A variant is its own precision: the provider runs its graph as written (CANN: must_keep_origin_dtype).
        precision = "fp32" if self.variant else self.effective_precision(precision)
        requested = self.provider_options(precision)
        self.threads = runtime.cpu_threads()
        path = self.model_file(artifact)
        self.session = self.open_session(path, requested)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.placement: dict[str, dict[str, int]] = {}
        self.share: dict[str, float] = {}
        self.layer_facts: dict[str, Any] = {}
        self.copies_timed = False
        return {
            "device": self.provider,
            "dtype": f"{self.variant} graph, float32 input and outputs" if self.variant else "float32 (ONNX graph)",
            "precision": precision,
            "graph": path.name,
            "onnxruntime": environment.version("onnxruntime"),
            "onnxruntime_distribution": environment.distributions("onnxruntime")[0],
            "providers": self.session.get_providers(),
            # Read back from the session: the options in force, defaults included, not the ones asked for.
            "provider_options": self.session.get_provider_options().get(self.provider, requested),
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "intra_op_num_threads": self.threads,
            **facts,
        }

    def prepare(self, batch: np.ndarray):
        import onnxruntime as ort

        batch = np.ascontiguousarray(batch, dtype=np.float32)
        binding = self.session.io_binding()
        try:
            binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(batch, self.device_type, 0))
            for name in self.output_names:
                binding.bind_output(name, self.device_type, 0)
        except Exception:  # noqa: BLE001 - a build that cannot place values on the device: copies go inside the clock
            self.copies_timed = True
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, batch)
            for name in self.output_names:
                binding.bind_output(name)
        return binding

    def infer(self, binding):
        self.session.run_with_iobinding(binding)  # returns once the bound outputs are ready
        return binding

    def to_numpy(self, binding) -> dict[str, np.ndarray]:
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self.output_names, binding.copy_outputs_to_cpu())}

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.placement:
            return super().run(batch)
        # The first run is the profiled one: it proves where the work ran.
        outputs, self.placement, self.share = self.proven_run(self.session, lambda: super(OnnxRuntime, self).run(batch))
        return outputs

    def observed(self) -> dict[str, Any]:
        return {"placement": self.placement, "kernel_time_share": self.share,
                "placement_summary": placement_summary(self.placement, self.provider, self.share), **self.layer_facts,
                **({"precision": self.precision_label(), "computed_in": self.computed} if self.variant and self.placement else {})}

    def precision_label(self) -> str:
        """What a variant row computed in, read back from its profiled run: int8 for an int8 graph; for an fp16 graph
        "fp16", or "fp16 (45 of 300 kernels in fp32)" where the provider ran some of its nodes in fp32."""
        kind = {"int8": "int8", "fp16": "fp16"}.get(self.variant_class, "fp32")
        if kind != "fp16":
            return kind
        computed = getattr(self, "computed", {})
        wide = computed.get("float", 0) + computed.get("double", 0)
        return f"fp16 ({wide} of {sum(computed.values())} kernels in fp32)" if wide else "fp16"

    def timed(self) -> str:
        if self.copies_timed:
            return f"session.run incl. copying the input to {self.device_type} and the outputs back (this build cannot bind on {self.device_type})"
        if self.device_type == "cpu":
            return "session.run_with_iobinding; input and outputs in host memory"
        return f"session.run_with_iobinding; input and outputs bound on {self.device_type}, copies outside the clock"

    def layers(self, artifact, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The taps from the per-block graph of the very file the accuracy row ran, through the same provider
        and fallback checks; where its nodes ran is recorded as `layers_placement`."""
        from vitparity import blocks

        graph = self.model_file(artifact)
        session = self.open_session(blocks.ensure(artifact, graph.name), self.session.get_provider_options().get(self.provider, {}))
        names = [o.name for o in session.get_outputs()]
        values, where, share = self.proven_run(session, lambda: session.run(None, {self.input_name: batch.astype(np.float32)}))
        self.layer_facts = {"layers_graph": blocks.blocks_file(graph.name), "layers_placement": where,
                            "layers_placement_summary": placement_summary(where, self.provider, share)}
        got = dict(zip(names, values))
        taps = blocks.tap_names(sum(name.startswith("block_") for name in got))
        # The final norm's output is the graph's `tokens` output.
        return {name: np.asarray(got["tokens" if name == "norm" else name], dtype=np.float32) for name in taps}


    def replay(self, artifact, batch: np.ndarray, folder: str, write: bool) -> dict:
        """Each block of the very graph this row ran (a variant's too), cut out at its token stream (onnx's
        Extractor, block boundaries from the graph's module scopes or its source graph's) and run on the
        reference's input to that block: {"block_0": {"": figures}, ...}. The rest a block needs (a rotary
        model's rope) is computed from the input image, as in the whole graph."""
        import onnx
        from onnx.utils import Extractor

        from vitparity import blocks, metrics

        if write:
            raise BackendUnavailable("an onnxruntime reference cannot record the blocks' inputs; use an eager reference")
        graph = self.model_file(artifact)
        source = artifact.manifest.get("variants", {}).get(graph.name, {}).get("from")
        scoped = blocks.load_graph(artifact.path(source) if source else graph).graph
        boundaries = blocks.block_boundaries(scoped)
        if graph.stat().st_size > 2_000_000_000 or Path(str(graph) + ".data").exists():
            raise BackendUnavailable("replaying the blocks of a graph with external data (over 2 GB) is not supported yet")
        model = onnx.load(str(graph))
        made = {name for node in model.graph.node for name in node.output}  # a variant keeps some of its source's names
        extractor = Extractor(model)
        options = self.session.get_provider_options().get(self.provider, {})
        figures, work = {}, Path(tempfile.mkdtemp(prefix="ort-replay-"))
        try:
            for index, (entry, leaving) in enumerate(boundaries):
                path = work / f"block_{index}.onnx"
                # The block's parts too (its sub-modules' outputs, by the nodes' module scopes), where the reference
                # recorded the same part and this graph still has the value.
                recorded = Path(folder) / f"block_{index}.parts.npz"
                wants = {}
                if recorded.is_file():
                    with np.load(recorded, allow_pickle=False) as found:
                        wants = {name: found[name] for name in found.files}
                parts = {part: value for part, value in blocks.block_parts(scoped, index).items()
                         if part in wants and value in made and value != leaving}
                onnx.save(extractor.extract_model([entry, self.input_name], [leaving, *parts.values()]), str(path))
                session = self.open_session(path, options)
                given = np.load(Path(folder) / f"block_{index}.in.npy")
                feeds = {entry: given, self.input_name: batch.astype(np.float32)}
                wanted = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}
                # Through the same proof as the accuracy row: a replayed block that ran mostly on the CPU is no device figure.
                (got, *inside), _, _ = self.proven_run(
                    session, lambda: session.run(None, {name: feeds[name].astype(dtype) for name, dtype in wanted.items()}))
                found = {"": _agreement(metrics, got, np.load(Path(folder) / f"block_{index}.out.npy"))}
                found.update({part: _agreement(metrics, value, wants[part]) for part, value in zip(parts, inside)})
                figures[f"block_{index}"] = found
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return figures


def _agreement(metrics, got, want) -> dict:
    """A replayed block's (or part's) figures against the reference's, as the eager backends report them."""
    got = np.asarray(got, dtype=np.float32)
    if got.shape != want.shape:
        return {"cosine": float("nan"), "rel_error": float("nan"), "max_abs": float("nan"), "nonfinite": 0, "shape": list(got.shape)}
    return {"cosine": metrics.cosine(got, want), "rel_error": metrics.relative_error(got, want),
            "max_abs": metrics.max_abs_diff(got, want), "nonfinite": metrics.nonfinite_count(got)}


def _onnxruntime():
    from vitparity import runtime

    try:
        return runtime.load_onnxruntime()
    except runtime.RuntimeMissing as why:
        raise BackendUnavailable(str(why)) from why


def _reason(said: list[str]) -> str:
    lines = [ANSI.sub("", line) for line in said]
    for hint in FALLBACK_HINTS:
        for line in lines:
            if hint in line.lower():
                # "[E:onnxruntime:Default, provider_bridge_ort.cc:2458 ...] /src/...: FAIL : Failed to load library X
                # with error: libcublasLt.so.13: cannot open ..." -> from "Failed to load library" on.
                start = line.find("Failed to load library")
                return line[start:] if start >= 0 else line
    return lines[-1] if lines else "onnxruntime gave no reason"


class OrtCpu(OnnxRuntime):
    name = "ort-cpu"
    provider = CPU
    tolerance = "same-host"


class OrtCann(OnnxRuntime):
    name = "ort-cann"
    accelerator = "ascend"
    provider = "CANNExecutionProvider"
    device_type = "cann"
    precisions = ("fp16", "fast-math")
    install_hint = "on an Ascend host: pip install -e '.[cann]' (onnxruntime-cann)"
    PRECISION_MODES = {
        # CANN compiles in fp16 unless told otherwise (ATC's default is force_fp16).
        "fp32": {"precision_mode": "must_keep_origin_dtype", "op_select_impl_mode": "high_precision"},
        "fp16": {"precision_mode": "force_fp16"},
        "fast-math": {},  # as shipped: CANN's default precision_mode
    }

    def provider_options(self, precision):
        return dict(self.PRECISION_MODES[precision])

    def model_file(self, artifact):
        # The CANN provider has no LayerNormalization kernel; the exporter's decomposed variant
        # (--decompose-layernorm) keeps the whole graph on the NPU.
        from vitparity.graphs import LN_DECOMPOSED

        if not self.variant and LN_DECOMPOSED in artifact.manifest.get("files", {}):
            return artifact.path(LN_DECOMPOSED)
        return super().model_file(artifact)


class OrtCuda(OnnxRuntime):
    name = "ort-cuda"
    accelerator = "cuda"
    provider = "CUDAExecutionProvider"
    device_type = "cuda"
    precisions = ("fast-math",)
    install_hint = "on a CUDA host: pip install -e '.[gpu]' (onnxruntime-gpu)"

    def provider_options(self, precision):
        # The CUDA provider runs fp32 matmuls in TF32 by default (use_tf32=1).
        return {} if precision == "fast-math" else {"use_tf32": "0"}
