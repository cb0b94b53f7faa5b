"""Our paged Llama/Qwen2 against transformers' logits, for every way the engine slices a sequence."""

from __future__ import annotations

import torch
from tiny_models import Pair, Runner

ATOL = 1e-4


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= ATOL


def test_single_prompt_prefill(pair: Pair, runner: Runner) -> None:
    tokens = prompt(0, 11)
    (logits,) = runner.step([tokens], [0], [[5, 2, 9]])  # non-contiguous blocks
    assert_close(logits, pair.reference(tokens))


def test_batch_of_different_lengths(pair: Pair, runner: Runner) -> None:
    prompts = [prompt(1, 5), prompt(2, 13), prompt(3, 1)]
    out = runner.step(prompts, [0, 0, 0], [[0, 1], [2, 3, 4, 5], [6]])
    for tokens, logits in zip(prompts, out, strict=True):
        assert_close(logits, pair.reference(tokens))


def test_chunked_prefill_attends_over_cached_kv(pair: Pair, runner: Runner) -> None:
    tokens = prompt(4, 13)
    table = [7, 3, 1, 4]
    (first,) = runner.step([tokens[:6]], [0], [table])
    (second,) = runner.step([tokens[6:]], [6], [table])
    ref = pair.reference(tokens)
    assert_close(first, ref[:6])
    assert_close(second, ref[6:])


def test_prefix_reuse_shares_full_blocks(pair: Pair, runner: Runner) -> None:
    first = prompt(5, 12)
    runner.step([first], [0], [[0, 1, 2]])
    second = first[:8] + prompt(6, 5)  # the first two blocks (8 tokens) are identical
    (logits,) = runner.step([second[8:]], [8], [[0, 1, 3, 4]])
    assert_close(logits, pair.reference(second)[8:])


def test_decode_steps_after_prefill(pair: Pair, runner: Runner) -> None:
    seqs = [prompt(7, 6), prompt(8, 9)]
    tables = [[0, 1, 2, 3], [4, 5, 6, 7]]
    runner.step(seqs, [0, 0], tables)
    for step in range(5):  # all query_len == 1: the vectorised decode path
        new = [[(11 * step + 3 * i) % 250 + 3] for i in range(2)]
        out = runner.step(new, [len(s) for s in seqs], tables)
        for i, logits in enumerate(out):
            seqs[i] = seqs[i] + new[i]
            assert_close(logits, pair.reference(seqs[i])[-1:])


def test_mixed_prefill_and_decode_batch(pair: Pair, runner: Runner) -> None:
    decoding, prefilling = prompt(9, 7), prompt(10, 10)
    runner.step([decoding], [0], [[0, 1, 2]])
    decoding = decoding + [42]
    out = runner.step([[42], prefilling[:4]], [7, 0], [[0, 1, 2], [3, 4, 5]])
    assert_close(out[0], pair.reference(decoding)[-1:])
    assert_close(out[1], pair.reference(prefilling[:4]))
