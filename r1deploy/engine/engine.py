"""LLMEngine: the engine loop (add_request / abort / step) that servers drive.

One step: Scheduler.schedule() -> ModelRunner.run() -> append sampled tokens, detokenise, check
stop conditions -> RequestOutputs for every request that changed. With async_scheduling (the default)
step() launches step N+1, its sampled positions held by placeholder tokens filled on the GPU, before it
reads step N's tokens back, so host work overlaps the GPU; outputs arrive one step() call later.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from r1deploy.engine.block_manager import BlockManager, DataParallelBlockManager
from r1deploy.engine.config import EngineConfig
from r1deploy.engine.detokenizer import IncrementalDetokenizer, find_stop_string, visible_text
from r1deploy.engine.model_runner import ModelRunner, PreviousSamples
from r1deploy.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from r1deploy.engine.request import Request, RequestStatus
from r1deploy.engine.scheduler import Scheduler, SchedulerOutput
from r1deploy.layers.sampler import SamplerOutput, request_generator
from r1deploy.models.loader import LoadedModel, load_model
from r1deploy.sampling_params import SamplingParams


@dataclass(frozen=True)
class _InFlight:
    """A launched step whose samples the host has not read yet."""

    requests: tuple[Request, ...]  # the request of each sampled row
    token_ids: torch.Tensor  # [B] int64 on the device: the next step's placeholder inputs
    host: SamplerOutput  # pinned host copies, valid once `ready` has completed
    ready: torch.cuda.Event | None  # None on the CPU, where the copies are done at once

    def samples(self) -> PreviousSamples:
        return PreviousSamples(self.token_ids, self.requests)


@dataclass
class _StepStats:
    steps: int = 0  # steps launched
    launch_s: float = 0.0  # schedule + build inputs + launch
    busy_s: float = 0.0  # all of step()
    wait_s: float = 0.0  # blocked until the GPU finished a step


def _penalised(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


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
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tp_runtime = None  # tensor parallel: worker processes and rank 0's shard (r1deploy.distributed)
        if self.config.parallel.tensor_parallel_size > 1:
            if loaded is not None:
                raise ValueError("loaded: a tensor-parallel engine loads its own shards; pass the model instead")
            from r1deploy.distributed.worker import TPRuntime

            self.tp_runtime = TPRuntime.start(model, self.config, dtype=dtype, device=device,
                                              load_format=load_format)
            loaded = self.tp_runtime.loaded
        self.loaded = loaded or load_model(model, dtype=dtype, device=device, load_format=load_format,
                                           offload=self.config.offload)
        self.tokenizer = self.loaded.tokenizer
        self.model_config = self.loaded.config
        self.max_model_len = self.config.max_model_len or self.model_config.max_position_embeddings
        if self.tp_runtime is not None:
            self.runner = self.tp_runtime.runner
        else:
            self.runner = ModelRunner(self.loaded, self.config, self.max_model_len)
        self.block_manager: BlockManager | DataParallelBlockManager
        if getattr(self.runner, "dp_attention", False):  # --dp-attention: one pool per rank, its own requests
            self.block_manager = DataParallelBlockManager(self.config.parallel.tensor_parallel_size,
                                                          self.runner.pool.num_blocks, self.config.block_size,
                                                          self.config.enable_prefix_caching)
            self.runner.dp_rank_of = self.block_manager.rank_of
        else:
            self.block_manager = BlockManager(self.runner.pool.num_blocks, self.config.block_size,
                                              self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._finished_outside_step: list[Request] = []
        self._ids = itertools.count()
        self.num_aborted = 0
        # Overlap the host's work with the GPU's (see step). Tensor parallel stays synchronous: the
        # workers would need the placeholder tokens, which only rank 0 samples.
        # Under TP the workers fill pending tokens from rank 0's broadcast samples; --dp-attention steps
        # are split per rank on the host and stay synchronous.
        self.async_scheduling = self.config.async_scheduling and not self.config.parallel.dp_attention
        self._in_flight: _InFlight | None = None  # launched by the last step(), not yet processed
        self._stats = _StepStats()

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens one rank's KV pool holds: the most one sequence can use (--dp-attention: per rank)."""
        return self.runner.pool.capacity_tokens(self.config.block_size)

    @property
    def kv_capacity_tokens_total(self) -> int:
        """Tokens all KV pools hold together: --dp-attention gives each of the --tp ranks its own pool;
        otherwise the (replicated or head-split) pool is one."""
        ranks = self.config.parallel.tensor_parallel_size if getattr(self.runner, "dp_attention", False) else 1
        return ranks * self.kv_capacity_tokens

    # --- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Text to ids. Raw prompts get the tokenizer's BOS like vLLM's; chat-templated text already
        has it, so callers pass add_special_tokens=False for those."""
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer (dummy weights); pass token ids instead")
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the model's chat template (R1's for an R1-family checkpoint that
        has none: models/loader.LoadedModel), ready for the assistant turn."""
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise ValueError("messages: this model has no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise ValueError("n: the engine runs one sequence per request; LLM.generate and the "
                             "server fan out n > 1")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenize(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        if not token_ids:
            raise ValueError("prompt: empty prompt")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in token_ids):
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens, but max_model_len is {self.max_model_len} "
                             "(and at least one token must be generated)")
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(f"max_tokens: prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) "
                             f"exceeds max_model_len ({self.max_model_len})")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        request = Request(request_id, token_ids, params, max_tokens, prompt=text,
                          arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        request.generator = request_generator(params.seed, self.runner.device)
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
        self.runner.release()  # first: captured graphs hold NCCL work that would stall the group's teardown
        if self.tp_runtime is not None:
            self.tp_runtime.shutdown()
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
            changed += self._process(previous)
            previous = None
        scheduling = time.perf_counter()
        step = self.scheduler.schedule()
        current = self._launch(step, previous) if step.chunks else None
        self._stats.launch_s += time.perf_counter() - scheduling
        if previous is not None:
            changed += self._process(previous)
        if step.chunks:
            # After `previous` was processed: the tokens this step computes K/V for are all real now.
            self.scheduler.update_after_step(step)
            self._stats.steps += 1
        if current is not None:
            if self.async_scheduling:
                self._in_flight = current
            else:
                changed += self._process(current)
        outputs = [self._output(r) for r in changed if r.status.finished or not final_only]
        for request in changed:
            if request.status.finished:
                self.requests.pop(request.request_id, None)
                self._detokenizers.pop(request.request_id, None)
        self._stats.busy_s += time.perf_counter() - began
        return outputs

    def _can_overlap(self, previous: _InFlight) -> bool:
        """Whether the next step may be scheduled before `previous` is processed: a penalised request
        samples from its whole output, so it must not have a placeholder in the next step."""
        return not any(_penalised(r.params) for r in previous.requests if not r.status.finished)

    def _launch(self, step: SchedulerOutput, previous: _InFlight | None) -> _InFlight | None:
        """Launch a step on the device and start copying its samples to the host; waits for nothing."""
        if self.tp_runtime is not None:
            sampled = self.tp_runtime.run(step, self.model_config.vocab_size,
                                          None if previous is None else previous.samples())
        else:
            sampled = self.runner.run(step, self.model_config.vocab_size,
                                      None if previous is None else previous.samples())
        if sampled is None:
            return None
        requests = tuple(c.request for c in step.chunks if c.samples)
        for request in requests:
            request.num_placeholders += 1
        host, ready = sampled.to_host()
        return _InFlight(requests, sampled.token_ids, host, ready)

    def _process(self, step: _InFlight) -> list[Request]:
        """Wait for a launched step's samples and append them. A request that finished since the step
        was scheduled (ended by the step before it, or aborted) discards its token: its blocks are
        already free, and its seeded generator is never used again."""
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
        for row, request in enumerate(step.requests):
            request.num_placeholders -= 1
            if request.status.finished:
                continue
            top_row = None if top is None else dict(zip(top[0][row], top[1][row], strict=True))
            try:
                self._append_token(request, token_ids[row], logprobs[row], top_row, now)
            except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the others
                self._fail(request, exc)
            changed.append(request)
        return changed

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
                      top: dict[int, float] | None, now: float) -> None:
        request.output_token_ids.append(token)
        request.token_times.append(now)
        if request.first_token_time is None:
            request.first_token_time = now
        if request.params.logprobs is not None:
            request.logprobs.append(logprob)
            if top is not None:
                request.top_logprobs.append({t: lp for t, lp in list(top.items())[: request.params.logprobs]})
        status = self._stop_status(request, token)
        if status is not None:
            self.scheduler.finish(request, status)

    def _fail(self, request: Request, exc: Exception) -> None:
        request.error = f"{type(exc).__name__}: {exc}"
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
                                   request.finish_time, request.num_cached_tokens, request.num_preemptions),
        )
        return RequestOutput(request.request_id, request.prompt, tuple(request.prompt_token_ids), (completion,))
