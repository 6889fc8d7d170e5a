#!/usr/bin/env bash
# Build the service image, run it, ask the demo question, check the answer and that provenance names the
# shipped adapter. Uses host networking (containers are not reached through the Docker bridge here).
#
#   BASE_IMAGE=python:3.11-slim scripts/docker_smoke.sh     # default: rag-base:bookworm, built by debootstrap
#                                                           # when absent (no image registry is reachable here)
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_IMAGE=${BASE_IMAGE:-rag-base:bookworm}
IMAGE=${IMAGE:-rag-service:smoke}
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
KEY=$(python3 -c 'import secrets; print(secrets.token_hex(16))')

if ! docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
    [ "$BASE_IMAGE" = "rag-base:bookworm" ] || { echo "error: base image $BASE_IMAGE not found" >&2; exit 1; }
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian > /dev/null
    tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" > /dev/null
    rm -rf "$rootfs"
fi
docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" .
container=$(docker run -d --rm --network host -e RAG_API_KEYS="$KEY" -e RAG_PORT="$PORT" "$IMAGE" \
    sh -c 'rag setup && exec rag serve')
trap 'docker stop "$container" > /dev/null 2>&1 || true' EXIT
for _ in $(seq 1 180); do
    curl -sf "http://127.0.0.1:$PORT/health" -H "Authorization: Bearer $KEY" > /dev/null && break
    sleep 1
done
answer=$(curl -sf "http://127.0.0.1:$PORT/query" -H "Authorization: Bearer $KEY" \
    -H 'content-type: application/json' -d '{"question": "How many vacation days do employees get?"}')
echo "$answer" | python3 -c '
import json, sys
body = json.load(sys.stdin)
adapter = body["provenance"]["adapter"] or ""
print("answer:", body["answer"], "| adapter:", adapter, "| user:", "non-root")
assert "28" in body["answer"] and body["grounded"], body["answer"]
assert adapter.startswith("smollm2-squad@"), f"the image serves {adapter!r}, not the shipped adapter"
'
[ "$(docker exec "$container" id -u)" != "0" ] || { echo "error: the service runs as root" >&2; exit 1; }
echo "docker smoke: ok"
