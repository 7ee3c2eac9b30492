"""Where an onnxruntime run's nodes ran, read from its profile: pure functions of the profile's events, testable
without onnxruntime. A row counts only if the requested provider did most of the work (`prove_placement`)."""
from __future__ import annotations

from collections import Counter

from .base import BackendUnavailable

CPU = "CPUExecutionProvider"


def short(provider: str) -> str:
    """CANNExecutionProvider -> CANN."""
    return provider.replace("ExecutionProvider", "")


MIN_SHARE = 0.5  # below this share of kernel time on the requested provider, a row is not that provider's result


def placement(profile: list[dict]) -> dict[str, dict[str, int]]:
    """Op type counts by provider, from the node events of an onnxruntime profile.

    A compiling provider (CANN) shows one event per fused subgraph it compiled, not per original node.
    """
    found: dict[str, Counter] = {}
    for event in _kernel_events(profile):
        found.setdefault(event["args"]["provider"], Counter())[event["args"].get("op_name", "?")] += 1
    return {provider: dict(ops.most_common()) for provider, ops in found.items()}


def kernel_share(profile: list[dict]) -> dict[str, float]:
    """Each provider's share of the profiled kernel time (0..1). Events without a duration count as zero time,
    so a profile with no durations at all gives every provider its share of the nodes instead."""
    time, nodes = Counter(), Counter()
    for event in _kernel_events(profile):
        time[event["args"]["provider"]] += max(float(event.get("dur", 0) or 0), 0.0)
        nodes[event["args"]["provider"]] += 1
    weights = time if sum(time.values()) > 0 else nodes
    total = sum(weights.values())
    return {provider: weights[provider] / total for provider in weights} if total else {}


def _kernel_events(profile: list[dict]):
    for event in profile:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and "provider" in args:
            yield event


FLOAT_TYPES = ("float16", "bfloat16", "float", "double")


def computed_in(profile: list[dict]) -> dict[str, int]:
    """How many compute kernels (casts aside) ran in each float type, by the type of their first float input as the
    profile records it ({"float16": 180, "float": 45}). A provider with no fp16 kernel for an op runs it in fp32
    behind casts it inserts (onnxruntime's InsertedPrecisionFreeCast): the graph says fp16, the run does not."""
    found: Counter = Counter()
    for event in _kernel_events(profile):
        if event["args"].get("op_name") == "Cast":
            continue
        types = [next(iter(entry)) for entry in event["args"].get("input_type_shape", []) if isinstance(entry, dict) and entry]
        first = next((kind for kind in types if kind in FLOAT_TYPES), None)
        if first:
            found[first] += 1
    return dict(found.most_common())


def prove_placement(profile: list[dict], provider: str) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """(placement, kernel-time share) of a profiled run, or BackendUnavailable when `provider` did not do most of the work."""
    where, share = placement(profile), kernel_share(profile)
    if not where.get(provider):
        raise BackendUnavailable(f"onnxruntime fell back to the CPU: the profile shows no node on {provider}")
    if share.get(provider, 0.0) < MIN_SHARE:
        raise BackendUnavailable(f"ran mostly on the CPU: {placement_summary(where, provider, share)}; "
                                 f"not a {short(provider)} result")
    return where, share


def placement_summary(where: dict[str, dict[str, int]], provider: str, share: dict[str, float] | None = None) -> str:
    """Short form for tables, e.g. "CANN 97% of kernel time; CANN 26 / CPU 25: LayerNormalization x25"; the CPU's
    op types are listed when the CPU is not the requested provider, since those are the nodes that fell back."""
    order = [provider] + [p for p in where if p != provider]
    parts = [f"{short(p)} {sum(where.get(p, {}).values())}" for p in order if p in where or p == provider]
    text = " / ".join(parts)
    fell_back = where.get(CPU, {}) if provider != CPU else {}
    if fell_back:
        text += ": " + ", ".join(f"{op} x{count}" for op, count in fell_back.items())
    if share is not None and provider != CPU:
        text = f"{short(provider)} {share.get(provider, 0.0):.0%} of kernel time; " + text
    return text
