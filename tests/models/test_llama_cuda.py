"""The same paged model on a CUDA device: fp32 against transformers' CPU logits, bf16 loosely."""

from __future__ import annotations

import pytest
import torch
from tiny_models import Pair, Runner

from r1deploy.models.loader import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_prefill_chunks_and_decode_on_cuda(pair: Pair, dtype: torch.dtype, atol: float) -> None:
    runner = Runner(load_model(str(pair.path), device="cuda", dtype=dtype))
    tokens = [7, 100, 3, 55, 201, 9, 13, 77, 150, 4, 8]
    table = [3, 0, 5]
    first, other = runner.step([tokens[:6], tokens[:3]], [0, 0], [table, [7]])
    second, decoded = runner.step([tokens[6:], [42]], [6, 3], [table, [7]])
    (last,) = runner.step([[61]], [11], [table])
    ref = pair.reference(tokens + [61])
    for ours, expected in [(first, ref[:6]), (second, ref[6:11]), (last, ref[11:]),
                           (other, pair.reference(tokens[:3])), (decoded, pair.reference(tokens[:3] + [42])[-1:])]:
        assert (ours - expected).abs().max().item() <= atol
