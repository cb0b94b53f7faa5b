"""Fused MoE (align + grouped GEMMs + combine) against the CPU path of layers/moe.DeepseekExperts,
with bf16 / fp32 experts and with FP8 experts scaled per block in the kernel (W8A16)."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, rel_err

from r1deploy.kernels.fused_moe import fused_moe, fused_moe_ref, moe_align
from r1deploy.layers.moe import DeepseekExperts
from r1deploy.layers.moe.experts_dense import resident_method
from r1deploy.quant.fp8_block import quantize_fp8_block

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> DeepseekExperts:
    experts = DeepseekExperts(num_experts, hidden, inter, method=resident_method(None))
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(num_experts, 2 * inter, hidden) * hidden**-0.5)
        experts.down_proj.copy_(torch.randn(num_experts, hidden, inter) * inter**-0.5)
    return experts.to(dtype)


def _routing(num_tokens: int, num_experts: int, top_k: int, skew: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.rand(num_tokens, num_experts)
    if skew:  # a few experts take most tokens, several get none
        scores[:, : num_experts // 4] += 1.0
    ids = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(num_tokens, top_k) * 2.5
    return weights, ids


def test_moe_align_layout() -> None:
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [1, 0]])
    sorted_pairs, expert_of_block, num_padded = moe_align(ids.to(DEVICE), num_experts=5, block_m=4)
    sorted_pairs, expert_of_block = sorted_pairs.cpu(), expert_of_block.cpu()
    pad = ids.numel()
    # expert 0: pairs 1, 4, 9; expert 1: 3, 8; expert 2: 7; expert 3: 0, 2, 5, 6; expert 4: none.
    expected = [1, 4, 9, pad, 3, 8, pad, pad, 7, pad, pad, pad, 0, 2, 5, 6]
    assert int(num_padded) == len(expected)
    assert sorted_pairs[: len(expected)].tolist() == expected
    assert bool((sorted_pairs[len(expected):] == pad).all())
    assert expert_of_block[:4].tolist() == [0, 1, 2, 3] and bool((expert_of_block[4:] == -1).all())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_moe_matches_cpu_path(dtype: torch.dtype, tol: float) -> None:
    # H and I not multiples of the tiles; skewed routing leaves experts idle and fills others past one tile.
    num_experts, hidden, inter, top_k, tokens = 8, 40, 24, 3, 23
    experts = _experts(num_experts, hidden, inter, dtype)
    x = torch.randn(tokens, hidden).to(dtype)
    weights, ids = _routing(tokens, num_experts, top_k, skew=True)
    cpu = experts(x, weights, ids)
    assert rel_err(fused_moe_ref(x, experts.gate_up_proj.data, experts.down_proj.data, weights, ids), cpu) < tol
    out = fused_moe(x.to(DEVICE), experts.gate_up_proj.data.to(DEVICE), experts.down_proj.data.to(DEVICE),
                    weights.to(DEVICE), ids.to(DEVICE), block_m=16)
    assert out.dtype == dtype
    assert rel_err(out.cpu(), cpu) < tol


def test_fused_moe_single_token() -> None:
    experts = _experts(8, 32, 16, torch.float32)
    x = torch.randn(1, 32)
    weights, ids = _routing(1, 8, 2)
    out = fused_moe(x.to(DEVICE), experts.gate_up_proj.data.to(DEVICE), experts.down_proj.data.to(DEVICE),
                    weights.to(DEVICE), ids.to(DEVICE))
    assert rel_err(out.cpu(), experts(x, weights, ids)) < 1e-5


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens", [1, 32, 256, 2048])
def test_fused_moe_r1_shape(tokens: int) -> None:
    """R1 routed experts (H 7168, I 2048, top-8), 64 of the 256 experts to fit the test's memory."""
    num_experts, hidden, inter, top_k = 64, 7168, 2048, 8
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") * hidden**-0.5).bfloat16()
    down = (torch.randn(num_experts, hidden, inter, device="cuda") * inter**-0.5).bfloat16()
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    weights, ids = _routing(tokens, num_experts, top_k)
    weights, ids = weights.cuda(), ids.cuda()
    with torch.device("meta"):
        experts = DeepseekExperts(num_experts, hidden, inter, method=resident_method(None))
    experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
    out = experts(x, weights, ids)  # the CUDA dispatch
    ref = fused_moe_ref(x, gate_up, down, weights, ids)  # the CPU path's algorithm, run on the GPU
    assert rel_err(out.cpu(), ref.cpu()) < 1e-2


@pytest.mark.gpu
@cuda
def test_fused_moe_cuda_graph_replay() -> None:
    num_experts, hidden, inter, top_k, tokens = 16, 256, 128, 4, 64
    experts = _experts(num_experts, hidden, inter, torch.bfloat16)
    gate_up, down = experts.gate_up_proj.data.cuda(), experts.down_proj.data.cuda()
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    weights, ids = (t.cuda() for t in _routing(tokens, num_experts, top_k))
    fused_moe(x, gate_up, down, weights, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, gate_up, down, weights, ids)
    new_w, new_ids = _routing(tokens, num_experts, top_k, skew=True)
    weights.copy_(new_w)
    ids.copy_(new_ids)
    x.copy_(torch.randn_like(x))
    graph.replay()
    ref = experts(x.cpu(), new_w, new_ids)
    assert rel_err(out.cpu(), ref) < 1e-2


def _fp8_experts(num_experts: int, hidden: int, inter: int, block: tuple[int, int]) -> DeepseekExperts:
    """FP8 experts loaded the way a checkpoint fills them: per expert, per projection, with scales."""
    experts = DeepseekExperts(num_experts, hidden, inter, method=resident_method(block))
    for e in range(num_experts):
        for projection, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            q, scale_inv = quantize_fp8_block(torch.randn(shape) * shape[1] ** -0.5, block)
            experts.load_expert(e, projection, q)
            experts.load_expert(e, projection, scale_inv, "_scale_inv")
    return experts


def _dequantized_f64(experts: DeepseekExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, 2I, H] and [E, H, I] in float64, each element times its own tile's scale, per projection."""
    bn, bk = experts.method.block
    inter = experts.intermediate_size

    def tiles(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        rows, cols = torch.arange(q.shape[0]) // bn, torch.arange(q.shape[1]) // bk
        return q.double() * s.double()[rows[:, None], cols[None, :]]

    gate_up, down = [], []
    for e in range(experts.num_experts):
        q, s = experts.gate_up_proj[e], experts.gate_up_proj_scale_inv[e]
        half = s.shape[0] // 2
        gate_up.append(torch.cat([tiles(q[:inter], s[:half]), tiles(q[inter:], s[half:])]))
        down.append(tiles(experts.down_proj[e], experts.down_proj_scale_inv[e]))
    return torch.stack(gate_up), torch.stack(down)


@pytest.mark.parametrize(("hidden", "inter", "block"), [
    (40, 24, (16, 16)),  # neither H nor I a multiple of the tile: partial edge tiles, gate/up tiles apart
    (256, 200, (128, 128)),  # R1's tile; I = 200 gives 2 + 2 gate/up scale rows, the last ones partial
])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_moe_fp8_weights_match_float64_dequantised(
    hidden: int, inter: int, block: tuple[int, int], dtype: torch.dtype, tol: float,
) -> None:
    """W8A16: FP8 tiles scaled in the kernel against float64 dequantised weights; the CPU path too."""
    num_experts, top_k, tokens = 8, 3, 23
    experts = _fp8_experts(num_experts, hidden, inter, block)
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn
    gate_up64, down64 = _dequantized_f64(experts)
    x = torch.randn(tokens, hidden).to(dtype)
    weights, ids = _routing(tokens, num_experts, top_k, skew=True)
    ref = fused_moe_ref(x.double(), gate_up64, down64, weights, ids)
    cpu = experts(x, weights, ids)  # dequantises the busy experts per call
    assert rel_err(cpu, ref) < tol
    out = fused_moe(x.to(DEVICE), experts.gate_up_proj.data.to(DEVICE), experts.down_proj.data.to(DEVICE),
                    weights.to(DEVICE), ids.to(DEVICE), block_m=16,
                    gate_up_scale=experts.gate_up_proj_scale_inv.data.to(DEVICE),
                    down_scale=experts.down_proj_scale_inv.data.to(DEVICE), scale_block=block)
    assert out.dtype == dtype
    assert rel_err(out.cpu(), ref) < tol
    assert rel_err(out.cpu(), cpu) < tol


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens", [1, 32, 256, 2048])
def test_fused_moe_fp8_r1_shape(tokens: int) -> None:
    """R1 routed experts in FP8 (H 7168, I 2048, top-8, 128 x 128 tiles), 64 of the 256 experts,
    through DeepseekExperts' CUDA dispatch against the same weights dequantised to bf16."""
    num_experts, hidden, inter, top_k = 64, 7168, 2048, 8
    with torch.device("cuda"):
        experts = DeepseekExperts(num_experts, hidden, inter, method=resident_method((128, 128)))
    for stack, scales in ((experts.gate_up_proj, experts.gate_up_proj_scale_inv),
                          (experts.down_proj, experts.down_proj_scale_inv)):
        for e in range(num_experts):
            stack.data[e], scales.data[e] = quantize_fp8_block(torch.randn(stack.shape[1:], device="cuda")
                                                               * stack.shape[-1] ** -0.5)
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    weights, ids = (t.cuda() for t in _routing(tokens, num_experts, top_k))
    dense = [experts.expert_weights(e, torch.bfloat16) for e in range(num_experts)]
    ref = fused_moe_ref(x, torch.stack([g for g, _ in dense]), torch.stack([d for _, d in dense]), weights, ids)
    assert rel_err(experts(x, weights, ids).cpu(), ref.cpu()) < 1e-2
