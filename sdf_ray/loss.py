"""DeepSDF loss: clamped L1 on the SDF plus a ramped latent-norm regulariser."""

from __future__ import annotations

import torch

from sdf_ray.config import LossConfig


def code_reg_weight(cfg: LossConfig, epoch: int) -> float:
    """lambda * min(1, epoch / ramp): the regulariser's weight at ``epoch``."""
    if cfg.code_reg_ramp_epochs == 0:
        return cfg.code_reg_lambda
    return cfg.code_reg_lambda * min(1.0, epoch / cfg.code_reg_ramp_epochs)


def sdf_loss(pred_N: torch.Tensor, sdf_N: torch.Tensor, latent_BL: torch.Tensor, cfg: LossConfig,
             reg_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, l1): mean |clamp(f) - clamp(s)| + reg_weight * mean_b ||z_b||.

    With equal samples per scene, the reference's per-sample sum of code norms divided by the number
    of samples equals the mean over the batch's scenes.
    """
    delta = cfg.clamp_dist
    l1 = (pred_N.float().clamp(-delta, delta) - sdf_N.clamp(-delta, delta)).abs().mean()
    if reg_weight == 0.0:
        return l1, l1
    reg = torch.linalg.vector_norm(latent_BL.float(), dim=1).mean()
    return l1 + reg_weight * reg, l1
