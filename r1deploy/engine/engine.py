"""LLMEngine: the engine loop (add_request / abort / step) that servers drive.

One step: Scheduler.schedule() -> build_model_input -> Executor.execute() -> append sampled tokens, detokenise, check
stop conditions -> RequestOutputs for every request that changed. With async_scheduling (the default)
step() launches step N+1, its sampled positions held by placeholder tokens filled on the GPU, before it
reads step N's tokens back, so host work overlaps the GPU; outputs arrive one step() call later.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from r1deploy.engine.block_manager import BlockManager, DataParallelBlockManager
from r1deploy.engine.detokenizer import IncrementalDetokenizer, find_stop_string, visible_text
from r1deploy.engine.generation_defaults import generation_defaults
from r1deploy.engine.model_input import build_model_input
from r1deploy.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from r1deploy.engine.request import Request, RequestStatus
from r1deploy.engine.request_checks import checked_max_tokens
from r1deploy.engine.scheduler import Scheduler, SchedulerOutput
from r1deploy.engine_config import EngineConfig
from r1deploy.layers.sampler import SamplerOutput, request_generator
from r1deploy.models.hub import resolve_model_source
from r1deploy.models.loader import LoadedModel, load_model
from r1deploy.sampling_params import SamplingParams
from r1deploy.spec import BatchProposer, make_proposer, propose_drafts
from r1deploy.spec.stats import SpecStats
from r1deploy.worker.executor import Executor, LocalExecutor
from r1deploy.worker.model_runner import ModelRunner

if TYPE_CHECKING:
    from r1deploy.structured.grammar import GrammarBackend

OUT_OF_MEMORY = "out of memory in the forward pass, the request was dropped (retry it): "


@dataclass(frozen=True)
class _InFlight:
    """A launched step whose samples the host has not read yet."""

    requests: tuple[Request, ...]  # the request of each sampled row (a verify step's 1 + k rows in a row)
    drafts: dict[int, tuple[int, ...]]  # id(request) -> the drafts its rows verify (speculative steps only)
    token_ids: torch.Tensor  # [R] int64 on the device: the next step's placeholder inputs
    host: SamplerOutput  # pinned host copies, valid once `ready` has completed
    ready: torch.cuda.Event | None  # None on the CPU, where the copies are done at once


@dataclass
class _StepStats:
    steps: int = 0  # steps launched
    launch_s: float = 0.0  # schedule + build inputs + launch
    busy_s: float = 0.0  # all of step()
    wait_s: float = 0.0  # blocked until the GPU finished a step


def _penalised(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def _needs_its_last_token(request: Request) -> bool:
    """Its next sample depends on the token sampled before it: penalties count the whole output, and a
    grammar's mask follows every accepted token. Such a request is never scheduled with a placeholder."""
    return _penalised(request.params) or request.grammar is not None


class LLMEngine:
    def __init__(
        self,
        model: str | None = None,
        *,
        config: EngineConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        load_format: str = "auto",
        loaded: LoadedModel | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        model = resolve_model_source(model, load_format=load_format)  # a Hub id: its snapshot in the Hub cache
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.executor: Executor
        if self.config.parallel.tensor_parallel_size > 1:
            if loaded is not None:
                raise ValueError("loaded: a tensor-parallel engine loads its own shards; pass the model instead")
            from r1deploy.distributed.executor import MultiprocExecutor

            self.executor = MultiprocExecutor.start(model, self.config, dtype=dtype, device=device,
                                                    load_format=load_format)
            self.loaded = self.executor.runner.loaded
        else:
            self.loaded = loaded or load_model(model, dtype=dtype, device=device, load_format=load_format,
                                               offload=self.config.offload, draft=self.config.uses_draft_model)
        self.tokenizer = self.loaded.tokenizer
        self.model_config = self.loaded.config
        self.max_model_len = self.config.max_model_len or self.model_config.max_position_embeddings
        self.sampling_defaults = generation_defaults(self.config.generation_config, self.loaded.source_dir,
                                                     self.loaded.name, self.config.override_generation_config)
        if self.config.parallel.tensor_parallel_size == 1:
            self.executor = LocalExecutor(ModelRunner(self.loaded, self.config, self.max_model_len))
        self.runner = self.executor.runner
        self.block_manager: BlockManager | DataParallelBlockManager
        # --dp-attention: one pool per rank; a request's blocks (and so its steps) live on one rank
        self.dp_rank_of: Callable[[Request], int] | None = None
        if self.runner.dp_attention:
            self.block_manager = DataParallelBlockManager(self.config.parallel.tensor_parallel_size,
                                                          self.runner.pool.num_blocks, self.config.block_size,
                                                          self.config.enable_prefix_caching)
            self.dp_rank_of = self.block_manager.rank_of
        else:
            self.block_manager = BlockManager(self.runner.pool.num_blocks, self.config.block_size,
                                              self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._finished_outside_step: list[Request] = []
        self._ids = itertools.count()
        self.num_aborted = 0
        # Overlap the host's work with the GPU's (see step). Under TP the workers fill pending tokens from
        # rank 0's broadcast samples. --dp-attention steps are split per rank on the host, and speculative
        # steps need their verified tokens on the host to propose the next drafts: both stay synchronous.
        self.proposer = make_proposer(self.config.speculative, self.model_config.vocab_size, self.runner)
        self.async_scheduling = (self.config.async_scheduling and not self.config.parallel.dp_attention
                                 and self.proposer is None)
        self._in_flight: _InFlight | None = None  # launched by the last step(), not yet processed
        self._stats = _StepStats()
        self.spec_stats = SpecStats()
        self._grammars: GrammarBackend | None = None  # built on the first structured request

    @property
    def grammars(self) -> GrammarBackend:
        """xgrammar over this model's vocabulary; compile() is thread-safe and cached, so the server
        compiles a request's grammar on its tokenizer thread before the engine thread sees it."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs: this model has no tokenizer (dummy weights)")
            from r1deploy.structured.grammar import GrammarBackend

            self._grammars = GrammarBackend(self.tokenizer, self.model_config.vocab_size, self.loaded.eos_token_ids)
        return self._grammars

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens one rank's KV pool holds: the most one sequence can use (--dp-attention: per rank)."""
        return self.runner.pool.capacity_tokens(self.config.block_size)

    @property
    def kv_capacity_tokens_total(self) -> int:
        """Tokens all KV pools hold together: --dp-attention gives each of the --tp ranks its own pool;
        otherwise the (replicated or head-split) pool is one."""
        ranks = self.config.parallel.tensor_parallel_size if self.runner.dp_attention else 1
        return ranks * self.kv_capacity_tokens

    def default_sampling_params(self) -> SamplingParams:
        """What a request without SamplingParams gets: the model's generation defaults (vLLM's
        LLM.get_default_sampling_params), SamplingParams' own for what those leave unset."""
        return SamplingParams(**self.sampling_defaults)

    # --- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Text to ids. Raw prompts get the tokenizer's BOS like vLLM's; chat-templated text already
        has it, so callers pass add_special_tokens=False for those."""
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer (dummy weights); pass token ids instead")
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def chat_prompt_ids(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                        chat_template: str | None = None, **template_kwargs: Any) -> list[int]:
        """Token ids of a conversation through the chat template (`chat_template`, else the model's own, else
        R1's for an R1-family checkpoint that has none: models/loader.LoadedModel), ready for the assistant
        turn. `tools` and `template_kwargs` (e.g. thinking switches) are the template's to use."""
        if self.tokenizer is None or not (chat_template or self.tokenizer.chat_template):
            raise ValueError("messages: this model has no chat template")
        text = self.tokenizer.apply_chat_template(messages, tools=tools, chat_template=chat_template, tokenize=False,
                                                  add_generation_prompt=True, **template_kwargs)
        return self.tokenize(text, add_special_tokens=False)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Validate and queue a request. Every check runs before anything is scheduled."""
        request = self.make_request(prompt, params, request_id, arrival_time)
        self.enqueue(request)
        return request.request_id

    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """A validated Request, not yet queued; a ValueError names the bad parameter."""
        params = params or self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise ValueError("n: the engine runs one sequence per request; LLM.generate and the "
                             "server fan out n > 1")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenize(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        max_tokens = checked_max_tokens(token_ids, params, self.model_config.vocab_size, self.max_model_len)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        request = Request(request_id, token_ids, params, max_tokens, prompt=text,
                          arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        request.generator = request_generator(params.seed, self.runner.device)
        if params.structured_outputs is not None:
            request.grammar = self.grammars.request_grammar(params.structured_outputs, token_ids)
        return request

    def enqueue(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already running")
        self.requests[request.request_id] = request
        if self.tokenizer is not None:
            self._detokenizers[request.request_id] = IncrementalDetokenizer(
                self.tokenizer, request.params.skip_special_tokens)
        self.scheduler.add(request)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; the next step() reports it with finish_reason abort."""
        request = self.requests.get(request_id)
        if request is None or request.status.finished:
            return False
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self.num_aborted += 1
        self._finished_outside_step.append(request)
        return True

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, free the KV cache and graphs, and release the expert store's
        pinned memory, if any."""
        self.executor.shutdown()
        store = self.loaded.model.offload_store
        if store is not None:
            store.close()

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or bool(self._finished_outside_step)
                or self._in_flight is not None)

    # --- the loop -------------------------------------------------------------------------------

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one step. Returns an output for every request that changed (cumulative text and tokens),
        or with final_only only for those that finished: offline callers skip building per-token
        outputs they would discard, which costs O(sequence) per request per step.

        With async scheduling a call launches step N+1 before it waits for step N (launched by the
        previous call) and returns N's outputs, so the host schedules and builds inputs while the GPU
        computes: N+1 counts each token N sampled as a placeholder, which the GPU fills in."""
        began = time.perf_counter()
        changed: list[Request] = self._finished_outside_step
        self._finished_outside_step = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and not self._can_overlap(previous):
            changed += self._process_and_finish(previous)
            previous = None
        scheduling = time.perf_counter()
        if self.proposer is not None:
            self._propose_drafts()
            self.spec_stats.draft_s += time.perf_counter() - scheduling
        verifying = time.perf_counter()  # a speculative step's time from here to its tokens accepted: verify time
        step = self.scheduler.schedule()
        out_of_memory = False
        try:
            current = self._launch(step, previous) if step.chunks else None
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            # One batch too big for the memory left: its requests fail (freeing their blocks), the engine serves on.
            current, out_of_memory = None, True
            for chunk in step.chunks:
                self._fail(chunk.request, exc, OUT_OF_MEMORY)
                changed.append(chunk.request)
        except BaseException:
            self._in_flight = previous  # its placeholders stay accounted for: a retried step finds them
            raise
        self._stats.launch_s += time.perf_counter() - scheduling
        if previous is not None:
            changed += self._process_and_finish(previous)
        rejected, stopped = None, []
        if current is not None and not self.async_scheduling:
            rejected = {}
            processed, stopped = self._process(current, rejected)
            changed += processed
            if current.drafts:
                self.spec_stats.record_verify_step(time.perf_counter() - verifying)
            current = None
        if step.chunks and not out_of_memory:
            if isinstance(self.proposer, BatchProposer):  # a draft model follows the step before any rollback
                self.proposer.after_step(step.chunks, rejected or {})
            # After `previous` was processed: the tokens this step computes K/V for are all real now. A
            # synchronous step's rejected drafts are rolled back before anything is hashed, and requests it
            # stopped are freed after their blocks are registered, as an asynchronous step's are.
            self.scheduler.update_after_step(step, rejected)
            self._stats.steps += 1
        self._finish(stopped)
        self._in_flight = current
        outputs = [self._output(r) for r in changed if r.status.finished or not final_only]
        for request in changed:
            if request.status.finished:
                self.requests.pop(request.request_id, None)
                self._detokenizers.pop(request.request_id, None)
        self._stats.busy_s += time.perf_counter() - began
        return outputs

    def _can_overlap(self, previous: _InFlight) -> bool:
        """Whether the next step may be scheduled before `previous` is processed: a penalised or
        structured-output request samples from its whole output, so it must not have a placeholder in the
        next step (a grammar's bitmask for token N+1 needs token N accepted; masking from the accepted
        tokens alone would be one token stale). Batches without such requests keep the overlap."""
        return not any(_needs_its_last_token(r) for r in previous.requests if not r.status.finished)

    def _propose_drafts(self) -> None:
        """Speculative decoding: drafts for every running request that has caught up with its newest token."""
        wanted: list[tuple[Request, int]] = []
        for request in self.scheduler.running:
            request.spec_token_ids.clear()
            room = min(self.proposer.num_speculative_tokens, request.max_tokens - request.num_output_tokens - 1,
                       self.max_model_len - request.num_tokens - 1)
            # A grammar's mask for a draft position would need the drafts accepted first: no drafts there.
            if room > 0 and request.num_computed_tokens == request.num_tokens - 1 and request.grammar is None:
                wanted.append((request, room))
        for (request, _), drafts in zip(wanted, propose_drafts(self.proposer, wanted), strict=True):
            request.spec_token_ids.extend(drafts)

    def _launch(self, step: SchedulerOutput, previous: _InFlight | None) -> _InFlight | None:
        """Launch a step on the device and start copying its samples to the host; waits for nothing."""
        model_input, row_requests = build_model_input(step.chunks, None if previous is None else previous.requests,
                                        self.config.block_size, self.runner.device.type == "cuda",
                                        self.model_config.vocab_size, self.dp_rank_of,
                                        self.config.parallel.tensor_parallel_size)
        sampled = self.executor.execute(model_input, None if previous is None else previous.token_ids)
        if sampled is None:
            return None
        drafts = {id(c.request): c.draft_token_ids for c in step.chunks if c.draft_token_ids}
        for chunk in step.chunks:
            chunk.request.spec_token_ids.clear()
            if chunk.samples and not chunk.draft_token_ids:
                chunk.request.num_placeholders += 1
        host, ready = sampled.to_host()
        return _InFlight(row_requests, drafts, sampled.token_ids, host, ready)

    def _process(self, step: _InFlight, rejected: dict[int, int] | None = None
                 ) -> tuple[list[Request], list[tuple[Request, RequestStatus]]]:
        """Wait for a launched step's samples and append them. A request that finished since the step
        was scheduled (ended by the step before it, or aborted) discards its token: its blocks are
        already free, and its seeded generator is never used again. A verify step's rows give the target's
        token after the newest token and after each draft: the drafts are accepted while they equal those
        tokens, and the first differing token (or the one after the last draft) is appended too. That is
        exact rejection sampling for drafts proposed as single tokens: a draft d is kept with probability
        p(d), and a rejected position emits p renormalised without d. rejected[id(request)]: drafts whose
        K/V the scheduler rolls back. Returns the changed requests and those a stop condition ended, which
        the caller finishes (frees) once the step's blocks are settled."""
        if step.ready is not None:
            began = time.perf_counter()
            step.ready.synchronize()
            self._stats.wait_s += time.perf_counter() - began
        sampled = step.host
        token_ids = sampled.token_ids.tolist()
        logprobs = sampled.logprobs.tolist()
        top = None
        if sampled.top_logprobs is not None:
            top = (sampled.top_logprobs_ids.tolist(), sampled.top_logprobs.tolist())
        now = time.monotonic()
        changed: list[Request] = []
        stopped: list[tuple[Request, RequestStatus]] = []
        row = 0
        while row < len(step.requests):
            request = step.requests[row]
            drafts = step.drafts.get(id(request), ())
            first, row = row, row + 1 + len(drafts)
            if not drafts:
                request.num_placeholders -= 1
            if request.status.finished:
                continue
            accepted = 0
            while accepted < len(drafts) and token_ids[first + accepted] == drafts[accepted]:
                accepted += 1
            if drafts:
                self.spec_stats.record(len(drafts), accepted)
            appended = 0
            try:
                for i in range(first, first + accepted + 1):
                    top_row = None if top is None else dict(zip(top[0][i], top[1][i], strict=True))
                    status = self._append_token(request, token_ids[i], logprobs[i], top_row, now)
                    appended += 1
                    if status is not None:
                        stopped.append((request, status))
                        break
            except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the others
                self._fail(request, exc)
            if rejected is not None and drafts:  # the cache keeps K/V up to the newest appended token's
                rejected[id(request)] = len(drafts) + 1 - appended
            changed.append(request)
        return changed, stopped

    def _process_and_finish(self, step: _InFlight) -> list[Request]:
        changed, stopped = self._process(step)
        self._finish(stopped)
        return changed

    def _finish(self, stopped: list[tuple[Request, RequestStatus]]) -> None:
        for request, status in stopped:
            if not request.status.finished:
                self.scheduler.finish(request, status)

    def step_stats(self) -> dict[str, float]:
        """Host overhead per launched step since the last reset_step_stats(): launch_ms (schedule, build
        the inputs, launch), host_ms (everything step() does but wait) and wait_ms (blocked on the GPU)."""
        stats, n = self._stats, max(1, self._stats.steps)
        return {"steps": stats.steps, "launch_ms_per_step": stats.launch_s * 1e3 / n,
                "host_ms_per_step": (stats.busy_s - stats.wait_s) * 1e3 / n,
                "wait_ms_per_step": stats.wait_s * 1e3 / n}

    def reset_step_stats(self) -> None:
        self._stats = _StepStats()

    def _append_token(self, request: Request, token: int, logprob: float,
                      top: dict[int, float] | None, now: float) -> RequestStatus | None:
        """Append one sampled token; returns the status it ends the request with, if it does."""
        if request.grammar is not None:
            request.grammar.accept(token)
        request.output_token_ids.append(token)
        request.token_times.append(now)
        if request.first_token_time is None:
            request.first_token_time = now
        if request.params.logprobs is not None:
            request.logprobs.append(logprob)
            if top is not None:
                request.top_logprobs.append({t: lp for t, lp in list(top.items())[: request.params.logprobs]})
        return self._stop_status(request, token)

    def _fail(self, request: Request, exc: BaseException, what: str = "") -> None:
        request.error = f"{what}{type(exc).__name__}: {exc}"
        if not request.status.finished:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.params
        new_text_len = 0
        detok = self._detokenizers.get(request.request_id)
        if detok is not None:
            delta = detok.step(request.output_token_ids)
            request.output_text += delta
            new_text_len = len(delta)
        past_min = request.num_output_tokens >= params.min_tokens
        if past_min and not params.ignore_eos and token in self.loaded.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if past_min and token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if past_min and params.stop and new_text_len:
            hit = find_stop_string(request, new_text_len)
            if hit is not None:
                request.stop_reason, index = hit
                request.output_text = request.output_text[:index]
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _output(self, request: Request) -> RequestOutput:
        want_logprobs = request.params.logprobs is not None
        completion = CompletionOutput(
            index=0,
            text=visible_text(request),
            token_ids=tuple(request.output_token_ids),
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            error=request.error,
            logprobs=tuple(request.logprobs) if want_logprobs else None,
            top_logprobs=tuple(request.top_logprobs) if want_logprobs and request.params.logprobs else None,
            metrics=RequestMetrics(request.arrival_time, request.first_token_time, tuple(request.token_times),
                                   request.finish_time, request.num_cached_tokens, request.num_preemptions,
                                   request.first_scheduled_time),
        )
        return RequestOutput(request.request_id, request.prompt, tuple(request.prompt_token_ids), (completion,))
