"""ServerSettings (fixed at start) and ServerState (the server's lifecycle and live counters)."""

from __future__ import annotations

import enum
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from r1deploy.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from r1deploy.engine.async_engine import AsyncLLMEngine
    from r1deploy.engine.engine import LLMEngine

# vLLM spells it deepseek_r1, SGLang deepseek-r1; both are the same <think> splitter.
REASONING_PARSER_ALIASES = {"deepseek-r1": "deepseek-r1", "deepseek_r1": "deepseek-r1", "none": "none"}
REASONING_PARSERS = tuple(REASONING_PARSER_ALIASES)


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str | None = None  # default: the loaded model's name
    api_key: str | None = None  # None: no authentication
    reasoning_parser: str | None = None  # None: deepseek-r1 if the vocabulary has </think>, else none
    # Engine requests admitted beyond the engine's max_num_seqs running ones; past both, 429.
    max_queue: int = 1024
    max_body_bytes: int = 1 << 20
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    metrics_public: bool = False  # serve /metrics without the API key (scrapers often hold none)
    allowed_origins: tuple[str, ...] = ()  # CORS allow-list; empty: no CORS headers at all
    metrics_prefix: str = "r1deploy"  # the vLLM-compatible series: r1deploy:... or vllm:... (vllm_metrics.py)
    sse_keepalive_s: float = 15.0  # an SSE comment after this long without a chunk; 0: never
    chat_template: str | None = None  # --chat-template: replaces the model's own
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # under each request's own

    def __post_init__(self) -> None:
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, got {self.reasoning_parser!r}")
        if self.reasoning_parser is not None:  # one spelling downstream
            object.__setattr__(self, "reasoning_parser", REASONING_PARSER_ALIASES[self.reasoning_parser])
        if self.max_queue < 0 or self.max_body_bytes < 1 or self.drain_timeout_s < 0 or self.sse_keepalive_s < 0:
            raise ValueError("max_queue, drain_timeout_s and sse_keepalive_s must be >= 0, max_body_bytes >= 1")


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"  # the model did not load, or the engine loop died: the process must restart


@dataclass
class ServerState:
    settings: ServerSettings
    phase: Phase = Phase.LOADING
    engine: AsyncLLMEngine | None = None
    model_name: str = ""
    reasoning: bool = False  # split <think> output into reasoning_content
    load_error: BaseException | None = None  # why loading failed (an engine death is engine.error)
    in_flight: int = 0  # HTTP requests on /v1 not yet fully answered (drain waits for 0)
    num_admitted: int = 0  # engine requests admitted and not finished (running + queued)
    # Tokenising and chat templating run here, off the event loop (a huge prompt must not stall
    # other streams); one worker, because a fast tokenizer is not meant to be shared across threads.
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="r1deploy-tokenize"))
    metrics: ServerMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(lambda: self.llm_engine, self.settings.metrics_prefix, lambda: self.model_name)

    @property
    def llm_engine(self) -> LLMEngine | None:
        return None if self.engine is None else self.engine.engine

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        engine = self.llm_engine
        assert engine is not None  # the gate admits /v1 only when ready
        return engine.sampling_defaults

    @property
    def engine_alive(self) -> bool:
        return self.engine is not None and self.engine.error is None and self.engine.is_running

    @property
    def engine_failed(self) -> bool:
        """The engine loop died (not a normal shutdown, which leaves no error)."""
        return self.engine is not None and self.engine.error is not None

    @property
    def capacity(self) -> int:
        """Engine requests admitted at once: max_num_seqs running plus max_queue waiting."""
        engine = self.llm_engine
        assert engine is not None
        return engine.config.max_num_seqs + self.settings.max_queue

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY and self.engine_alive
