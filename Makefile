# Distill3R: `make demo` runs the whole pipeline on the built-in demo data; `make test` the suite
# (`make test-fast`: the unit tests, `make test-gpu`: the CUDA tests).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo bench plots study study-ablations test test-fast test-gpu lock clean-demo

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(BIN)/python -c "import distill3r, torch, timm, lightning, webdataset, mlflow, dvc, pybullet, h5py, OpenEXR, viser, pycolmap"
	touch $(STAMP)

# The whole pipeline on the demo data (CPU, minutes), without the benchmark. DVC reruns only
# what changed.
DEMO_STAGES ?= evaluate infer benchmark
demo: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro $(DEMO_STAGES)

# Time and memory versus views (minutes; run it on a quiet machine).
bench: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro bench

# The learned-teacher study (studies/distill, README "Learned-teacher study"): 12-21 minutes on
# a quiet 2-core CPU; then its ablations as queued DVC experiments (one at a time, ~4 min
# each) and their table (studies/distill/reports/ablations.md).
study: setup
	cd studies/distill && PATH="$(abspath $(BIN)):$$PATH" $(abspath $(BIN))/dvc repro
study-ablations: setup
	cd studies/distill && PATH="$(abspath $(BIN)):$$PATH" $(abspath $(BIN))/python ../../scripts/study_ablations.py

# dvc plots as a self-contained HTML page (no CDN: the vega scripts are inlined).
PLOTS_TEMPLATE := $(VENV)/share/distill3r/plots-offline.html
$(PLOTS_TEMPLATE): $(STAMP) distill3r/plots.py
	$(BIN)/python -m distill3r.plots --cache $(VENV)/share/distill3r --out $@
plots: $(PLOTS_TEMPLATE)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc plots show --html-template $(PLOTS_TEMPLATE) -o reports/plots

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit tests alone (no test marked slow, no GPU tests): under a minute.
test-fast: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

# The CUDA tests (skipped without a CUDA device); -s prints the figures they measure.
test-gpu: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -s tests/gpu $(PYTEST_ARGS)

# Refresh the exact lock of the environment (commit the result).
lock: setup
	$(BIN)/pip freeze --exclude-editable | grep -v "^distill3r" > requirements.lock
