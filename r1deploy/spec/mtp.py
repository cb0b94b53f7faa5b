"""MTP proposer (vLLM's "mtp" method): DeepSeek's multi-token-prediction layer drafts k = 1..3 tokens.

The MTP layer's position i reads the main model's final hidden state at i and the token at i + 1, and predicts
the token at i + 2 (models/deepseek_mtp.py). So after every engine step the proposer catches the layer up on
the positions the main model just computed and kept (`after_step`): a prefill chunk's positions with the prompt
shifted by one (its last position reads the token sampled after it), a verify step's newest position and
accepted drafts with the tokens that follow each. That writes their MTP latents (the layer's cache follows the
main block table, worker/draft_runner.py) and, for a request that is caught up, leaves the layer's prediction
after its newest token: the first draft. `propose_batch` then chains drafts 2..k for all requests at once, each
reading the previous draft's token and the layer's own output hidden state at the position before. Drafts are
the layer's greedy tokens; the engine verifies them exactly (greedy and rejection sampling) and rolls back.

The catch-up runs before the engine frees a finished request's blocks, so every position the main model keeps
has its MTP latent, also in blocks the prefix cache hands to later requests. One approximation remains: the
latent of the last position of a prefix hit was computed with the next token of the request that filled the
block, which a later request may not share (it costs acceptance, never correctness).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.errors import UsageError

if TYPE_CHECKING:
    from r1deploy.engine.request import Request
    from r1deploy.engine.scheduler import ScheduledChunk
    from r1deploy.worker.model_runner import ModelRunner


@dataclass(frozen=True)
class _Tail:
    """The MTP layer's output at the newest position it has seen of a caught-up request."""

    request: Request
    position: int  # the MTP position (the newest token's position - 1)
    draft: int  # its greedy token: the draft after the newest token
    hidden: torch.Tensor  # [hidden] its output hidden state, which the next draft step reads


class MTPProposer:
    def __init__(self, runner: ModelRunner, num_speculative_tokens: int, block_size: int) -> None:
        if runner.draft is None:
            raise UsageError("speculative method 'mtp': the model was loaded without its MTP layer")
        self.num_speculative_tokens = num_speculative_tokens
        self.runner = runner
        self.draft = runner.draft
        self.block_size = block_size
        self.pin = runner.device.type == "cuda"
        self._tails: dict[int, _Tail] = {}  # id(request) ->

    def after_step(self, chunks: Sequence[ScheduledChunk], num_rejected: Mapping[int, int]) -> None:
        """Catch the MTP layer up on a step's kept positions (chunks in batch order, the drafts each request's
        verification rejected by id(request)), before the scheduler rolls them back or frees finished ones."""
        self._tails = {k: t for k, t in self._tails.items() if not t.request.status.finished}
        token_chunks: list[list[int]] = []
        cached: list[int] = []
        tables: list[list[int]] = []
        sampled: list[int] = []
        rows: list[int] = []  # rows of the main model's hidden states
        owners: list[Request] = []
        offset = 0
        for chunk in chunks:
            request = chunk.request
            count = chunk.num_new_tokens - num_rejected.get(id(request), 0)
            start = chunk.num_cached_before
            if not request.status.finished and count > 0:  # a request failed in processing holds no blocks
                token_chunks.append(request.token_slice(start + 1, start + 1 + count))
                cached.append(start)
                tables.append(list(request.block_table))
                caught_up = start + count == request.num_tokens - 1
                sampled.append(int(caught_up))
                rows.extend(range(offset, offset + count))
                if caught_up:
                    owners.append(request)
            offset += chunk.num_new_tokens
        if not token_chunks:
            return
        batch = ForwardBatch.build(token_chunks, cached, tables, self.block_size, pin_memory=self.pin,
                                   num_sampled=sampled)
        main_hidden = self.runner.hidden
        index = torch.tensor(rows, dtype=torch.int64).to(main_hidden.device, non_blocking=True)
        logits, hidden = self.draft.execute(batch, main_hidden.index_select(0, index))
        for i, (request, token) in enumerate(zip(owners, logits.argmax(dim=-1).tolist(), strict=True)):
            self._tails[id(request)] = _Tail(request, request.num_tokens - 2, token, hidden[i])

    def propose_batch(self, wanted: Sequence[tuple[Request, int]]) -> list[list[int]]:
        """Up to `room` drafts for each (request, room), all requests' draft steps batched together."""
        drafts: list[list[int]] = []
        chain: list[tuple[int, Request, int]] = []  # (index in wanted, request, room) of requests drafting > 1
        hidden: list[torch.Tensor] = []
        for i, (request, room) in enumerate(wanted):
            tail = self._tails.get(id(request))
            if tail is None or tail.request is not request or tail.position != request.num_tokens - 2:
                drafts.append([])  # not caught up by the layer yet (a fresh prefill is; a preempted one will be)
                continue
            drafts.append([tail.draft])
            if min(room, self.num_speculative_tokens) > 1:
                chain.append((i, request, room))
                hidden.append(tail.hidden)
        scratch = {id(request): self.draft.scratch_block(row) for row, (_, request, _) in enumerate(chain)}
        previous = torch.stack(hidden) if hidden else None
        for step in range(2, self.num_speculative_tokens + 1):  # draft `step` sits at the newest position + step - 2
            keep = [j for j, (_, _, room) in enumerate(chain) if room >= step]
            if not keep:
                break
            chain, previous = [chain[j] for j in keep], previous[keep]
            batch = ForwardBatch.build(
                [[drafts[i][-1]] for i, _, _ in chain], [r.num_tokens - 3 + step for _, r, _ in chain],
                [r.block_table + [scratch[id(r)]] for _, r, _ in chain], self.block_size, pin_memory=self.pin)
            logits, previous = self.draft.execute(batch, previous)
            for (i, _, _), token in zip(chain, logits.argmax(dim=-1).tolist(), strict=True):
                drafts[i].append(token)
        return drafts
