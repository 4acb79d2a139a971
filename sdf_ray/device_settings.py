"""``auto`` settings resolved for the device a worker trains on: the one place that decides them.

``optim.precision: auto`` is bf16 on CUDA devices with native bf16 (compute capability 8.0+: Ampere, Hopper and
later) and fp32 elsewhere; ``model.compile: auto`` compiles on CUDA devices that Triton supports (compute
capability 7.0+) and not on CPUs. Explicit settings are kept as they are. The worker resolves them once it knows
its device (the driver may have no GPU, or another one), trains with the resolved config and reports the
resolved values in ``summary.json``. The ``reconstruct`` section's ``precision`` and ``compile`` follow the same
rules, resolved by each optimiser actor for its device.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TypeVar

import torch

from sdf_ray.config import TrainConfig
from sdf_ray.shapes.config import Precision, ReconstructConfig

T = TypeVar("T")


def _capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    major, minor = torch.cuda.get_device_capability(device)
    return (int(major), int(minor))


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """``auto``: bf16 on CUDA devices with native bf16 (compute capability 8.0+), fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if _capability(device) >= (8, 0) else "fp32"


def resolve_compile(compile_: bool | str, device: torch.device) -> bool:
    """``auto``: compile on CUDA devices that Triton supports (compute capability 7.0+), not on CPUs."""
    if compile_ == "auto":
        return _capability(device) >= (7, 0)
    return bool(compile_)


CACHEABLE_BELOW_SAMPLES = 4e9
"""``model.compile_cacheable: auto``'s break-even: the cacheable step costs 0.85 ns more per sample (0.89 ms per
1,048,576-sample step) and saves 3.7 s of a warm-cache start (H200, docs/performance.md): 4.4e9 samples."""


def resolve_compile_cacheable(value: bool | str, samples_to_train: int) -> bool:
    """``auto``: cacheable graphs for runs of fewer than :data:`CACHEABLE_BELOW_SAMPLES` samples."""
    if value == "auto":
        return samples_to_train < CACHEABLE_BELOW_SAMPLES
    return bool(value)


def resolve_for_device(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` with ``optim.precision`` and ``model.compile`` concrete for ``device`` (``auto`` resolved)."""
    return dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, precision=resolve_precision(cfg.optim.precision, device)),
        model=dataclasses.replace(cfg.model, compile=resolve_compile(cfg.model.compile, device)))


def resolve_reconstruct_for_device(cfg: ReconstructConfig, device: torch.device) -> ReconstructConfig:
    """The ``reconstruct`` section with ``precision`` and ``compile`` concrete for ``device``, same rules."""
    return dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device),
                               compile=resolve_compile(cfg.compile, device))


def describe(cfg: TrainConfig, resolved: TrainConfig) -> str:
    """``precision bf16 (auto), compile on (auto)``: what ran, and which values were chosen automatically."""

    def note(requested: object) -> str:
        return " (auto)" if requested == "auto" else ""

    return (f"precision {resolved.optim.precision}{note(cfg.optim.precision)}, "
            f"compile {'on' if resolved.model.compile else 'off'}{note(cfg.model.compile)}")


COMPILE_CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def use_compile_cache(cache_dir: str) -> dict[str, str]:
    """Point torch.compile's caches (inductor's, and Triton's kernels) at ``cache_dir``, shared by every run and
    sweep trial under one storage path; a variable already set (by the user, or the job's runtime env) wins.
    Set before anything compiles: both read their variable when they first need the directory. A value that torch
    set itself, when this process imported it early (:func:`sdf_ray.startup.start_worker_imports`), is replaced."""
    from sdf_ray.startup import environment_before_imports

    before = environment_before_imports()
    for name, sub in zip(COMPILE_CACHE_ENV, ("inductor", "triton")):
        ours = str(Path(cache_dir) / sub)
        if before is not None and name not in before:
            os.environ[name] = ours
        else:
            os.environ.setdefault(name, ours)
    return {name: os.environ[name] for name in COMPILE_CACHE_ENV}


def compile_module(module: T, mode: str, dynamic: bool | None = None) -> T:
    """``torch.compile`` as every compiled decoder (or reconstruction step) of sdf-ray gets it (training,
    reconstruction, benches): with the inductor settings this decoder needs
    (:func:`avoid_inductor_mix_order_reduction`)."""
    avoid_inductor_mix_order_reduction()
    compiled: T = torch.compile(module, mode=mode, dynamic=dynamic)  # type: ignore[assignment,call-overload]
    return compiled


def avoid_inductor_mix_order_reduction() -> None:
    """Turn off inductor's mix-order reduction fusion (process-wide: inductor has no per-model switch)
    unless TORCHINDUCTOR_MIX_ORDER_REDUCTION says otherwise.

    In torch 2.11 it fails to compile this decoder's backward at some batch shapes (training, 16 scenes x 4,096
    samples: ``AssertionError: 512 v.s. 8192`` in ``MixOrderReduction.get_numel_rnumel``; reconstruction of
    a tiny decoder, codes-only backward: ``32 v.s. 64``): the per-code (sum over samples) and per-feature
    (sum over everything) gradient reductions meet in one fusion.
    """
    import torch._inductor.config as inductor_config

    if "TORCHINDUCTOR_MIX_ORDER_REDUCTION" not in os.environ and hasattr(inductor_config.triton,
                                                                        "mix_order_reduction"):
        inductor_config.triton.mix_order_reduction = False
