"""The router on hand-built scores: groups, selection-only bias, normalisation and scaling."""

from __future__ import annotations

import pytest
import torch

from r1deploy.layers.moe import RouterSpec, select_experts

# 8 experts in 4 groups of 2. Expert 0 scores highest, but its group's top-2 sum (0.92) loses to
# groups 2 (1.15) and 1 (0.98); V2's max-per-group scoring would keep group 0 instead.
SCORES = torch.tensor([[0.9, 0.02, 0.5, 0.48, 0.6, 0.55, 0.2, 0.3]])


def spec(topk_method: str, norm: bool, scaling: float) -> RouterSpec:
    return RouterSpec(num_experts=8, top_k=2, n_group=4, topk_group=2, scoring_func="sigmoid",
                      topk_method=topk_method, norm_topk_prob=norm, routed_scaling_factor=scaling)


def picked(weights: torch.Tensor, ids: torch.Tensor) -> dict[int, float]:
    return {int(e): float(w) for e, w in zip(ids[0], weights[0], strict=True)}


def test_v3_groups_score_by_top2_sum() -> None:
    weights, ids = select_experts(SCORES, torch.zeros(8), spec("noaux_tc", True, 2.5))
    assert picked(weights, ids) == pytest.approx({4: 0.6 / 1.15 * 2.5, 5: 0.55 / 1.15 * 2.5})


def test_v3_bias_chooses_but_does_not_weigh() -> None:
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, -0.5, -0.5, 0.4, 0.4])
    # Biased choice scores: groups 3 (1.3) and 1 (0.98) win; experts 7 and 6 inside them.
    weights, ids = select_experts(SCORES, bias, spec("noaux_tc", True, 2.5))
    assert picked(weights, ids) == pytest.approx({7: 0.3 / 0.5 * 2.5, 6: 0.2 / 0.5 * 2.5})


def test_v3_negative_biased_scores_never_pick_dropped_groups() -> None:
    """All biased scores negative: a 0.0 fill for dropped groups (transformers 4.57) would pick them."""
    _, ids = select_experts(SCORES, torch.full((8,), -2.0), spec("noaux_tc", True, 2.5))
    assert set(ids[0].tolist()) == {4, 5}


def test_v2_group_limited_greedy_scores_groups_by_max() -> None:
    weights, ids = select_experts(SCORES, None, spec("group_limited_greedy", False, 1.0))
    assert picked(weights, ids) == pytest.approx({0: 0.9, 4: 0.6})


def test_v2_greedy_ignores_groups_and_scales_unnormalised() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.05, 0.05, 0.2, 0.0, 0.02, 0.08]])
    weights, ids = select_experts(scores, None, spec("greedy", False, 16.0))
    assert picked(weights, ids) == pytest.approx({1: 8.0, 4: 3.2})
