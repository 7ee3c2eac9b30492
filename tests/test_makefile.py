"""The Makefile: every Python target sets up .venv by itself, and PYTHON= installs nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, make_argv

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(*args: str) -> str:
    result = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return result.stdout


@pytest.mark.parametrize("target,module", [("export", "exporter"), ("compare", "compare"), ("bench", "exporter"), ("test", "pytest")])
def test_each_target_sets_up_a_fresh_venv_first(target, module, tmp_path):
    venv = tmp_path / "venv"
    plan = _dry_run(target, f"VENV={venv}")
    assert plan.index("-m venv") < plan.index("pip install") < plan.index(f"{venv}/bin/python -m {module}")


@pytest.mark.parametrize("target", ["export", "compare", "bench", "test"])
def test_python_override_installs_nothing(target):
    plan = _dry_run(target, "PYTHON=python3", "MODEL=dinov3")
    assert "pip" not in plan and "venv" not in plan
    assert "python3 -m " in plan


def test_compare_passes_model_and_two_host_variables(tmp_path):
    runs = make_argv(tmp_path, "compare", "MODEL=dinov3", "SAVE=npu.npz", "ARTIFACTS=/data/a")
    # One process: compare exports a missing artifact itself (--if-missing), no exporter started to find it present.
    assert runs == [["-m", "compare", "--artifacts", "/data/a", "--if-missing", "--save-reference", "npu.npz", "--", "dinov3"]]


def test_make_variables_reach_the_cli_as_single_arguments_and_never_run_as_code(tmp_path):
    """A quote, a space, a $ and a ; in a path variable are data: each variable is one argument, as written,
    and the `touch` inside IMAGES never runs (it did while values were pasted into the recipe's shell text)."""
    touched = tmp_path / "touched"
    hostile = {"IMAGES": f"x'; touch {touched}; '", "ARTIFACTS": "/tmp/a b", "SAVE": "s$HOME $(shell id).npz",
               "AGAINST": "/x/John's photos/ref.npz", "REPORT": 'r "q" #.md', "WEIGHTS": "/w/my $run; ckpt"}
    runs = make_argv(tmp_path, "compare", "MODEL=dinov3 test_vit", *(f"{k}={v}" for k, v in hostile.items()),
                     "ARGS=--no-latency --budget 2")
    assert not touched.exists(), "a make variable ran as shell code"
    [compare] = runs
    for flag, variable in (("--images", "IMAGES"), ("--artifacts", "ARTIFACTS"), ("--save-reference", "SAVE"),
                           ("--against", "AGAINST"), ("--report", "REPORT")):
        assert compare[compare.index(flag) + 1] == hostile[variable], flag
    assert compare[-3:] == ["--", "dinov3", "test_vit"] and "--no-latency" in compare and "2" in compare
    assert compare[compare.index("--weights") + 1] == hostile["WEIGHTS"]  # WEIGHTS reaches compare's export step whole


def test_sweep_patterns_are_names_never_globbed_by_the_shell(tmp_path):
    # make runs in the project root, where the shell would expand a bare * to README.md, Makefile...
    runs = make_argv(tmp_path, "sweep", "PATTERN=vit_* eva02_tiny* *")
    assert runs == [["-m", "zoo", "--", "vit_*", "eva02_tiny*", "*"]]


def test_host_deps_pins_the_host_builds_and_keeps_its_onnxruntime_variant():
    plan = _dry_run("host-deps", "PYTHON=python3")
    assert "python3 -m vitparity.environment constraints > .host-constraints.txt" in plan
    assert "pip install -c .host-constraints.txt -e \".[$(python3 -m vitparity.environment extra)]\"" in plan


def test_an_installed_onnxruntime_cann_is_pinned_and_chooses_the_cann_extra(tmp_path):
    """pip treats onnxruntime-cann as another project than onnxruntime: host-deps must ask for the
    cann extra and pin the installed build, or pip would put plain onnxruntime over it, and keep
    NumPy 1.x, or the build could not be imported."""
    import os
    import sys

    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "__init__.py").write_text("")
    info = tmp_path / "onnxruntime_cann-1.24.4.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-cann\nVersion: 1.24.4\n")
    (info / "RECORD").write_text("onnxruntime/__init__.py,,\n")
    # The NumPy 1.x that build needs: pip must not upgrade it to 2 (ml_dtypes 0.6 would ask it to).
    numpy_info = tmp_path / "numpy-1.26.4.dist-info"
    numpy_info.mkdir()
    (numpy_info / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 1.26.4\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}

    def ask(what):
        return subprocess.run([sys.executable, "-m", "vitparity.environment", what], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True).stdout.split()

    assert ask("extra") == ["cann"]
    assert {"onnxruntime-cann==1.24.4", "numpy<2"} <= set(ask("constraints"))


def test_a_reproduce_line_for_paths_with_quotes_and_spaces_runs_the_same_command(tmp_path):
    """The report's `make compare` line for a folder with a space and a quote runs exactly the command it stands for."""
    import shlex

    from compare.cli import make_compare, parse

    argv = ["test_vit", "--artifacts", "/data/my artifacts", "--images", "/x/John's photos", "--report", "r $1.md",
            "--no-latency", "--backends", "torch-cpu,ort-cpu"]
    line = make_compare(argv)
    assert line is not None and line.startswith("make compare")
    words = shlex.split(line)
    [run] = make_argv(tmp_path, "compare", *words[2:])
    assert vars(parse(run[2:])) == vars(parse([*argv, "--if-missing"]))  # the target always exports what is missing


def test_without_pytest_xdist_every_shared_fixture_sets_up():
    """`make test` runs the tests one at a time where pytest-xdist is missing (a host with its own Python): the fixtures
    that share a folder between xdist workers must set up without xdist too (its `worker_id` fixture was missing: every
    test that used one was an error). --setup-plan resolves every fixture of the module and runs none."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "--setup-plan", "-q",
                           "tests/compare/test_markdown.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout[-3000:]
    assert "SETUP    S worker_id" in done.stdout and "SETUP    S artifacts_root" in done.stdout, done.stdout[-3000:]
