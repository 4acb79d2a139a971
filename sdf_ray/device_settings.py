"""``auto`` settings resolved for the device a worker trains on: the one place that decides them.

``optim.precision: auto`` is bf16 on CUDA devices with native bf16 (compute capability 8.0+: Ampere, Hopper and
later) and fp32 elsewhere; ``model.compile: auto`` compiles on CUDA devices that Triton supports (compute
capability 7.0+) and not on CPUs. Explicit settings are kept as they are. The worker resolves them once it knows
its device (the driver may have no GPU, or another one), trains with the resolved config and reports the
resolved values in ``summary.json``.
"""

from __future__ import annotations

import dataclasses

import torch

from sdf_ray.config import TrainConfig


def _capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    major, minor = torch.cuda.get_device_capability(device)
    return (int(major), int(minor))


def resolve_for_device(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` with ``optim.precision`` and ``model.compile`` concrete for ``device`` (``auto`` resolved)."""
    capability = _capability(device)
    precision = cfg.optim.precision
    if precision == "auto":
        precision = "bf16" if capability >= (8, 0) else "fp32"
    compile_ = cfg.model.compile
    if compile_ == "auto":
        compile_ = capability >= (7, 0)
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, precision=precision),
                               model=dataclasses.replace(cfg.model, compile=compile_))


def describe(cfg: TrainConfig, resolved: TrainConfig) -> str:
    """``precision bf16 (auto), compile on (auto)``: what ran, and which values were chosen automatically."""

    def note(requested: object) -> str:
        return " (auto)" if requested == "auto" else ""

    return (f"precision {resolved.optim.precision}{note(cfg.optim.precision)}, "
            f"compile {'on' if resolved.model.compile else 'off'}{note(cfg.model.compile)}")
