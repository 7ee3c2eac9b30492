"""The README and the docs are claims too: every option they name is one the command's --help lists, every make
target and variable they use is the Makefile's, and every variant the exporter makes is in its --help."""
from __future__ import annotations

import re
import shlex

import pytest

from tests.helpers import ROOT

PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
COMMAND = re.compile(r"(python -m (exporter|compare|zoo|bench)(?![.\w])|make ([a-z][a-z-]*))([^\n`|#]*)")


def _help(module: str) -> str:
    import contextlib
    import io

    parse = {"exporter": "exporter.cli", "compare": "compare.cli", "zoo": "zoo.sweep", "bench": "bench.__main__"}[module]
    found = io.StringIO()
    with contextlib.redirect_stdout(found), pytest.raises(SystemExit):
        __import__(parse, fromlist=["parse"]).parse(["--help"])
    return found.getvalue()


def _code(text: str) -> list[str]:
    """What a page shows as code: the lines of its fenced blocks, and its inline `spans`."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [line for block in blocks for line in block.splitlines()] + inline


def _commands():
    for page in PAGES:
        for line in _code(page.read_text()):
            for match in COMMAND.finditer(line):
                yield page.relative_to(ROOT), match


def test_every_option_the_docs_name_is_in_the_commands_help():
    helps = {}
    wrong = []
    for page, match in _commands():
        module = match.group(2) or {"export": "exporter", "compare": "compare", "sweep": "zoo", "bench": "bench"}.get(
            match.group(3) or "")
        if not module:
            continue
        rest = match.group(4)
        args = re.search(r"ARGS='([^']*)'", rest)
        words = shlex.split(args.group(1)) if args and match.group(3) else rest.split() if match.group(2) else []
        helps.setdefault(module, _help(module))
        for word in words:
            flag = word.split("=", 1)[0]
            if re.fullmatch(r"--[a-z][a-z0-9-]*|-v", flag) and flag not in helps[module]:
                wrong.append(f"{page}: {module} has no {flag}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_every_make_target_and_variable_the_docs_use_is_the_makefiles():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.M))
    wrong = []
    for page, match in _commands():
        if not match.group(3):
            continue
        if match.group(3) not in targets:
            wrong.append(f"{page}: make {match.group(3)} is no target")
        for variable in re.findall(r"\b([A-Z_]+)=", match.group(4)):
            if variable not in makefile:
                wrong.append(f"{page}: make knows no {variable}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_exporters_help_names_every_variant():
    from vitparity.graphs import PRECISION_VARIANTS

    text = " ".join(_help("exporter").split())
    assert all(variant in text for variant in PRECISION_VARIANTS), text


def test_the_check_can_fail():
    assert "--no-such-flag" not in _help("compare")
    assert "--variant" in _help("exporter")
