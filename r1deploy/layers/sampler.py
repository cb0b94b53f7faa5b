"""Sampler: turns the last-position logits of a step into one token per sequence.

The engine builds a `SamplingBatch` once per step (host lists -> device tensors), then calls
`Sampler()(logits, batch)`. Processing order, per row:

    grammar bitmask + logit_bias -> penalties -> min_tokens mask -> temperature -> top-k -> top-p -> min-p
    -> sample

Greedy rows take the argmax after the penalties and the min_tokens mask (temperature and the
filters never change the argmax). Returned logprobs are vLLM's default "raw" logprobs:
log-softmax of the model's logits before any of the processing above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from r1deploy.sampling_params import SamplingParams


def request_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The per-request generator the engine keeps for a seeded request's whole lifetime (its state
    advances every step), or None for an unseeded request, which draws from the global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32: raw logprob of each sampled token
    top_logprobs_ids: torch.Tensor | None  # [B, N] int64, most likely first; None if no row asks
    top_logprobs: torch.Tensor | None  # [B, N] float32, descending

    def to_host(self) -> tuple[SamplerOutput, torch.cuda.Event | None]:
        """Start copying every tensor into pinned host memory without waiting for the GPU. The copies
        are valid once the returned event has completed; on the CPU they are done at once (no event)."""
        if self.token_ids.device.type != "cuda":
            return self, None

        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
                t, non_blocking=True)

        host = SamplerOutput(copy(self.token_ids), copy(self.logprobs), copy(self.top_logprobs_ids),
                             copy(self.top_logprobs))
        ready = torch.cuda.Event()
        ready.record()
        return host, ready


@dataclass(frozen=True)
class SamplingBatch:
    """Per-step sampling inputs as device tensors. Greedy rows carry neutral filter values
    (temperature 1, no top-k/top-p/min-p) so the vectorised math leaves them alone."""

    vocab_size: int
    temperatures: torch.Tensor  # [B] float32
    greedy: torch.Tensor  # [B] bool
    top_ks: torch.Tensor  # [B] int64, vocab_size = off
    top_ps: torch.Tensor  # [B] float32, 1.0 = off
    min_ps: torch.Tensor  # [B] float32, 0.0 = off
    repetition_penalties: torch.Tensor  # [B] float32
    presence_penalties: torch.Tensor  # [B] float32
    frequency_penalties: torch.Tensor  # [B] float32
    # Token histories padded with vocab_size (an out-of-range id that lands in a scratch column).
    # None when no row needs them: prompts only matter to the repetition penalty.
    prompt_ids: torch.Tensor | None  # [B, max_prompt_len] int64
    output_ids: torch.Tensor | None  # [B, max_output_len] int64
    banned_ids: torch.Tensor | None  # [B, K] int64: EOS/stop ids masked by min_tokens, padded
    bias_ids: torch.Tensor | None  # [B, K] int64: logit_bias token ids, padded with vocab_size
    bias_values: torch.Tensor | None  # [B, K] float32: the biases (0 in the padding)
    # Structured output: the batch's allowed tokens, one bit each (r1deploy.structured); None if no row is
    # constrained. Built by the engine from each request's grammar, passed in explicitly.
    token_bitmask: torch.Tensor | None  # [B, ceil(V / 32)] int32
    generators: tuple[torch.Generator | None, ...]  # per row; only sampled (non-greedy) rows use it
    greedy_cpu: tuple[bool, ...]  # `greedy` on the host, for the per-row generator loop
    max_num_logprobs: int | None  # N for the top-logprobs tensors; None when no row asks
    # Host-side flags so fast paths skip work without a device sync.
    all_greedy: bool
    do_penalties: bool
    do_top_k: bool
    do_top_p: bool
    do_min_p: bool

    @property
    def num_rows(self) -> int:
        return len(self.generators)

    @staticmethod
    def build(
        params_list: Sequence[SamplingParams],
        prompt_ids_list: Sequence[Sequence[int]],
        output_ids_list: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: Sequence[int] = (),
        num_output_tokens: Sequence[int] | None = None,
        token_bitmask: torch.Tensor | None = None,
    ) -> SamplingBatch:
        """num_output_tokens: each row's output length when it counts tokens still on the device (async
        scheduling), for the min_tokens mask; default len(output ids). Penalised rows need their whole
        output in output_ids_list, so the engine never samples them with tokens pending."""
        if not params_list:
            raise ValueError("SamplingBatch needs at least one row")
        if num_output_tokens is None:
            num_output_tokens = [len(o) for o in output_ids_list]
        rows = list(zip(params_list, prompt_ids_list, output_ids_list, generators, num_output_tokens,
                        strict=True))

        temperatures: list[float] = []
        greedy: list[bool] = []
        top_ks: list[int] = []
        top_ps: list[float] = []
        min_ps: list[float] = []
        prompts: list[list[int]] = []
        outputs: list[list[int]] = []
        banned: list[list[int]] = []
        for p, prompt, output, _, num_output in rows:
            greedy.append(p.greedy)
            temperatures.append(1.0 if p.greedy else p.temperature)
            top_ks.append(vocab_size if p.greedy or p.top_k == 0 else min(p.top_k, vocab_size))
            top_ps.append(1.0 if p.greedy else p.top_p)
            min_ps.append(0.0 if p.greedy else p.min_p)
            # Rows without a penalty contribute empty histories: their neutral penalty values would
            # make the math a no-op anyway, and this keeps the host-to-device copy small.
            repetition = p.repetition_penalty != 1.0
            prompts.append(list(prompt) if repetition else [])
            penalised = repetition or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            assert not penalised or num_output == len(output), "a penalised row needs its whole output"
            outputs.append(list(output) if penalised else [])
            # min_tokens masks every id that would end the request; EOS only when it is honoured.
            ending: list[int] = []
            if num_output < p.min_tokens:
                ending = [*p.stop_token_ids, *([] if p.ignore_eos else eos_token_ids)]
            banned.append([i for i in ending if 0 <= i < vocab_size])
        # Prompts only matter to the repetition penalty, outputs to all three penalties.
        # Host tensors bound for a GPU are pinned, so their copies do not block the host.
        pin = torch.device(device).type == "cuda"
        prompt_ids = _pad(prompts, vocab_size, pin) if any(prompts) else None
        output_ids = _pad(outputs, vocab_size, pin) if any(prompts) or any(outputs) else None
        banned_ids = _pad(banned, vocab_size, pin) if any(banned) else None
        biases = [p.logit_bias for p, *_ in rows]
        bias_ids = bias_values = None
        if any(biases):
            bias_ids = _pad([[t for t, _ in b] for b in biases], vocab_size, pin)
            width = bias_ids.shape[1]
            bias_values = torch.tensor([[v for _, v in b] + [0.0] * (width - len(b)) for b in biases],
                                       dtype=torch.float32, pin_memory=pin)

        requested = [p.logprobs for p, *_ in rows if p.logprobs is not None]

        def on_device(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, pin_memory=pin).to(device, non_blocking=True)

        def maybe_on_device(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return SamplingBatch(
            vocab_size=vocab_size,
            temperatures=on_device(temperatures, torch.float32),
            greedy=on_device(greedy, torch.bool),
            top_ks=on_device(top_ks, torch.int64),
            top_ps=on_device(top_ps, torch.float32),
            min_ps=on_device(min_ps, torch.float32),
            repetition_penalties=on_device([p.repetition_penalty for p in params_list], torch.float32),
            presence_penalties=on_device([p.presence_penalty for p in params_list], torch.float32),
            frequency_penalties=on_device([p.frequency_penalty for p in params_list], torch.float32),
            prompt_ids=maybe_on_device(prompt_ids),
            output_ids=maybe_on_device(output_ids),
            banned_ids=maybe_on_device(banned_ids),
            bias_ids=maybe_on_device(bias_ids),
            bias_values=maybe_on_device(bias_values),
            token_bitmask=maybe_on_device(token_bitmask),
            generators=tuple(generators),
            greedy_cpu=tuple(greedy),
            max_num_logprobs=max(requested) if requested else None,
            all_greedy=all(greedy),
            do_penalties=output_ids is not None,
            do_top_k=any(k < vocab_size for k in top_ks),
            do_top_p=any(p < 1.0 for p in top_ps),
            do_min_p=any(m > 0.0 for m in min_ps),
        )


def _pad(rows: list[list[int]], pad: int, pin_memory: bool) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))  # at least one column so scatter has a valid shape
    out = torch.full((len(rows), width), pad, dtype=torch.int64, pin_memory=pin_memory)  # [B, width]
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out


def _bincount_rows(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-row token counts [B, V] from ids [B, L] padded with vocab_size (the extra column
    absorbs the padding and is dropped)."""
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty over prompt + output (HF / vLLM), then OpenAI presence and frequency
    penalties over the output only. Returns a new tensor. logits: [B, V]."""
    assert batch.output_ids is not None
    vocab = batch.vocab_size
    output_counts = _bincount_rows(batch.output_ids, vocab)  # [B, V]
    output_seen = output_counts > 0  # [B, V]
    seen = output_seen
    if batch.prompt_ids is not None:
        seen = seen | (_bincount_rows(batch.prompt_ids, vocab) > 0)
    rep = batch.repetition_penalties.unsqueeze(1)  # [B, 1]
    # Dividing a positive logit and multiplying a negative one both make the token less likely.
    penalised = torch.where(logits > 0, logits / rep, logits * rep)  # [B, V]
    logits = torch.where(seen, penalised, logits)
    logits = logits - batch.frequency_penalties.unsqueeze(1) * output_counts
    return logits - batch.presence_penalties.unsqueeze(1) * output_seen


def apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask (-inf) tokens outside each row's top-k, then outside its top-p nucleus, with one sort.
    Tokens tied with the k-th largest logit are all kept. logits: [B, V]."""
    sorted_logits, order = logits.sort(dim=-1)  # [B, V] ascending
    vocab = batch.vocab_size
    if batch.do_top_k:
        # top_ks == V for rows without top-k: index 0, the row minimum, which masks nothing.
        kth_largest = sorted_logits.gather(1, (vocab - batch.top_ks).unsqueeze(1))  # [B, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, -math.inf)
    if batch.do_top_p:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V] mass at or below each token
        # Drop a token when everything at or below it is <= 1 - p: the tokens above it reach p alone.
        drop = cumulative <= (1.0 - batch.top_ps).unsqueeze(1)
        drop[:, -1] = False  # the most likely token always survives rounding in the cumsum
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask tokens with p < min_p * p_max. In log space the softmax normaliser cancels:
    logit < max_logit + log(min_p); log(0) = -inf masks nothing. logits: [B, V]."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(batch.min_ps).unsqueeze(1)  # [B, 1]
    return logits.masked_fill(logits < threshold, -math.inf)


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [B, V] for the last position of each sequence, rows in `batch` order."""
        raw = logits.float()  # [B, V]; bf16 model outputs are upcast so logprobs are exact enough
        logits = self.process(raw, batch)
        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)  # [B]
        else:
            sampled = self._sample(logits, batch)  # [B]
            token_ids = torch.where(batch.greedy, logits.argmax(dim=-1), sampled)

        # Raw logprobs without materialising a [B, V] log-softmax: logit - logsumexp.
        normaliser = torch.logsumexp(raw, dim=-1)  # [B]
        logprobs = raw.gather(1, token_ids.unsqueeze(1)).squeeze(1) - normaliser  # [B]
        top_ids = top_values = None
        if batch.max_num_logprobs is not None:
            top_raw, top_ids = raw.topk(batch.max_num_logprobs, dim=-1)  # [B, N], sorted descending
            top_values = top_raw - normaliser.unsqueeze(1)
        return SamplerOutput(
            token_ids=token_ids, logprobs=logprobs, top_logprobs_ids=top_ids, top_logprobs=top_values
        )

    @staticmethod
    def process(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Grammar mask, logit bias, penalties, min_tokens mask, and, unless every row is greedy,
        temperature and the top-k / top-p / min-p filters. Never writes into `logits`. [B, V] -> [B, V]."""
        if batch.token_bitmask is not None:
            from r1deploy.structured.grammar import apply_bitmask

            logits = apply_bitmask(logits, batch.token_bitmask)
        if batch.bias_ids is not None:
            padded = torch.nn.functional.pad(logits, (0, 1))  # [B, V + 1]; the padding lands in the extra column
            logits = padded.scatter_add(1, batch.bias_ids, batch.bias_values)[:, : batch.vocab_size]
        if batch.do_penalties:
            logits = apply_penalties(logits, batch)
        if batch.banned_ids is not None:
            # Scatter -inf into a scratch column for the padding, then drop it.
            padded = torch.nn.functional.pad(logits, (0, 1))  # [B, V + 1]
            logits = padded.scatter(1, batch.banned_ids, -math.inf)[:, : batch.vocab_size]
        if batch.all_greedy:
            return logits
        logits = logits / batch.temperatures.unsqueeze(1)
        if batch.do_top_k or batch.do_top_p:
            logits = apply_top_k_top_p(logits, batch)
        if batch.do_min_p:
            logits = apply_min_p(logits, batch)
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Exponential race: argmax(p / q) with q ~ Exp(1) i.i.d. draws a token with probability p.
        A seeded row draws its q from its own generator, so its token depends only on its own
        logits and seed, not on the other rows in the batch. [B, V] -> [B]."""
        probs = logits.softmax(dim=-1)  # [B, V]
        q = torch.empty_like(probs)
        seeded = [i for i, g in enumerate(batch.generators) if g is not None]
        if len(seeded) < batch.num_rows:
            q.exponential_()  # one draw from the global RNG for all unseeded rows
        for i in seeded:
            if not batch.greedy_cpu[i]:  # a greedy seeded row never consumes its generator
                q[i].exponential_(generator=batch.generators[i])
        # q can be exactly 0; clamping keeps p / q finite so a zero-probability token scores 0.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        return (probs / q).argmax(dim=-1)
