"""LLM: the offline Python API, `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.outputs import RequestOutput
from r1deploy.engine_config import EngineConfig, ParallelConfig, SpeculativeConfig
from r1deploy.models.hub import resolve_model_source
from r1deploy.sampling_params import SamplingParams

Prompt = str | list[int]


def fan_out(params: SamplingParams) -> list[SamplingParams]:
    """n > 1 becomes n single-sequence requests; seeded ones get seed + i so they differ yet repeat."""
    if params.n == 1:
        return [params]
    return [dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            for i in range(params.n)]


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str | None = None, device: str | None = None,
                 load_format: str = "auto", tensor_parallel_size: int = 1, revision: str | None = None,
                 download_dir: str | None = None, **engine_options: object) -> None:
        """model: a Hugging Face Hub id (org/name, downloaded into the Hub cache), a model directory, a .gguf file
        or a preset name. engine_options: EngineConfig's fields (generation_config, max_model_len, ...)."""
        model = resolve_model_source(model, revision=revision, download_dir=download_dir, load_format=load_format)
        if tensor_parallel_size != 1:
            engine_options.setdefault("parallel", ParallelConfig(tensor_parallel_size=tensor_parallel_size))
        speculative = engine_options.pop("speculative_config", None)  # vLLM's name and dict form
        if speculative is not None:
            engine_options["speculative"] = SpeculativeConfig.of(speculative)
        self.engine = LLMEngine(model, config=EngineConfig(**engine_options),  # type: ignore[arg-type]
                                dtype=dtype, device=device, load_format=load_format)

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (a no-op in one process)."""
        self.engine.shutdown()

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's generation defaults (--generation-config), used when generate gets no SamplingParams."""
        return self.engine.default_sampling_params()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.engine.chat_prompt_ids(messages)], params)[0]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) and return outputs in prompt order.

        All requests are validated before any is queued, so a bad one leaves the engine untouched."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None or isinstance(params, SamplingParams):
            params = [params or self.get_default_sampling_params()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        staged = [(index, engine.make_request(prompt, child))
                  for index, (prompt, p) in enumerate(zip(prompts, params, strict=True))
                  for child in fan_out(p)]
        for _, request in staged:
            engine.enqueue(request)
        queued = [(index, request.request_id) for index, request in staged]
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(queued):
            for output in engine.step(final_only=True):
                if output.finished:
                    finished[output.request_id] = output
        results: list[RequestOutput] = []
        for index in range(len(prompts)):
            children = [finished[rid] for i, rid in queued if i == index]
            outputs = tuple(dataclasses.replace(c.outputs[0], index=k) for k, c in enumerate(children))
            results.append(dataclasses.replace(children[0], outputs=outputs))
        return results
