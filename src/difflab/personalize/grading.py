"""The course's grading rule for personalized generations (spec section 4, "Grading"): per prompt, the k
images with the highest image score + 2.5 x text score are kept and their scores averaged."""

from __future__ import annotations

import torch

TEXT_WEIGHT = 2.5
TOP_K = 5  # images per prompt whose scores are averaged


def select_best(
    image_scores: torch.Tensor, text_scores: torch.Tensor, k: int, text_weight: float = TEXT_WEIGHT
) -> torch.Tensor:
    """Indices of the k images with the highest image + text_weight x text score, best first (ties: lower index)."""
    if image_scores.shape != text_scores.shape or image_scores.dim() != 1:
        raise ValueError(
            f"image and text scores must be 1-D of equal length, got {tuple(image_scores.shape)} "
            f"and {tuple(text_scores.shape)}"
        )
    combined = image_scores.float() + text_weight * text_scores.float()
    # A stable descending sort keeps the selection deterministic when scores tie.
    order = torch.sort(combined, descending=True, stable=True).indices
    return order[: min(k, len(order))]
