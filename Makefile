# One-command set-up: every target that needs Python depends on `setup`, which builds .venv.
# On a host with its own torch/torch_npu (Ascend + CANN), pass PYTHON=python3: nothing is installed.

VENV       ?= .venv
ARTIFACTS  ?= artifacts
MODEL      ?=
# The torch build to install into a new .venv. On this workplace these wheels come from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS       ?=

ifdef PYTHON
SETUP_DEP :=
else
PYTHON    := $(VENV)/bin/python
SETUP_DEP := $(VENV)/.installed
endif

# Paths reach the CLI as data, one argument each, whatever they hold (spaces, quotes, $, ;): make keeps
# their literal text (`$(value ...)`, never expanded again) and hands them to the recipe's shell through
# its environment, where they are quoted ("$$IMAGES"); they are never pasted into the command line.
# MODEL and PATTERN are lists of names: split on blanks, with globbing off (set -f), never run as code.
# ARGS is the one variable that is shell text by design: extra options, as you would type them.
PATH_VARIABLES := ARTIFACTS IMAGES SAVE AGAINST REPORT MODEL PATTERN WEIGHTS
$(foreach v,$(PATH_VARIABLES),$(eval override $(v) := $$(value $(v))))
export $(PATH_VARIABLES)

# Optional make variables that turn into CLI flags. WEIGHTS (a file or folder, or random) reaches every export step,
# the one `make compare` runs first included.
EXPORT_FLAGS := $(if $(WEIGHTS),--weights "$$WEIGHTS")
COMPARE_FLAGS := $(if $(SAVE),--save-reference "$$SAVE") $(if $(AGAINST),--against "$$AGAINST") $(if $(REPORT),--report "$$REPORT") $(if $(IMAGES),--images "$$IMAGES")

.PHONY: setup host-deps export compare bench sweep test clean help

help:
	@echo "make export  [MODEL=dinov2] [ARTIFACTS=DIR]      export and verify ONNX artifacts"
	@echo "make compare [MODEL=dinov3] [WEIGHTS=DIR] [ARTIFACTS=DIR] [IMAGES=DIR]  export if missing, compare eager CPU, NPU and onnxruntime"
	@echo "make bench   [MODEL=dinov3]                      latency sweep 1,2,4,8, int8 speed-ups, time to verdict vs its floor"
	@echo "make sweep   PATTERN='vit_*small*'                export, compare and --layers for every matching timm model"
	@echo "make test                                        run the test suite"
	@echo "PYTHON=python3 uses an existing environment and installs nothing"
	@echo "make host-deps PYTHON=python3                   once, on a host with its own torch: install the rest, keep torch"

setup: $(SETUP_DEP)

# On an Ascend host a new .venv would hold stock torch without torch_npu: the NPU rows could never run. Say so
# before building it (VENV_ANYWAY=1 builds it all the same, for the CPU rows alone).
$(VENV)/.installed: pyproject.toml
	@if [ -z "$(VENV_ANYWAY)" ] && ls $${VIT_PARITY_DEVICE_ROOT:-/dev}/davinci[0-9]* >/dev/null 2>&1; then \
	  echo "make: this host has an Ascend NPU, and a new $(VENV) would hold stock torch without torch_npu. Use the host's own: source /usr/local/Ascend/ascend-toolkit/set_env.sh; make host-deps PYTHON=python3 (once); make $(MAKECMDGOALS) PYTHON=python3. VENV_ANYWAY=1 builds $(VENV) for the CPU rows alone." >&2; exit 2; fi
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install --quiet -e '.[cpu,dev,plot,ray]'
	touch $@

# For a host whose torch/torchvision/torch_npu match its CANN: install this project and its other
# dependencies with those versions pinned as constraints, so pip can never replace them. The
# onnxruntime variant found (onnxruntime-cann, -gpu or plain) is kept too, through its own extra:
# pip treats the variants as different projects and would put plain onnxruntime over an EP build.
host-deps:
	$(PYTHON) -m vitparity.environment constraints > .host-constraints.txt
	cat .host-constraints.txt
	$(PYTHON) -m pip install -c .host-constraints.txt -e ".[$$($(PYTHON) -m vitparity.environment extra)]"

export: $(SETUP_DEP)
	set -f; $(PYTHON) -m exporter --artifacts "$$ARTIFACTS" $(EXPORT_FLAGS) $(ARGS) -- $$MODEL

# Both export first whatever artifact is missing; no MODEL means every registered model. compare does it itself
# (--if-missing): one process, which starts the exporter only when an artifact is missing or damaged.
compare: $(SETUP_DEP)
	set -f; $(PYTHON) -m compare --artifacts "$$ARTIFACTS" --if-missing $(EXPORT_FLAGS) $(COMPARE_FLAGS) $(ARGS) -- $$MODEL

# Benchmarks (bench/): the latency sweep over batch sizes 1,2,4,8, the int8 variant's speed-ups and
# cosine, and the time to verdict against its one-process floor; ARGS e.g. '--only floor --pairs 5'.
bench: $(SETUP_DEP)
	set -f; $(PYTHON) -m exporter --artifacts "$$ARTIFACTS" --if-missing -- $$MODEL
	set -f; $(PYTHON) -m bench --artifacts "$$ARTIFACTS" $(ARGS) -- $$MODEL

# One subprocess per model, results appended to sweep/results.jsonl (a rerun resumes); ARGS e.g.
# '--max-params 100M --shard 1/4 --readme docs/sweep.md'. PATTERN words reach it as data (see PATH_VARIABLES).
sweep: $(SETUP_DEP)
	set -f; $(PYTHON) -m zoo $(ARGS) -- $$PATTERN

# pytest exits 5 when it collects no test; that is a failure here, not a pass. Most tests wait on
# subprocesses (a worker per backend, an export), so two pytest workers (pytest-xdist, the dev extra)
# use both cores (worksteal: an idle worker takes tests queued on the other, so a long test near the end
# does not leave a core idle); an environment without xdist runs the tests one by one.
TEST_WORKERS ?= 2
test: $(SETUP_DEP)
	@status=0; $(PYTHON) -m pytest $$($(PYTHON) -c 'import xdist' 2>/dev/null && echo --numprocesses=$(TEST_WORKERS) --dist worksteal) $(ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

clean:
	rm -rf $(VENV) .pytest_cache
