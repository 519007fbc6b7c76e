# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick demo-personalize minisd-stack app docs test test-browser bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q "torch>=2.4"
	$(BIN)/python -c "import torch; print(torch.__version__)" | sed 's/+.*//' | sed 's/^/torch==/' > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/difflab digits demo --out runs/demo

demo-quick: $(STAMP)
	$(BIN)/difflab digits demo --out runs/demo-quick --quick

# Unpacks the miniature SD + CLIP stack difflab ships (reused when present), then runs the CLIP and
# personalization jobs on it.
demo-personalize: $(STAMP)
	$(BIN)/difflab personalize demo --out runs/personalize-demo

# Rebuilds that stack from scratch (fixed work, seeded; about 75 minutes on 2 cores: joint CLIP and VAE took 22 on
# the Intel Xeon, the UNet, CLIP vision tuning and judges 51 on the AMD EPYC) and packs it into the package.
minisd-stack: $(STAMP)
	$(BIN)/difflab minisd build --out runs/minisd --resume
	$(BIN)/difflab minisd pack runs/minisd --overwrite

# The local web app on http://127.0.0.1:7860 (the digits tab uses `make demo`'s model when there is one).
app: $(STAMP)
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[app]"
	$(BIN)/difflab app

# The documentation site into site/, offline; --strict makes a broken link or a missing reference an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# The app driven in the system's headless Chromium (apt-get install chromium); skipped, saying so, without one.
test-browser: $(STAMP)
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[test,browser]"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m browser -rs tests/test_app_browser.py

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs build dist site *.egg-info src/*.egg-info
