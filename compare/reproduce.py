"""The commands that reproduce a run, for the Markdown report: the exact command line, then the `make export` lines
that rebuild its artifacts (with the weights the manifests name) and the `make compare` line with the same effect."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from vitparity import registry

from .results import Report

DEFAULT_ARTIFACTS = "artifacts"


def reproduce_commands(reports: list[Report], command: str, make: str | None) -> list[str]:
    """The exact command of this run, then `make export` lines and `make` (the make compare line), when given."""
    lines = ["# this run", command]
    if make is None:  # not a command line the Makefile can express; the exact one is enough
        return lines
    lines += ["# the same with make: export the artifacts, then compare"]
    for report in reports:
        root = str(Path(report.artifact).parent)
        variables = [f"MODEL={shlex.quote(report.model)}"]
        variables += [] if root == DEFAULT_ARTIFACTS else [make_variable("ARTIFACTS", root)]
        args = export_args(report.weights_source)
        args += ["--model-kwargs", *registry.kwargs_words(report.model_kwargs)] if report.model_kwargs else []
        variables += [make_variable("ARGS", *args)] if args else []
        lines.append(" ".join(["make export", *variables]))
    return lines + [make]


def export_args(weights_source: str) -> list[str]:
    """Exporter flags that rebuild the weights named by a manifest's weights_source (see exporter/weights.py)."""
    kind, _, rest = weights_source.partition(" ")
    if kind == "random-init":
        seed = re.search(r"seed (\d+)", rest)
        return ["--weights", "random"] + (["--seed", seed.group(1)] if seed and seed.group(1) != "0" else [])
    if kind == "file":
        return ["--weights", rest]
    return []  # hf-cache or hub: the exporter's default ("auto") finds the same weights


def make_variable(name: str, *words: str) -> str:
    """`NAME=value` for a make command line, quoted for the shell that runs make. ARGS is quoted twice: the
    recipe's shell reads it as shell text. The path variables reach the recipe as data (the Makefile's
    PATH_VARIABLES), so they are quoted once, whatever they hold."""
    if name == "ARGS":
        return f"{name}={shlex.quote(shlex.join(words))}"
    return f"{name}={shlex.quote(' '.join(words))}"
