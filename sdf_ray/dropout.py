"""ReLU followed by dropout, with the cheap mask and backward that the compiled fast path needs.

Two costs of ``dropout(relu(x))`` dominate a compiled DeepSDF step on a GPU (measured on an H200, see
docs/performance.md): Philox, which inductor runs once per element (10 rounds for one random number),
and the masks that autograd stores for the backward.

- **The backward needs only the output.** With ``y = relu(x) * keep / (1 - p)``, ``dy/dx`` is ``1 / (1 - p)``
  exactly where ``y > 0`` and 0 elsewhere (a dropped or non-positive input gives ``y == 0``; a kept
  positive one gives ``y > 0``, even in bf16, since ``x / (1 - p) >= x``). ``y`` is saved anyway as the
  next layer's input, so neither the dropout mask nor the pre-activation is kept for the backward
  (inductor's partitioner still chooses to save ``y > 0`` as a bool, 1 byte per element).
- **The mask comes from a counter hash** (a Weyl sequence folded to 32 bits, then murmur3's finaliser) of
  the element index and a per-call seed drawn from torch's generator: a dozen integer operations that
  the compiler fuses into the layer's elementwise kernel, instead of a Philox call per element. The
  drop probability is quantised to 1/65536 (0.2 -> 13107/65536 = 0.199997), and the kept values are
  scaled by the quantised probability, so the layer's expectation is exact.

Eager mode keeps torch's own dropout mask (a hash spelled as separate eager ops would be slower), so
eager and compiled runs draw different (equally distributed) masks.
"""

from __future__ import annotations

import math

import torch

_GOLDEN64 = 0x9E3779B97F4A7C15 - (1 << 64)  # as a signed int64; multiplication wraps mod 2^64
_MASK32 = 0xFFFFFFFF
_LEVELS = 1 << 16


def _drop_threshold(p: float) -> int:
    return min(round(p * _LEVELS), _LEVELS - 1)  # keep at least 1/65536: the scale stays finite


def quantised_probability(p: float) -> float:
    """The drop probability the hashed mask realises: ``p`` rounded to a multiple of 1/65536."""
    return _drop_threshold(p) / _LEVELS


def hashed_keep_mask(shape: torch.Size, seed: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask, True with probability ``1 - quantised_probability(p)``, a pure function of (seed, index).

    ``seed`` is an int64 tensor (0-dim, on the target device); all other arithmetic is elementwise.
    """
    index = torch.arange(math.prod(shape), device=seed.device, dtype=torch.int64).view(shape)
    # Seed first: the compiler would fold ``index * constant`` into its (possibly int32) index arithmetic.
    h = (index + seed) * _GOLDEN64
    h = (h ^ (h >> 32)) & _MASK32  # fold to 32 bits (arithmetic shift is fine: the high half is masked off)
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & _MASK32
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & _MASK32
    h = h ^ (h >> 16)
    return (h >> 16) >= _drop_threshold(p)


class _ScaleWhereKept(torch.autograd.Function):
    """``y = where(keep, relu(x), 0) * scale`` whose backward reads ``y`` alone (see the module docstring): the
    faster step (30.5 against 31.4 ms per 1,048,576-sample step on an H200), in a graph AOTAutograd's cache refuses
    (``autograd_function_apply``)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, keep: torch.Tensor,
                scale: float) -> torch.Tensor:
        y = torch.where(keep, torch.relu(x), 0) * scale
        ctx.save_for_backward(y)
        ctx.scale = scale  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor,
                 ) -> tuple[torch.Tensor, None, None]:
        (y,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.where(y > 0, grad_y * ctx.scale, 0), None, None  # type: ignore[attr-defined]


def _scale_where_kept(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``y = where(keep, relu(x), 0) * scale`` whose backward reads ``y > 0`` alone (see the module docstring).

    Spelled with plain differentiable ops rather than :class:`_ScaleWhereKept`: AOTAutograd's cache refuses graphs
    with an autograd.Function, and without that cache a warm-cache run traces, pattern-matches and partitions the
    joint graph again: 3.5 s of a 6.8 s first step on an H200 (docs/performance.md). The value is computed without
    autograd; the gradient flows through ``where(y > 0, x * scale, y)``, which equals it bitwise (``relu(x) == x``
    where ``y > 0``) and whose backward keeps only the condition. Same values and gradients as the Function.
    """
    with torch.no_grad():
        y = torch.where(keep, torch.relu(x), 0) * scale
    return torch.where(y > 0, x * scale, y)


def relu_dropout(x: torch.Tensor, p: float, training: bool, cacheable: bool = True) -> torch.Tensor:
    """``dropout(relu(x), p)``; under torch.compile with the hashed mask and the output-only backward, spelled so
    that AOTAutograd's cache stores the graph (``cacheable``) or as the faster autograd.Function."""
    if not training or p == 0.0:
        return torch.relu(x)
    if not torch.compiler.is_compiling():
        return torch.nn.functional.dropout(torch.relu(x), p, training=True)
    p_q = quantised_probability(p)
    seed = torch.randint(0, 1 << 62, (), device=x.device)
    keep, scale = hashed_keep_mask(x.shape, seed, p), 1.0 / (1.0 - p_q)
    if cacheable:
        return _scale_where_kept(x, keep, scale)
    out: torch.Tensor = _ScaleWhereKept.apply(x, keep, scale)
    return out
