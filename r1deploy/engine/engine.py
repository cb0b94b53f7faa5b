"""LLMEngine: the synchronous engine loop (add_request / abort / step) that servers drive.

One step: Scheduler.schedule() -> ModelRunner.run() -> append sampled tokens, detokenise, check
stop conditions -> RequestOutputs for every request that changed.
"""

from __future__ import annotations

import itertools
import time

import torch

from r1deploy.engine.block_manager import BlockManager
from r1deploy.engine.config import EngineConfig
from r1deploy.engine.detokenizer import IncrementalDetokenizer, find_stop_string, visible_text
from r1deploy.engine.model_runner import ModelRunner
from r1deploy.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from r1deploy.engine.request import Request, RequestStatus
from r1deploy.engine.scheduler import Scheduler
from r1deploy.layers.sampler import request_generator
from r1deploy.models.loader import LoadedModel, load_model
from r1deploy.sampling_params import SamplingParams


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
        self.block_manager = BlockManager(self.runner.pool.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._finished_outside_step: list[Request] = []
        self._ids = itertools.count()
        self.num_aborted = 0

    @property
    def kv_capacity_tokens(self) -> int:
        return self.runner.pool.capacity_tokens(self.config.block_size)

    # --- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Text to ids. Raw prompts get the tokenizer's BOS like vLLM's; chat-templated text already
        has it, so callers pass add_special_tokens=False for those."""
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer (dummy weights); pass token ids instead")
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the model's chat template, ready for the assistant turn."""
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
        """Stop the tensor-parallel workers and release the expert store's pinned memory, if any."""
        if self.tp_runtime is not None:
            self.tp_runtime.shutdown()
        store = getattr(self.loaded.model, "expert_store", None)
        if store is not None:
            store.close()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finished_outside_step)

    # --- the loop -------------------------------------------------------------------------------

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one step. Returns an output for every request that changed (cumulative text and tokens),
        or with final_only only for those that finished: offline callers skip building per-token
        outputs they would discard, which costs O(sequence) per request per step."""
        changed: list[Request] = self._finished_outside_step
        self._finished_outside_step = []
        step = self.scheduler.schedule()
        if step.chunks:
            run = self.runner.run if self.tp_runtime is None else self.tp_runtime.run
            sampled = run(step, self.model_config.vocab_size)
            self.scheduler.update_after_step(step)
            now = time.monotonic()
            if sampled is not None:
                token_ids = sampled.token_ids.tolist()
                logprobs = sampled.logprobs.tolist()
                top = None
                if sampled.top_logprobs is not None:
                    top = (sampled.top_logprobs_ids.tolist(), sampled.top_logprobs.tolist())
                row = 0
                for chunk in step.chunks:
                    if not chunk.samples:
                        continue
                    request = chunk.request
                    top_row = None if top is None else dict(zip(top[0][row], top[1][row], strict=True))
                    try:
                        self._append_token(request, token_ids[row], logprobs[row], top_row, now)
                    except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the others
                        self._fail(request, exc)
                    row += 1
                    changed.append(request)
        outputs = [self._output(r) for r in changed if r.status.finished or not final_only]
        for request in changed:
            if request.status.finished:
                self.requests.pop(request.request_id, None)
                self._detokenizers.pop(request.request_id, None)
        return outputs

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
