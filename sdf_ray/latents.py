"""Per-scene latent codes: a rank-local table holding only the scenes this rank owns."""

from __future__ import annotations

import math

import torch
from torch import nn


def init_latents(num_scenes: int, latent_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DeepSDF init: N(0, (1/sqrt(L))^2) per entry."""
    return torch.randn(num_scenes, latent_size, generator=generator) / math.sqrt(latent_size)


class LatentTable(nn.Module):
    """Codes of this rank's scenes (rows in the order of the rank's shard).

    The reference bounds codes with ``Embedding(max_norm=1)``, which renormalises rows only on lookup
    (a side effect inside forward); here the bound is an explicit projection after each real step.
    """

    def __init__(self, codes_NL: torch.Tensor, max_norm: float = 1.0) -> None:
        super().__init__()
        self.codes = nn.Parameter(codes_NL.clone())
        self.max_norm = max_norm

    def forward(self, scene_idx_B: torch.Tensor) -> torch.Tensor:
        return self.codes.index_select(0, scene_idx_B)

    @torch.no_grad()
    def project_(self, skip: torch.Tensor) -> None:
        """Scale rows with norm > max_norm back onto the ball, unless ``skip`` (a 0-dim bool tensor)."""
        norms_N1 = torch.linalg.vector_norm(self.codes, dim=1, keepdim=True)
        scale_N1 = torch.clamp(self.max_norm / (norms_N1 + 1e-12), max=1.0)
        # where() and not a multiply: the projection must leave a skipped step bit-identical.
        self.codes.copy_(torch.where(skip | (scale_N1 >= 1.0), self.codes, self.codes * scale_N1))
