"""Losses weighted as the competition weighs its targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cervspine.scoring.competition import OVERALL_WEIGHTS, VERTEBRA_WEIGHTS


def weighted_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    neg_pos: tuple[float, float],
    sample_weight: torch.Tensor | None = None,
    focal_gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w·loss and Σ w for one group of targets; focal modulation when ``focal_gamma`` > 0."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if focal_gamma > 0:
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        loss = loss * (1 - p_t).pow(focal_gamma)
    w = neg_pos[0] + (neg_pos[1] - neg_pos[0]) * target
    if sample_weight is not None:
        w = w * sample_weight
    return (w * loss).sum(), w.sum()


def competition_loss(
    vertebra_logits: torch.Tensor,
    vertebra_target: torch.Tensor,
    sample_weight: torch.Tensor | None = None,
    overall_logit: torch.Tensor | None = None,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """(Σ w·loss) / (Σ w) over C1..C7 and, when given, the 'any fracture' target weighted 7/14."""
    num, den = weighted_bce(vertebra_logits, vertebra_target, VERTEBRA_WEIGHTS, sample_weight, focal_gamma)
    if overall_logit is not None:
        overall_target = vertebra_target.amax(dim=1)
        ow = None if sample_weight is None else sample_weight.amin(dim=1)
        n2, d2 = weighted_bce(overall_logit, overall_target, OVERALL_WEIGHTS, ow, focal_gamma)
        num, den = num + n2, den + d2
    return num / den.clamp_min(1e-8)
