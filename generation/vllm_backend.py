"""vLLM as the generator: the service's own packed prompts, sent as token ids to vLLM's completions API.

The prompt is rendered and packed here exactly as for the in-process backend (generation/prompt.py, with a
tokenizer loaded locally from the same base model), and vLLM only continues it: ``prompt`` is the token id
list, decoding is greedy, and the answer's token ids come back (``return_tokens_as_token_ids``) so its text
is decoded here with the same tokenizer. What the in-process backend does with logits is emulated from the
first token's top log-probabilities (log-probability differences are logit differences; vLLM reports raw
log-probabilities, before any processing):

- the abstention preference: logprob("I don't know."'s first token) minus the best other token's;
- the calibrated abstention margin: when greedy decoding starts the abstention but it won by no more than the
  margin, the answer starts with the best other token instead and vLLM continues from there (a second
  request whose prompt ends with that token), as :class:`generation.generate.AbstainMargin` decides.

Every request is streamed, so ``timeout_s`` (the answer so far, ``finish_reason="timeout"``), ``cancel``
(the stream is closed and vLLM aborts the request) and ``on_text`` behave as in process. Adapters are vLLM
LoRA modules named by their registry label, loaded at run time (``/v1/load_lora_adapter``, which needs
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) unless the server already lists them (``--lora-modules``).

Failures raise :class:`VllmError` subclasses, each with the HTTP status a gateway reports for it: 503 when
vLLM cannot be reached (connection errors are retried a few times first), 504 when it is too slow to answer,
502 when it answers with an error or something unreadable.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from generation.generate import GenerationResult, TextDeltas, abstain_token_id
from generation.grounding import Thresholds
from generation.prompt import PROMPT_TEMPLATE_VERSION, PackedPrompt, stop_token_ids

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # vLLM's default --max-logprobs
TOKEN_ID_PREFIX = "token_id:"
RETRY_BACKOFF_S = 0.25
_POLL_S = 0.05  # how often a stream's watcher looks at the deadline and the cancel event


class VllmError(RuntimeError):
    """vLLM did not give an answer; ``status`` is the HTTP status a gateway reports for it."""

    status = 502


class VllmUnavailable(VllmError):
    """vLLM cannot be reached (connection refused, no route, or it says it is unavailable)."""

    status = 503


class VllmTimeout(VllmError):
    """vLLM accepted the request but did not answer in time."""

    status = 504


class VllmBadResponse(VllmError):
    """vLLM answered with an error or something that is not a completion."""

    status = 502


class VllmClient:
    """HTTP access to one vLLM OpenAI-compatible server. Thread-safe (one httpx.Client)."""

    def __init__(self, url: str, *, api_key: str | None = None, connect_timeout_s: float = 2.0,
                 read_timeout_s: float = 60.0, retries: int = 2, setting: str = "RAG_VLLM_URL") -> None:
        self.url = url.rstrip("/")
        self.setting = setting  # named in every error, so an operator knows what to check
        self.connect_timeout_s, self.read_timeout_s, self.retries = connect_timeout_s, read_timeout_s, retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s))

    @property
    def where(self) -> str:
        return f"vLLM at {self.url} ({self.setting})"

    def close(self) -> None:
        self._http.close()

    def send(self, method: str, path: str, *, body: Any = None, stream: bool = False,
             timeout: httpx.Timeout | None = None, retries: int | None = None) -> httpx.Response:
        """One request; connection errors are retried (nothing was sent), HTTP errors raised as VllmError."""
        retries = self.retries if retries is None else retries
        request = self._http.build_request(method, path, json=body,
                                           timeout=timeout or self._http.timeout)
        for attempt in range(retries + 1):
            try:
                response = self._http.send(request, stream=stream)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt == retries:
                    raise VllmUnavailable(f"{self.where} is not reachable ({type(exc).__name__}: {exc}) after "
                                          f"{retries + 1} attempts; is the vLLM server running?") from None
                time.sleep(RETRY_BACKOFF_S * (attempt + 1))
            except httpx.TimeoutException as exc:
                raise VllmTimeout(f"{self.where} did not answer in time ({type(exc).__name__})") from None
            except httpx.HTTPError as exc:
                raise VllmBadResponse(f"{self.where}: request failed ({type(exc).__name__}: {exc})") from None
        if response.status_code >= 400:
            if stream:
                response.read()
            response.close()
            raise self.http_error(response)
        return response

    def http_error(self, response: httpx.Response) -> VllmError:
        try:
            data = response.json()
            message = (data.get("error") or {}).get("message") if isinstance(data.get("error"), dict) else None
            message = message or data.get("message") or data.get("detail") or data
        except ValueError:
            message = response.text[:300]
        text = f"{self.where} answered {response.status_code} to {response.request.url.path}: {message}"
        if response.status_code == 503:
            return VllmUnavailable(text)
        if response.status_code == 504:
            return VllmTimeout(text)
        return VllmBadResponse(text)

    def get_json(self, path: str, *, timeout_s: float | None = None, retries: int | None = None) -> Any:
        timeout = None if timeout_s is None else httpx.Timeout(timeout_s)
        response = self.send("GET", path, timeout=timeout, retries=retries)
        try:
            return response.json()
        except ValueError:
            raise VllmBadResponse(f"{self.where}: {path} did not return JSON") from None

    def models(self, *, timeout_s: float | None = None, retries: int | None = None) -> list[dict[str, Any]]:
        """What the server serves: the base model(s) and the LoRA modules loaded (their ``parent`` set)."""
        data = self.get_json("/v1/models", timeout_s=timeout_s, retries=retries)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise VllmBadResponse(f"{self.where}: /v1/models is not a model list")
        return [m for m in data["data"] if isinstance(m, dict) and "id" in m]

    def load_lora(self, name: str, path: str | None) -> None:
        """Register a LoRA module (a PEFT folder the server can read at ``path``) under ``name``."""
        try:
            self.send("POST", "/v1/load_lora_adapter", body={"lora_name": name, "lora_path": path})
        except VllmBadResponse as exc:
            if "already" in str(exc).lower():  # loaded meanwhile (another worker): what we wanted
                return
            if " 404 " in str(exc) or "405" in str(exc):
                raise VllmBadResponse(
                    f"{self.where} cannot load adapter {name!r} at run time: start vLLM with --enable-lora and "
                    f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or with --lora-modules {name}=<adapter folder>") from None
            raise

    def stream_completion(self, body: dict[str, Any], *, deadline: float | None = None,
                          cancel: threading.Event | None = None) -> "CompletionStream":
        return CompletionStream(self, body, deadline=deadline, cancel=cancel)


@dataclass
class Token:
    id: int
    logprob: float
    top: dict[int, float]  # token id -> logprob, the top TOP_LOGPROBS (and the chosen token)


class CompletionStream:
    """One streamed completion, iterated token by token.

    A watcher thread closes the stream when ``deadline`` (time.monotonic()) passes or ``cancel`` is set;
    iteration then ends and ``interrupted`` says which ("timeout" / "cancelled"). After iteration:
    ``finish_reason`` (vLLM's: "stop", "length", ...) and ``completion_tokens`` (its usage count).
    """

    def __init__(self, client: VllmClient, body: dict[str, Any], *, deadline: float | None,
                 cancel: threading.Event | None) -> None:
        self.client, self.body, self.deadline, self.cancel = client, body, deadline, cancel
        self.finish_reason: str | None = None
        self.completion_tokens: int | None = None
        self.interrupted: str | None = None
        self._response: httpx.Response | None = None
        self._done = threading.Event()

    def _check(self) -> str | None:
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "timeout"
        return None

    def _watch(self) -> None:
        while not self._done.wait(_POLL_S):
            reason = self._check()
            if reason is not None:
                self.interrupted = reason
                self._hang_up()  # the blocked read returns; vLLM sees the disconnect and aborts the request
                return

    def _hang_up(self) -> None:
        # Closing the response from this thread would not wake a read blocked in the other one; shutting
        # the socket down does.
        stream = self._response.extensions.get("network_stream") if self._response is not None else None
        sock = stream.get_extra_info("socket") if stream is not None else None
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self._done.set()
        if self._response is not None:
            self._response.close()

    def __iter__(self) -> Iterator[Token]:
        if (reason := self._check()) is not None:
            self.interrupted = reason
            return
        client = self.client
        read = client.read_timeout_s  # silence for longer than this is a 504; the deadline is the watcher's
        self._response = client.send("POST", "/v1/completions", body=self.body, stream=True,
                                     timeout=httpx.Timeout(read, connect=client.connect_timeout_s))
        watcher = threading.Thread(target=self._watch, daemon=True, name="vllm-stream-watch")
        watcher.start()
        try:
            for line in self._response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                yield from self._tokens(data)
                if self.interrupted:
                    break
        except httpx.TimeoutException:
            if not self.interrupted:
                raise VllmTimeout(f"{client.where} stopped sending the answer for {read:.0f} s") from None
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if not self.interrupted:
                raise VllmBadResponse(f"{client.where}: the answer stream broke ({type(exc).__name__}: {exc})") \
                    from None
        finally:
            self.close()
            watcher.join()

    def _tokens(self, data: str) -> Iterator[Token]:
        where = self.client.where
        try:
            chunk = json.loads(data)
        except ValueError:
            raise VllmBadResponse(f"{where}: unreadable stream event {data[:200]!r}") from None
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise VllmBadResponse(f"{where} failed while generating: {message}")
        if chunk.get("usage"):
            self.completion_tokens = chunk["usage"].get("completion_tokens")
        for choice in chunk.get("choices") or []:
            logprobs = choice.get("logprobs") or {}
            tokens = logprobs.get("tokens") or []
            values = logprobs.get("token_logprobs") or [None] * len(tokens)
            tops = logprobs.get("top_logprobs") or [None] * len(tokens)
            for token, value, top in zip(tokens, values, tops):
                yield Token(_token_id(token, where), -9999.0 if value is None else float(value),
                            {_token_id(t, where): float(v) for t, v in (top or {}).items()})
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]


def _chain(first: Token, rest: Iterator[Token]) -> Iterator[Token]:
    yield first
    yield from rest


def _token_id(token: str, where: str) -> int:
    if not token.startswith(TOKEN_ID_PREFIX):
        raise VllmBadResponse(f"{where} returned token {token!r}, not token ids (return_tokens_as_token_ids)")
    return int(token[len(TOKEN_ID_PREFIX):])


def abstain_preference(first: Token, abstain_id: int) -> tuple[float, int]:
    """(preference, best other token) on the first answer token, from its top log-probabilities.

    The preference is logprob(abstention) minus the best other token's (= the logit difference
    AbstainMargin records). When the abstention is not among the top tokens, the lowest of them
    bounds its log-probability from above, and that bound is reported.
    """
    top = dict(first.top)
    top.setdefault(first.id, first.logprob)
    others = {token: value for token, value in top.items() if token != abstain_id}
    best_other = max(others, key=lambda token: others[token])
    own = top[abstain_id] if abstain_id in top else min(top.values())
    return own - others[best_other], best_other


@dataclass
class VllmGenerator:
    """The generator interface (generation.generate.Generator, as LoadedGenerator) over a vLLM server."""

    client: VllmClient
    tokenizer: Any
    model_name: str  # the local base model folder or id (tokenizer, config); vLLM serves the same weights
    native_context: int
    context_window: int
    rope_scaling: dict[str, Any] | None
    served_model: str | None = None  # vLLM's name for the base model; None: the first one it lists
    stops: list[int] = field(default_factory=list)
    adapter_path: str | None = None  # the registry folder, registered with vLLM as the LoRA module adapter_name
    abstain_margin: float = 0.0
    grounding: Thresholds = field(default_factory=Thresholds)
    adapter_name: str | None = None
    prompt_template_version: str = PROMPT_TEMPLATE_VERSION  # the adapter's, else the current one
    backend: str = "vllm"
    quantization: str = "none"  # vLLM's business
    health_timeout_s: float = 1.0
    _ready: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _state: tuple[float, dict[str, Any]] | None = field(default=None, repr=False)  # (checked at, state)
    _state_checking: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def request_model(self) -> str:
        """The ``model`` of a completion request: the LoRA module, or the base model."""
        return self.adapter_name or self.served_model or ""

    def ensure_ready(self) -> None:
        """Find the served model, check its length, and register the adapter once (until vLLM forgets it)."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            models = self.client.models()
            ids = [m["id"] for m in models]
            bases = [m for m in models if not m.get("parent")]
            if self.served_model is None:
                if not bases:
                    raise VllmBadResponse(f"{self.client.where} lists no model")
                self.served_model = bases[0]["id"]
            base = next((m for m in bases if m["id"] == self.served_model), None)
            if base is None:
                raise VllmBadResponse(f"{self.client.where} serves {ids}, not {self.served_model!r} (RAG_VLLM_MODEL)")
            limit = base.get("max_model_len")
            if isinstance(limit, int) and limit < self.context_window:
                raise VllmBadResponse(f"{self.client.where} serves {self.served_model!r} with --max-model-len "
                                      f"{limit}, shorter than RAG_CONTEXT_WINDOW={self.context_window}")
            if self.adapter_name and self.adapter_name not in ids:
                self.client.load_lora(self.adapter_name, self.adapter_path)
                log.info("registered adapter %s (%s) with %s", self.adapter_name, self.adapter_path, self.client.where)
            self._ready = True
            self._state = None  # what /health shows changed: check again

    def state(self, max_age_s: float = 2.0) -> dict[str, Any]:
        """What /health shows: whether vLLM answers (within ``health_timeout_s``, no retry) and what it serves.

        The last check is returned and, when older than ``max_age_s``, repeated in a background thread:
        /health never waits on a slow vLLM (only the very first check does, bounded by the timeout).
        """
        cached = self._state
        if cached is None:
            return self._check_state()
        if time.monotonic() - cached[0] > max_age_s and self._state_checking.acquire(blocking=False):
            def check() -> None:
                try:
                    self._check_state()
                finally:
                    self._state_checking.release()

            threading.Thread(target=check, name="vllm-health", daemon=True).start()
        return cached[1]

    def _check_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"url": self.client.url, "model": self.served_model, "reachable": False,
                                 "adapter_loaded": None, "error": None}
        try:
            ids = [m["id"] for m in self.client.models(timeout_s=self.health_timeout_s, retries=0)]
        except VllmError as exc:
            state["error"] = str(exc)
        else:
            state["reachable"] = True
            state["model"] = self.served_model or (ids[0] if ids else None)
            if self.adapter_name:
                state["adapter_loaded"] = self.adapter_name in ids
        self._state = (time.monotonic(), state)
        return state

    def _body(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        return {"model": self.request_model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "logprobs": TOP_LOGPROBS, "return_tokens_as_token_ids": True, "stop_token_ids": self.stops,
                "skip_special_tokens": True, "stream": True, "stream_options": {"include_usage": True}}

    def _stream(self, prompt: list[int], max_tokens: int, deadline: float | None,
                cancel: threading.Event | None) -> CompletionStream:
        return self.client.stream_completion(self._body(prompt, max_tokens), deadline=deadline, cancel=cancel)

    def generate(self, packed: PackedPrompt, *, max_new_tokens: int, timeout_s: float | None = None,
                 abstain_margin: float | None = None, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Greedy answer to ``packed`` (see generation.generate.generate_answer: same arguments, same result)."""
        if packed.n_tokens + max_new_tokens > self.context_window:
            raise ValueError(
                f"{packed.n_tokens} prompt + {max_new_tokens} new tokens exceed the "
                f"{self.context_window}-token context window"
            )
        start = time.perf_counter()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            self.ensure_ready()
            return self._generate(packed, max_new_tokens, deadline, start, abstain_margin, on_text, cancel)
        except VllmBadResponse as exc:
            if "does not exist" not in str(exc) or not self.adapter_name:
                raise
            self._ready = False  # vLLM restarted and forgot the adapter loaded at run time: once more
            self.ensure_ready()
            return self._generate(packed, max_new_tokens, deadline, start, abstain_margin, on_text, cancel)

    def _generate(self, packed: PackedPrompt, max_new_tokens: int, deadline: float | None, start: float,
                  abstain_margin: float | None, on_text: Callable[[str], None] | None,
                  cancel: threading.Event | None) -> GenerationResult:
        margin = self.abstain_margin if abstain_margin is None else abstain_margin
        abstain_id = abstain_token_id(self.tokenizer)
        deltas = TextDeltas(self.tokenizer, self.stops, on_text) if on_text is not None else None
        ids: list[int] = []
        logprobs: list[float] = []
        preference: float | None = None
        counted = 0  # tokens of an earlier request that the current one continues

        stream = self._stream(packed.input_ids, max_new_tokens, deadline, cancel)
        tokens = iter(stream)
        first = next(tokens, None)
        if first is not None:
            preference, best_other = abstain_preference(first, abstain_id)
            instead: int | None = None  # AbstainMargin's choice where greedy's first token differs from it
            if first.id == abstain_id and preference <= margin:  # the best other token
                instead = best_other
            elif first.id != abstain_id and abstain_id in first.top and preference > margin:  # a negative margin
                instead = abstain_id  # (outside the top tokens only a bound is known: never forced)
            if instead is not None:
                stream.close()
                first, counted = Token(instead, first.top[instead], first.top), 1
                if instead not in self.stops and max_new_tokens > 1:
                    stream = self._stream([*packed.input_ids, instead], max_new_tokens - 1, deadline, cancel)
                    tokens = iter(stream)
                else:
                    stream.finish_reason = "stop" if instead in self.stops else "length"
                    tokens = iter(())
            tokens = _chain(first, tokens)
        for token in tokens:
            ids.append(token.id)
            logprobs.append(token.logprob)
            if deltas is not None:
                deltas.add([token.id])
        elapsed = time.perf_counter() - start

        n_new = counted + (stream.completion_tokens if stream.completion_tokens is not None
                           else len(ids) - counted)
        if stream.interrupted:
            finish_reason = stream.interrupted
        elif stream.finish_reason == "length" or (stream.finish_reason is None and n_new >= max_new_tokens):
            finish_reason = "length"
        else:
            finish_reason = "stop"
        while ids and ids[-1] in self.stops:
            ids.pop()
        logprobs = logprobs[: len(ids)]
        return GenerationResult(
            text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
            n_prompt_tokens=packed.n_tokens,
            n_new_tokens=n_new,
            finish_reason=finish_reason,
            elapsed_s=elapsed,
            abstain_preference=preference,
            token_logprobs=logprobs,
        )


def connect_vllm(model_path: str, *, url: str, context_window: int, served_model: str | None = None,
                 api_key: str | None = None, connect_timeout_s: float = 2.0, read_timeout_s: float = 60.0,
                 retries: int = 2, health_timeout_s: float = 1.0, adapter_path: str | None = None,
                 adapter_name: str | None = None) -> VllmGenerator:
    """A VllmGenerator for the base model at ``model_path`` (its tokenizer and config, loaded here).

    Nothing is sent to vLLM yet: the server may start after the service; the first generation finds the
    served model and registers the adapter (see :meth:`VllmGenerator.ensure_ready`).
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from generation.loading import native_context, rope_scaling_for

    if adapter_path is not None:
        refuse_non_lora(adapter_path, adapter_name or adapter_path)
    config = AutoConfig.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: what transformers derives from the model config
        generation_config = GenerationConfig.from_model_config(config)
    native = native_context(config)
    client = VllmClient(url, api_key=api_key, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s,
                        retries=retries)
    return VllmGenerator(client=client, tokenizer=tokenizer, model_name=model_path, native_context=native,
                         context_window=context_window, rope_scaling=rope_scaling_for(native, context_window),
                         served_model=served_model, stops=stop_token_ids(tokenizer, generation_config),
                         adapter_path=adapter_path, adapter_name=adapter_name, health_timeout_s=health_timeout_s)


def refuse_non_lora(adapter_path: str, name: str) -> None:
    """vLLM serves plain LoRA modules only: DoRA, IA3, prompt and prefix tuning adapters are refused here."""
    from generation.adapters import AdapterMismatch, read_adapter_config
    from generation.methods import peft_kind

    config = read_adapter_config(Path(adapter_path))  # unreadable: vLLM's own error tells what is wrong
    kind = peft_kind(config)
    if config and kind != "LORA":
        raise AdapterMismatch(f"adapter {name} holds a {kind} adapter; vLLM serves LoRA adapters only (lora, qlora, "
                              "lora-8bit): serve it with RAG_GENERATOR_BACKEND=transformers")


def vllm_length_arguments(model_path: str, context_window: int) -> list[str]:
    """The vLLM server arguments that give it the positions the service packs for: ``--max-model-len`` and,
    when the window is beyond the native context, the same linear RoPE interpolation as
    :func:`generation.loading.apply_rope_scaling` (``--hf-overrides`` with the whole ``rope_parameters``,
    ``rope_theta`` included, as vLLM's transformers-5 configs take it; ``max_position_embeddings`` stays
    native and vLLM multiplies it by the factor). LLaMA-2-13B at 8192:
    ``--max-model-len 8192 --hf-overrides '{"rope_parameters": {"rope_type": "linear", "factor": 2.0,
    "rope_theta": 10000.0}}'``.
    """
    from transformers import AutoConfig

    from generation.loading import native_context, rope_scaling_for

    config = AutoConfig.from_pretrained(model_path)
    scaling = rope_scaling_for(native_context(config), context_window)
    arguments = ["--max-model-len", str(context_window)]
    if scaling is not None:
        rope = {"rope_type": "linear", "factor": scaling["factor"], "rope_theta": config.rope_parameters["rope_theta"]}
        arguments += ["--hf-overrides", json.dumps({"rope_parameters": rope})]
    return arguments

