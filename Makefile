# Two commands on a fresh machine: `make demo` and `make test`. Each builds its own venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The local CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean system-deps demo-deps

# Debian packages the examples need (espeak-ng speaks the AV-Digits audio).
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng; }

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[test,lint,examples,prometheus,http,ray]" "$(TORCH_PIN)"
	touch $(STAMP)

# Real human speech for the demo's held-out test (optional; the demo says when it is missing).
demo-deps: system-deps
	@[ -d /usr/share/asterisk/sounds ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq asterisk-core-sounds-en-wav || true; }

demo: $(STAMP) demo-deps
	$(BIN)/python examples/demo.py

test: $(STAMP) system-deps
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/decisions.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
