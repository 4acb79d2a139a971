"""Learning-rate schedules: each parameter group's rate per epoch, on the host (the step cadence is in
``run_schedule.py``)."""

from __future__ import annotations

from sdf_ray.config import OptimConfig


def lr_factor(cfg: OptimConfig, epoch: int) -> float:
    """Multiplier of each parameter group's base learning rate at ``epoch`` (0-based)."""
    if cfg.schedule == "constant":
        return 1.0
    step = cfg.lr_step_factor ** (epoch // cfg.lr_step_every_n_epochs)
    if cfg.schedule == "warmup" and epoch < cfg.warmup_epochs:
        return step * (epoch + 1) / cfg.warmup_epochs
    return step


def group_lrs(cfg: OptimConfig, epoch: int) -> dict[str, float]:
    """Learning rates of the ``decoder`` and ``latents`` parameter groups at ``epoch``."""
    f = lr_factor(cfg, epoch)
    return {"decoder": cfg.decoder_lr * f, "latents": cfg.latent_lr * f}
