"""A ReLU layer's backward GEMM with the ReLU's mask in its epilogue: ``(g @ W) * (h > 0)`` in one Triton kernel.

Reconstruction's hand-written backward (:mod:`sdf_ray.shapes.frozen_decoder`) otherwise writes each layer's
``g @ W`` and reads it back beside the activation ``h`` to mask it (``threshold_backward``): at 64 shapes x 8,000
samples that mask kernel takes 0.36 ms per layer on an H200, most of the GEMM's own 0.42 ms. Here the GEMM's
epilogue reads the activation's tile and stores the masked product; the unmasked one is never written. Measured on
an H200 (docs/performance.md, session 12): 0.63 ms against 0.77 ms per 512 x 512 layer, and one reconstruction
iteration 9.04 ms against 9.51 ms. Why a kernel of our own: torch exposes no masked-backward GEMM; cuBLASLt's
(``DRELU``) runs at a quarter of its plain GEMM's speed on Hopper, and inductor's Triton templates fused the masks
but lost as much on the forward GEMMs (sessions 8 and 10).

The kernel is persistent (one program per SM walks the output tiles) and reads through TMA descriptors, so it
needs Hopper or newer, Triton, bf16/fp16 and rows aligned to 16 bytes (:func:`available`, :func:`fits`); anything
else, and a kernel that fails to build, gets torch's two ops. ``mm_relu_grad`` is a torch custom op: a compiled
step calls it as one opaque kernel.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

try:  # Triton comes with CUDA builds of torch; CPU machines have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

log = logging.getLogger(__name__)

_failed: dict[tuple[int, int, torch.dtype], str] = {}
"""(N, K, dtype) -> why the kernel failed for it in this process: from then on, torch's ops for it."""


@functools.cache
def _capability(device: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel serves this device and dtype: a CUDA device with TMA (sm90+), bf16/fp16, and
    Triton."""
    if triton is None or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


Tiles = tuple[int, int, int, int, int]
"""(BLOCK_M, BLOCK_K, BLOCK_N, warps, stages): a tile's output rows and columns, the reduction step, and the
kernel's warps and pipeline stages."""


@dataclass(frozen=True)
class Plan:
    """How to run one GEMM shape. ``pointer_epilogue``: the activation's tile is loaded, and the masked tile
    stored, through pointers rather than TMA, which frees shared memory for a fourth pipeline stage; ``flatten`` and
    ``warp_specialize``: Triton's loop options for the persistent tile loop."""

    tiles: Tiles
    pointer_epilogue: bool = False
    flatten: bool = False
    warp_specialize: bool = False


# The fastest plan per (N, K) = (g's width, the output's width) at 512,000 rows on an H200
# (docs/gpu-results/fused-backward-bench.py, fused-backward-bench-epilogues-2026-11-30.txt): the DeepSDF decoder's
# three backward shapes (its 253-wide layer padded to 256). Other shapes take DEFAULT_PLAN.
PLANS: dict[tuple[int, int], Plan] = {
    (512, 512): Plan((128, 256, 64, 8, 4), pointer_epilogue=True, flatten=True),
    (512, 256): Plan((128, 256, 64, 8, 3), warp_specialize=True),
    (256, 512): Plan((128, 256, 64, 8, 4), pointer_epilogue=True, flatten=True),
}
DEFAULT_PLAN = Plan((128, 256, 64, 8, 3))


if triton is not None:

    @triton.jit
    def _mm_relu_grad_kernel(g_desc, w_desc, h_desc, out_desc, h_ptr, out_ptr, M, N, K, stride_h, stride_o,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                             NUM_PROGRAMS: tl.constexpr, POINTER_EPILOGUE: tl.constexpr, FLATTEN: tl.constexpr,
                             WARP_SPECIALIZE: tl.constexpr):
        """out[M, K] = 0 where h[M, K] <= 0, else g[M, N] @ w[N, K] (threshold_backward's rule: a NaN in h passes
        the product), with fp32 accumulation. The programs (at most NUM_PROGRAMS: a constant, so that the kernel
        compiles once per plan) walk the output tiles, a row block's tiles one after the other (its g rows then
        come from L2). TMA zero-fills loads beyond the edges and clips stores to them."""
        tiles_k = tl.cdiv(K, BLOCK_K)
        num_tiles = tl.cdiv(M, BLOCK_M) * tiles_k
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN,
                             warp_specialize=WARP_SPECIALIZE):
            off_m = (tile // tiles_k) * BLOCK_M
            off_k = (tile % tiles_k) * BLOCK_K
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for n0 in tl.range(0, N, BLOCK_N):
                acc = tl.dot(g_desc.load([off_m, n0]), w_desc.load([n0, off_k]), acc)
            if POINTER_EPILOGUE:
                rows = off_m + tl.arange(0, BLOCK_M)
                cols = off_k + tl.arange(0, BLOCK_K)
                inside = (rows[:, None] < M) & (cols[None, :] < K)
                h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :], mask=inside, other=0.0)
                masked = tl.where(h <= 0, 0.0, acc).to(h.dtype)
                tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], masked, mask=inside)
            else:
                h = h_desc.load([off_m, off_k])
                out_desc.store([off_m, off_k], tl.where(h <= 0, 0.0, acc).to(h.dtype))


def fits(g_MN: torch.Tensor, w_NK: torch.Tensor, h_MK: torch.Tensor) -> bool:
    """Whether TMA can read these operands: 2-D, contiguous rows, row strides and bases 16-byte aligned."""
    for t in (g_MN, w_NK, h_MK):
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def launch(g_MN: torch.Tensor, w_NK: torch.Tensor, h_MK: torch.Tensor, out_MK: torch.Tensor,
           plan: Plan | None = None) -> None:
    """The kernel into ``out_MK`` (contiguous) by ``plan``, else :data:`PLANS`' for the shape. Operands must
    :func:`fits`."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, N = g_MN.shape
    K = w_NK.shape[1]
    plan = plan or PLANS.get((N, K), DEFAULT_PLAN)
    block_m, block_k, block_n, warps, stages = plan.tiles
    descs = (TensorDescriptor.from_tensor(g_MN, [block_m, block_n]),
             TensorDescriptor.from_tensor(w_NK, [block_n, block_k]),
             TensorDescriptor.from_tensor(h_MK, [block_m, block_k]),
             TensorDescriptor.from_tensor(out_MK, [block_m, block_k]))
    num_tiles = triton.cdiv(M, block_m) * triton.cdiv(K, block_k)
    sms = torch.cuda.get_device_properties(g_MN.device).multi_processor_count
    _mm_relu_grad_kernel[(min(sms, num_tiles),)](*descs, h_MK, out_MK, M, N, K, h_MK.stride(0), out_MK.stride(0),
                                      BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, NUM_PROGRAMS=sms,
                                      POINTER_EPILOGUE=plan.pointer_epilogue,
                                      FLATTEN=plan.flatten, WARP_SPECIALIZE=plan.warp_specialize,
                                      num_warps=warps, num_stages=stages)


def _torch_ops(g_MN: torch.Tensor, w_NK: torch.Tensor, h_MK: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward(torch.mm(g_MN, w_NK), h_MK, 0)


def _check_operands(g_MN: torch.Tensor, w_NK: torch.Tensor, h_MK: torch.Tensor) -> None:
    torch._check(g_MN.dim() == 2 and w_NK.dim() == 2 and h_MK.dim() == 2, lambda: "mm_relu_grad: 2-D operands")
    torch._check(g_MN.shape[1] == w_NK.shape[0] and h_MK.shape[0] == g_MN.shape[0] and h_MK.shape[1] == w_NK.shape[1],
                 lambda: f"mm_relu_grad: g {tuple(g_MN.shape)}, w {tuple(w_NK.shape)} and h {tuple(h_MK.shape)} "
                         "do not chain")
    torch._check(g_MN.dtype == w_NK.dtype == h_MK.dtype, lambda: "mm_relu_grad: operands of one dtype")


@torch.library.custom_op("sdf_ray::mm_relu_grad", mutates_args=())
def mm_relu_grad(g_MN: torch.Tensor, w_NK: torch.Tensor, h_MK: torch.Tensor) -> torch.Tensor:
    """``threshold_backward(g @ w, h, 0)``: the gradient at a ReLU layer's output ``h`` ``[M, K]`` from the gradient
    ``g`` ``[M, N]`` at the next layer's pre-activation, ``w`` ``[N, K]`` that layer's weight (zero where
    ``h <= 0``). One fused kernel where :func:`available` and :func:`fits`; torch's GEMM and mask kernel elsewhere:
    the same values, to the GEMM's accumulation order."""
    _check_operands(g_MN, w_NK, h_MK)
    key = (g_MN.shape[1], w_NK.shape[1], g_MN.dtype)
    if (key in _failed or g_MN.shape[0] == 0
            or not (available(g_MN.device, g_MN.dtype) and fits(g_MN, w_NK, h_MK))):
        return _torch_ops(g_MN, w_NK, h_MK)
    out = torch.empty(g_MN.shape[0], w_NK.shape[1], dtype=g_MN.dtype, device=g_MN.device)
    try:
        with torch.cuda.device(g_MN.device):  # Triton launches on the current device
            launch(g_MN, w_NK, h_MK, out)
    except Exception as exc:  # a Triton or GPU that cannot build it: torch's ops for this shape, at their speed
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _failed[key] = first
        log.warning("the fused ReLU-backward kernel failed for [*, %d] x [%d, %d] %s (%s); using torch's GEMM and "
                    "mask kernels", key[0], key[0], key[1], key[2], first)
        return _torch_ops(g_MN, w_NK, h_MK)
    return out


@mm_relu_grad.register_fake
def _(g_MN: torch.Tensor, w_NK: torch.Tensor, h_MK: torch.Tensor) -> Any:
    _check_operands(g_MN, w_NK, h_MK)
    return g_MN.new_empty(g_MN.shape[0], w_NK.shape[1])
