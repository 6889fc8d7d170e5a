"""A free loopback port, for the servers tests and benchmarks start (uvicorn, chroma run, vLLM, rag serve)."""

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
