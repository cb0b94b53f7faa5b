"""Backends that send one request and time every streamed chunk: any OpenAI-compatible HTTP server,
or the in-process engine. A backend never raises for a failed request: it returns a record with
success=False and the error, so one bad request (or a server that fails mid-run) is counted and
the run goes on. Problems that make the whole run pointless (unreachable URL, rejected API key)
are found by `preflight` before the run and raised as UsageError: one line, exit 2.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from r1deploy.bench.record import RequestRecord
from r1deploy.bench.workload import RequestSpec, Tokenizer
from r1deploy.errors import UsageError

if TYPE_CHECKING:
    from r1deploy.engine.engine import LLMEngine

THINK_END = "</think>"


class Backend(Protocol):
    description: str

    async def send(self, request_id: str, spec: RequestSpec, round_index: int = -1) -> RequestRecord: ...

    async def close(self) -> None: ...


def _error_record(request_id: str, start: float, error: str, status: int | None, round_index: int,
                  input_tokens: int) -> RequestRecord:
    return RequestRecord(request_id, start, None, input_tokens=input_tokens, success=False, error=error,
                         status=status, round=round_index)


class HttpBackend:
    """OpenAI /v1/completions or /v1/chat/completions with SSE streaming and include_usage."""

    def __init__(self, url: str, api: str, model: str | None, api_key: str | None,
                 tokenizer: Tokenizer | None, ignore_eos: bool = True, timeout_s: float = 600.0) -> None:
        self.base = url.rstrip("/").removesuffix("/v1")
        self.api = api
        self.model = model
        self.tokenizer = tokenizer
        self.ignore_eos = ignore_eos
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No pool limit or pool timeout: the arrival schedule, not the client, decides concurrency.
        self.client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.description = f"{url} ({api})"

    async def preflight(self) -> str:
        """Check the server answers and accepts the key; return the model name to send."""
        try:
            response = await self.client.get(f"{self.base}/v1/models")
        except httpx.HTTPError as exc:
            raise UsageError(f"cannot reach {self.base}: {_describe(exc)}") from None
        if response.status_code in (401, 403):
            raise UsageError(f"{self.base} rejected the API key (HTTP {response.status_code} "
                             f"{response.reason_phrase}): pass the right --api-key")
        served: list[str] = []
        if response.status_code == 200:
            try:
                served = [m["id"] for m in response.json().get("data", [])]
            except (ValueError, KeyError, TypeError, AttributeError):
                served = []
        if self.model and (not served or self.model in served):
            return self.model
        if len(served) == 1:
            return served[0]  # a preset alias like "r1" names the model the server happens to serve
        if served:
            raise UsageError(f"{self.base} serves {', '.join(served)}; pick one with --served-model-name")
        raise UsageError(f"{self.base}/v1/models answered HTTP {response.status_code}; "
                         "name the served model with --served-model-name")

    def _body(self, spec: RequestSpec) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": spec.output_len, "stream": True,
                                "stream_options": {"include_usage": True}, "temperature": 0.0}
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM / SGLang / r1deploy extension: exact output lengths
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": spec.prompt}]
            return "/v1/chat/completions", body
        body["prompt"] = list(spec.prompt_ids) if spec.prompt_ids is not None else spec.prompt
        return "/v1/completions", body

    async def send(self, request_id: str, spec: RequestSpec, round_index: int = -1) -> RequestRecord:
        path, body = self._body(spec)
        start = time.monotonic()
        chunks: list[float] = []
        first_reasoning = first_answer = None
        text: list[str] = []
        usage: dict[str, Any] = {}
        status = None
        try:
            async with self.client.stream("POST", self.base + path, json=body) as response:
                status = response.status_code
                if status >= 400:
                    await response.aread()
                    return _error_record(request_id, start, f"HTTP {status}: {_error_message(response)}",
                                         status, round_index, spec.input_len)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.monotonic()
                    event = json.loads(data)
                    if "error" in event:
                        message = event["error"].get("message", event["error"]) if isinstance(
                            event["error"], dict) else event["error"]
                        return _error_record(request_id, start, f"stream error: {message}", status,
                                             round_index, spec.input_len)
                    usage = event.get("usage") or usage
                    reasoning, answer = _delta(event, self.api)
                    if reasoning or answer:
                        chunks.append(now)
                        text.append(reasoning + answer)
                        if reasoning and first_reasoning is None:
                            first_reasoning = now
                        if answer and first_answer is None:
                            first_answer = now
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            return _error_record(request_id, start, _describe(exc), status, round_index, spec.input_len)
        if not chunks:
            return _error_record(request_id, start, "empty response: no token streamed", status,
                                 round_index, spec.input_len)
        tokens, source = self._output_tokens(usage, "".join(text), len(chunks))
        return RequestRecord(request_id, start, chunks[-1], tuple(chunks),
                             input_tokens=int(usage.get("prompt_tokens") or spec.input_len),
                             output_tokens=tokens, output_tokens_source=source,
                             first_reasoning=first_reasoning, first_answer=first_answer,
                             status=status, round=round_index)

    def _output_tokens(self, usage: dict[str, Any], text: str, num_chunks: int) -> tuple[int, str]:
        if usage.get("completion_tokens"):
            return int(usage["completion_tokens"]), "usage"
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text)), "tokenizer"
        return num_chunks, "chunks"

    async def close(self) -> None:
        await self.client.aclose()


def _delta(event: dict[str, Any], api: str) -> tuple[str, str]:
    """(reasoning text, answer text) of one SSE event; role-only and usage-only events give ('', '')."""
    choices = event.get("choices") or []
    if not choices:
        return "", ""
    choice = choices[0]
    if api == "chat":
        delta = choice.get("delta") or {}
        # reasoning_content: DeepSeek / r1deploy / SGLang; reasoning: newer vLLM.
        return delta.get("reasoning_content") or delta.get("reasoning") or "", delta.get("content") or ""
    return "", choice.get("text") or ""


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return str(message or response.text[:200] or response.reason_phrase)


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"connection refused or host unknown ({exc})"
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout ({type(exc).__name__})"
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed stream: not JSON ({exc.msg})"
    return f"{type(exc).__name__}: {exc}"


class EngineBackend:
    """The in-process AsyncLLMEngine. Token times are the engine's own stamps (time.monotonic, taken
    when each token was sampled), so TTFT includes queueing from the moment the request was added."""

    def __init__(self, engine: LLMEngine, chat: bool, reasoning: bool, ignore_eos: bool = True) -> None:
        from r1deploy.engine.async_engine import AsyncLLMEngine

        self.engine = engine
        self.async_engine = AsyncLLMEngine(engine)
        self.chat = chat and engine.tokenizer is not None and bool(engine.tokenizer.chat_template)
        self.reasoning = reasoning
        self.ignore_eos = ignore_eos
        self.description = "in-process engine"

    def prompt(self, spec: RequestSpec) -> str | list[int]:
        if spec.prompt_ids is not None:
            return list(spec.prompt_ids)
        assert spec.prompt is not None
        if self.chat:
            return self.engine.chat_prompt_ids([{"role": "user", "content": spec.prompt}])
        return spec.prompt

    async def send(self, request_id: str, spec: RequestSpec, round_index: int = -1) -> RequestRecord:
        from r1deploy.sampling_params import SamplingParams

        start = time.monotonic()
        params = SamplingParams(max_tokens=spec.output_len, ignore_eos=self.ignore_eos, temperature=0.0)
        last = None
        think_end_chunk: int | None = None  # index of the chunk that closed </think>
        try:
            async for output in self.async_engine.generate(self.prompt(spec), params, request_id):
                last = output
                if self.reasoning and think_end_chunk is None and THINK_END in output.text:
                    think_end_chunk = len(output.token_ids) - 1
        except Exception as exc:  # noqa: BLE001 - a failed request is data, not a crash of the run
            return _error_record(request_id, start, f"{type(exc).__name__}: {exc}", None, round_index,
                                 spec.input_len)
        if last is None or not last.token_ids:
            return _error_record(request_id, start, "no token generated", None, round_index, spec.input_len)
        m = last.metrics
        times = m.token_times
        first_reasoning, first_answer = None, times[0]
        if self.reasoning:
            # Text before </think> is reasoning (R1 templates open <think> in the prompt).
            first_reasoning = times[0]
            after = None if think_end_chunk is None else think_end_chunk + 1
            first_answer = times[after] if after is not None and after < len(times) else None
        return RequestRecord(request_id, m.arrival_time, times[-1], tuple(times),
                             input_tokens=len(last.prompt_token_ids), output_tokens=len(last.token_ids),
                             output_tokens_source="engine", first_reasoning=first_reasoning,
                             first_answer=first_answer, round=round_index)

    async def close(self) -> None:
        self.async_engine.shutdown()
