# Reproducible companion to "Lost in Backpropagation: The LM Head is a Gradient Bottleneck".
# `make help` lists the targets. Every target creates .venv on first use.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= cpu
PROFILES := smoke cpu gpu
# Notebooks run in file-name order; each needs profiles/<profile>/<name>.yaml.
NOTEBOOKS := $(basename $(notdir $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))))
RESULTS := results/$(PROFILE)
SMOKE_DIR := build/smoke

# Offline by default: no hub downloads, no telemetry; headless plotting; deterministic hashing.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: help install reproduce test unit smoke lab clean check-profile bench report

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  Variables: PROFILE=$(PROFILE) (one of: $(PROFILES)), PYTHON=$(PYTHON)"

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, found {sys.version.split()[0]}; set PYTHON=python3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install the pinned packages (runs once)

check-profile:
	@case " $(PROFILES) " in *" $(PROFILE) "*) ;; *) echo "unknown PROFILE=$(PROFILE); use one of: $(PROFILES)" >&2; exit 2;; esac

# Training progress bars are off inside the notebooks, where each update would become a stored
# stderr output; papermill's own bar shows progress cell by cell.
reproduce: $(STAMP) check-profile  ## Execute every notebook with PROFILE (default cpu) into results/PROFILE/
	@mkdir -p $(RESULTS)
	@set -e; start=$$(date +%s); for nb in $(NOTEBOOKS); do \
	  echo "== $$nb (profile $(PROFILE))"; t0=$$(date +%s); \
	  GRADIENT_BOTTLENECK_PROGRESS=0 $(VENV)/bin/papermill --log-level WARNING --kernel python3 \
	    notebooks/$$nb.ipynb $(RESULTS)/$$nb.ipynb -f profiles/$(PROFILE)/$$nb.yaml; \
	  echo "   $$nb took $$(( $$(date +%s) - t0 )) s"; \
	done; echo "== all notebooks took $$(( $$(date +%s) - start )) s"
	$(PY) -m gradient_bottleneck claims --profile $(PROFILE) --update-readme

unit: $(STAMP)  ## Run the unit tests only
	$(PY) -m pytest -q tests

smoke: $(STAMP)  ## Run every notebook with the smoke profile under nbval
	@rm -rf $(SMOKE_DIR) && mkdir -p $(SMOKE_DIR)
	@for nb in $(NOTEBOOKS); do \
	  $(VENV)/bin/papermill --prepare-only --log-level WARNING notebooks/$$nb.ipynb $(SMOKE_DIR)/$$nb.ipynb \
	    -f profiles/smoke/$$nb.yaml || exit 1; \
	done
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax $(SMOKE_DIR)/*.ipynb

test: unit smoke  ## Unit tests, then every notebook in the smoke profile under nbval

bench: $(STAMP)  ## Run the benchmarks (ratios measured side by side) into results/bench.json
	$(PY) -m gradient_bottleneck.bench

report: $(STAMP) check-profile  ## Render results/PROFILE/ notebooks to HTML with an index, in build/report/PROFILE/
	$(PY) -m gradient_bottleneck.report --profile $(PROFILE)

lab: $(STAMP)  ## Open JupyterLab on notebooks/ with the project's environment
	$(VENV)/bin/jupyter lab notebooks/

clean:  ## Remove build outputs and caches (keeps .venv and results/)
	rm -rf build .cache .pytest_cache
