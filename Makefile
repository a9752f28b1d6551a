# `make demo` and `make test` work on a fresh machine with nothing but python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pretrained embedded models and reward networks are cached here (keyed by config).
export DIFFALIGN_CACHE ?= $(CURDIR)/.cache/diffalign

.PHONY: setup demo test test-browser docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	# torch first: the pinned CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/diffalign demo

# two pytest-xdist workers, one torch thread each, the slowest tests first (tests/conftest.py)
# about 13 minutes on 2 cores
test: setup
	$(PY) -m pytest -q -n 2

# the labelling page in headless Chromium: Debian's chromium + chromium-driver (installed if missing, as root
# or with sudo), selenium in the venv (the `browser` extra)
test-browser: setup
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; }
	@$(PY) -c "import selenium" 2>/dev/null || $(VENV)/bin/pip install -e ".[browser]"
	$(PY) -m pytest -q -p no:xdist -m browser

# the documentation site (site/): mkdocs + Material + mkdocstrings (the `docs` extra); --strict: a broken link,
# a missing page or reference fails the build
docs: setup
	@$(PY) -c "import mkdocs, material, mkdocstrings" 2>/dev/null || $(VENV)/bin/pip install -e ".[docs]"
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) .cache runs site
