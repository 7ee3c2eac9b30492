"""The comparison itself: plan, run every backend, judge, and assemble the Report. Never prints.

Planning lives in compare/plan.py, the workers' orchestration in compare/orchestrate.py, and every row
and judgement in compare/judge.py; this module joins them and adds the report's warnings and environment.
"""
from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from vitparity import artifact, environment, registry, runtime, sizes
from vitparity.errors import UserError
from vitparity.graphs import precision_variants

from . import dataset, inputs, judge, layers
from .backends import split
from .orchestrate import Run, images_folder, run_backends
from .plan import (
    VERSION_KEYS,
    CompareOptions,
    check_batch_memory,
    check_names,
    choose_input,
    images_described,
    images_plan,
    item_names,
    layout,
    same_as_stored,
    same_images_as_stored,
)
from .results import BackendStatus, LatencyStats, Report, TruthComparison


def version_warnings(manifest: dict) -> list[str]:
    here, there = environment.versions(), manifest.get("versions", {})
    mixed = environment.distributions("onnxruntime")
    warnings = [
        f"{len(mixed)} onnxruntime distributions are installed ({', '.join(mixed)}; {mixed[0]} is imported): "
        f"pip does not know they are one package and may mix their files; uninstall all but one"
    ] if len(mixed) > 1 else []
    return warnings + [
        f"{key} is {here[key]} here but the artifact was exported with {there[key]}"
        for key in VERSION_KEYS
        # The local part (+cu130, +cpu) names the build, not the library: it differs between hosts by design.
        if there.get(key) and str(here.get(key)).split("+")[0] != str(there[key]).split("+")[0]
    ]


def compare(model: str, options: CompareOptions = CompareOptions(), step: Callable[[str], None] = lambda m: None,
            art: artifact.Artifact | None = None) -> tuple[Report, Run]:
    """Compare one model's artifact across backends. Returns the report and the raw arrays.

    `art`: the artifact, already loaded with every hash checked (compare --if-missing did it); else it is loaded here.
    """
    check_names(options)
    spec = registry.resolve(model, options.artifacts)
    if art is None:
        step(f"{spec.key}: verifying the artifact")
        art = artifact.load(Path(options.artifacts), spec.key)
    manifest = art.manifest
    if options.size is not None:  # every backend at another size: its input, data config and token layout
        manifest = sizes.manifest_at(manifest, sizes.check(manifest, options.size))
    for size, flag in ((options.batch_size or 1, "--batch-size"), (max(options.batch_sizes or (1,)), "--batch-sizes")):
        check_batch_memory(size, manifest["data_config"]["input_size"], flag)
    stored = None
    if options.against:
        from . import reference

        stored = reference.load(options.against, manifest)
    groups = layout(manifest)
    if stored is not None and (stored.input.get("kind") == "images") != bool(options.images):
        raise UserError(
            f"the reference in {options.against} was saved from {stored.input.get('count')} images (--images); pass --images "
            f"with the same images" if stored.input.get("kind") == "images" else
            f"the reference in {options.against} holds one input batch, not an image set; drop --images to reuse it")
    if options.images:
        with images_folder() as folder:
            batch, plan = images_plan(options, manifest, folder, groups)
            if stored is not None:
                same_images_as_stored(plan["decode"]["paths"], stored, options)
            statuses, run, timings, warnings = run_backends(options, art, batch, step, plan)
            described = images_described(options, manifest, *dataset.decoded(folder))
        warnings = [f"skipped {s['path']}: {s['reason']}" for s in described["skipped"]] + warnings
    else:
        batch, described, image = choose_input(options, manifest, stored)
        statuses, run, timings, warnings = run_backends(options, art, batch, step, image=image)
        if image:
            described = {"kind": "image", "source": described["source"], "shape": list(run.batch.shape), "dtype": "float32",
                         "sha256": inputs.digest(run.batch)}
            same_as_stored(described, stored, options)
    if stored is not None and options.images:
        if stored.input["sha256"] != described["sha256"]:
            raise UserError(
                f"the images differ from those stored in {options.against} ({stored.input['count']} images there, "
                f"{described['count']} here, compared by content hash in order); pass --images with the same images")
        reference_embeddings = run.images[options.reference]["embeddings"]
        for name, embeddings in stored.embeddings.items():  # pooled, per image, against this host's reference
            run.images[name] = {"embeddings": embeddings, **judge.wire("reference", judge.item_figures(
                {"pooled": embeddings}, {"pooled": reference_embeddings}, None, outputs=("pooled",)))}
    if stored is not None:
        statuses += stored.statuses()
        run.outputs.update(stored.outputs)
        run.taps.update(stored.taps)
    if not options.images:  # one batch: a stream of one, its per-item figures made here as the workers make a folder's
        _batch_figures(run, options, stored, groups, described["kind"])
    judged = {name: judge.judged_by(name, statuses, stored, options.min_cosine, options.max_rel) for name in run.outputs}
    items = item_names(described, len(run.batch))
    others = [name for name in run.images if name != options.reference]
    accuracy = [row for name in others
                for row in judge.accuracy_rows(name, judge.from_wire(run.images[name], "reference"), judged[name], items)]
    if not options.images:
        accuracy += judge.size_rows(run.sizes, run.outputs[options.reference], options.reference, accuracy, judged, groups)
    embeddings = run.images[options.reference].get("embeddings")
    neighbour_rows = [judge.neighbour_row(name, embeddings, run.images[name]["embeddings"], judged[name], items)
                      for name in others if embeddings is not None and "embeddings" in run.images[name]]
    stability = judge.stability_rows(run.stability, run.outputs, judged, groups)  # the reference's own too
    per_image = {name: judge.per_image_figures(judge.from_wire(run.images[name], "reference")) for name in others}
    truth = (judge.truth_rows(run.images, options.reference, options.truth) if options.truth else []) + (
        [TruthComparison(**row) for row in stored.truth] if stored is not None else [])
    layer_rows, drift, parts, advice = [], {}, [], {}
    if options.layers and options.reference in run.taps:
        layer_rows, drift = layers.compare_layers(run.taps, options.reference, judged, groups,
                                                  frozenset(row.backend for row in accuracy if not row.passed))
    # This run's replays only: a stored row's were measured against its own host's reference, not this one's.
    replays = {s.name: s.replay for s in statuses if s.status == "ran" and s.replay is not None}
    if replays:
        export = shlex.join(["python", "-m", "exporter", spec.key, "--artifacts", str(options.artifacts), "--if-missing"])
        ran = {s.name: {"precision": s.ran_in, "variant": split(s.name)[1], "export": export,
                        "kept": _kept(s.details.get("recipe"))} for s in statuses}
        layer_rows, parts, local, advice = layers.localise(layer_rows, replays, judged, ran)
        drift = {name: "; ".join(filter(None, [drift.get(name), local.get(name, "").removeprefix(f"{name}: ")]))
                 for name in {*drift, *local}}
    report = Report(
        devices_not_run=devices_not_run(statuses),
        model=spec.key,
        size=sizes.label(options.size) if options.size and tuple(options.size) != sizes.native(art.manifest) else "",
        resample=_resample(statuses, options.reference),
        timm_name=manifest["timm_name"],
        model_kwargs=artifact.model_kwargs(manifest),
        artifact=str(art.folder),
        weights_source=manifest.get("weights_source", "unknown"),
        weights_sha256=manifest["files"]["weights.safetensors"]["sha256"],
        input=described,
        reference=options.reference,
        dtype=options.dtype,
        versions=_environment(statuses, int8_rows(statuses)),
        warnings=version_warnings(manifest) + artifact.verify_warnings(manifest) + host_warnings(manifest, int8_rows(statuses))
        + warnings,
        backends=statuses,
        accuracy=accuracy,
        latency=_with_speedups(timings, options.reference),
        layers=layer_rows,
        drift=drift,
        overrides={k: v for k, v in (("min_cosine", options.min_cosine), ("max_rel", options.max_rel)) if v is not None},
        saved_reference=options.save_reference,
        truth=truth,
        neighbours=neighbour_rows,
        stability=stability,
        per_image=per_image,
        parts=parts,
        advice=advice,
    )
    return report, run


def _resample(statuses: list[BackendStatus], reference: str) -> dict | None:
    """The reference's check of model.onnx's position-embedding resample (vitparity/resample.py), with where each
    onnxruntime row ran the graph's Resize, read from its profile (`resize_ran_on`: {row: [providers]}): an NPU
    provider without the kernel leaves it to the CPU."""
    found = next((s.details["resample"] for s in statuses if s.name == reference and "resample" in s.details), None)
    if found is None:
        return None
    ran_on = {s.name: [provider.replace("ExecutionProvider", "") for provider, ops in s.details["placement"].items()
                       if "Resize" in ops]
              for s in statuses if s.status == "ran" and isinstance(s.details.get("placement"), dict)}
    return {**found, "resize_ran_on": {name: where for name, where in ran_on.items() if where}}


def _batch_figures(run: Run, options: CompareOptions, stored, groups: dict | None, kind: str) -> None:
    """One batch as a stream of one: each backend's per-item figures against the reference (and the truth, for
    backends that ran here; stored ones keep their host's), into run.images as the workers put a folder's. An
    image's pooled embedding is kept for neighbour agreement, which one image cannot have: "not judged", as a
    one-image folder says; a seeded noise batch has no neighbours to keep."""
    want = run.outputs[options.reference]
    for name, outputs in run.outputs.items():
        found = judge.wire("reference", judge.item_figures(outputs, want, groups)) if name != options.reference else {}
        if run.truth and (stored is None or name not in stored.outputs):
            found.update(judge.wire("truth", judge.item_figures(outputs, run.truth, None)))
        if kind == "image":  # copies of one image: one item to find neighbours among
            found["embeddings"] = np.asarray(outputs["pooled"])[:1]
        run.images[name] = found


DEVICE_NAMES = {"ascend": "Ascend NPU", "cuda": "NVIDIA GPU"}


def devices_not_run(statuses: list[BackendStatus], present: dict | None = None) -> dict[str, str]:
    """{accelerator: one line} for each accelerator of this host (its device files) whose backends are among the
    rows and none of which ran: what stopped each, and the fix. A user who names --backends without them asks for
    none, and gets none of these lines."""
    present = environment.accelerators() if present is None else present
    found = {}
    for kind, files in present.items():
        rows = [s for s in statuses if split(s.name)[0].accelerator == kind]
        if rows and not any(s.status in ("ran", "stored") for s in rows):
            why = "; ".join(dict.fromkeys(f"{s.name}: {s.reason}" for s in rows if not s.name.partition(":")[2]))
            found[kind] = (f"this host's {DEVICE_NAMES[kind]} ({files[0]}) never ran ({why}); {environment.FIX[kind]}; "
                           f"or compare without it: --backends torch-cpu,ort-cpu")
    return found


def _kept(recipe) -> list[str]:
    """What a variant's recipe keeps in float: int8's modules, or fp16's op types."""
    if not isinstance(recipe, dict):
        return []
    keep = recipe.get("keep_float") or {}
    return list(keep.get("entries", [])) if "keep_float" in recipe else list((recipe.get("keep_fp32") or {}).get("op_types", []))


def _with_speedups(timings: list[LatencyStats], reference: str) -> list[LatencyStats]:
    """Rows ordered by batch size (backends in run order within one), each with reference mean / its mean, and
    for a variant row its fp32 graph's mean / its mean ("ort-cpu:int8" against "ort-cpu")."""
    mean = {(row.backend, row.batch): row.mean_ms for row in timings}
    ordered = sorted(timings, key=lambda row: row.batch)

    def ratio(backend: str, row: LatencyStats) -> float | None:
        return mean[(backend, row.batch)] / row.mean_ms if (backend, row.batch) in mean else None

    return [replace(row, speedup=ratio(reference, row),
                    graph_speedup=ratio(row.backend.partition(":")[0], row) if ":" in row.backend else None)
            for row in ordered]


def int8_rows(statuses: list[BackendStatus]) -> list[str]:
    """The rows that ran an int8 graph of this artifact here (stored rows ran on their own host)."""
    return [s.name for s in statuses if s.status == "ran" and s.variant_class == "int8"]


def host_warnings(manifest: dict, rows: list[str], here: dict | None = None) -> list[str]:
    """A warning for each int8 row whose graph was verified on a CPU with other int8 features than this host's
    (VNNI or not changes int8 numerics), or on an unrecorded one. Not for dynamic int8 (quantize_dynamic) verified
    on x86 and run on x86: its products are summed exactly there, VNNI or not (vitparity/runtime.py session_config),
    so the two hosts differ only where float kernels do, as for fp32."""
    if not rows:  # reading the CPU's features takes a second
        return []
    here = here or environment.cpu()
    found = precision_variants(manifest)
    warnings = []
    for row in rows:
        record = found.get(row.partition(":")[2], {})
        verified = record.get("verify", {}).get("host")
        if record.get("recipe", {}).get("call") == "quantize_dynamic" and all(
                environment.is_x86(host) for host in (verified, here)):
            continue
        note = environment.int8_host_note(verified, here)
        if note:
            warnings.append(f"{row}: {note}")
    return warnings


def _environment(statuses: list[BackendStatus], int8: list[str] = ()) -> dict:
    """Library versions here, plus each backend's device name and accelerator stack versions, and the CPU's int8
    features when an int8 graph ran (reading them takes about a second)."""
    env = {**environment.versions(), "torch_npu": environment.version("torch_npu")}
    if int8:
        host = environment.cpu()
        env["cpu"] = host["model"]
        env["cpu int8 features"] = ", ".join(host["int8_features"] or []) if host["int8_features"] is not None else "unknown"
        config = runtime.session_config(host)  # what the int8 rows ran with here: u8u8 where u8s8 saturates
        if config:
            env["onnxruntime session config"] = ", ".join(f"{key}={value}" for key, value in config.items())
    for status in statuses:
        for key in ("device_name", "cann", "cuda"):
            if status.details.get(key):
                env[f"{status.name} {key}"] = status.details[key]
    return env
