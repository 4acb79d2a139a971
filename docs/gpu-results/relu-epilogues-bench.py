"""Issue 12, an experiment not adopted: cuBLASLt's ReLU bit-mask epilogues (relu_epilogues.py beside this file)
against torch, one layer at a time, on the reconstruction step's sizes (64 shapes x 8,000 samples = 512,000 rows,
bf16). Measured on an H200 (relu-epilogues-bench-2026-11-29.txt): the DRELU backward runs as a separate cuBLASLt
epilogue kernel and takes 2.2x as long as torch's GEMM plus mask kernel; see docs/performance.md.

  source .gpu/gpu-env.sh; python docs/gpu-results/relu-epilogues-bench.py

Forward: torch._addmm_activation (GEMM + bias + ReLU) against linear_relu_mask (the same, plus the bit-mask).
Backward: torch.mm then threshold_backward (two kernels) against mm_relu_grad (the mask in the GEMM's epilogue).
Each pair: the largest difference, and the median of 5 rounds of 50 calls, A and B alternating.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import relu_epilogues  # beside this file (python puts the script's directory on sys.path)

M = 512_000


def timed(fn: Callable[[], object], calls: int = 50) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


def pair(name: str, a: Callable[[], object], b: Callable[[], object]) -> None:
    a(), b()
    ta, tb = [], []
    for _ in range(5):
        ta.append(timed(a))
        tb.append(timed(b))
    print(f"{name}: torch {statistics.median(ta) * 1e3:.3f} ms, epilogue {statistics.median(tb) * 1e3:.3f} ms, "
          f"ratio {statistics.median(tb) / statistics.median(ta):.3f}", flush=True)


def main() -> None:
    device = torch.device("cuda")
    print("probe:", relu_epilogues.unavailable_reason(device, torch.bfloat16) or "ok")
    g = torch.Generator(device).manual_seed(0)
    for n_in, n_out in ((512, 512), (512, 256)):
        x = torch.randn(M, n_in, device=device, generator=g).to(torch.bfloat16)
        w = (torch.randn(n_out, n_in, device=device, generator=g) / n_in ** 0.5).to(torch.bfloat16)
        b = (torch.randn(n_out, device=device, generator=g) * 0.1).to(torch.bfloat16)
        h_ref = torch._addmm_activation(b, x, w.t())
        h, mask = relu_epilogues.linear_relu_mask(x, w, b)
        bits = torch.bitwise_and(mask.view(M, -1, 1) >> torch.arange(8, device=device, dtype=torch.uint8), 1)
        bits = bits.reshape(M, -1)[:, :n_out].bool()
        print(f"forward {n_in}->{n_out}: max |h - torch| {(h.float() - h_ref.float()).abs().max().item():.3e}; "
              f"mask == (h > 0) (bits little-endian per byte): {bool(torch.equal(bits, h_ref > 0))}, "
              f"positive fraction {(h_ref > 0).float().mean().item():.3f}")
        pair(f"forward {n_in}->{n_out}", lambda: torch._addmm_activation(b, x, w.t()),
             lambda: relu_epilogues.linear_relu_mask(x, w, b))
        # Backward through the next layer: [M, 512] gradient, weight [512, n_out] -> gradient at h [M, n_out].
        gy = (torch.randn(M, 512, device=device, generator=g) * 1e-3).to(torch.bfloat16)
        w2 = (torch.randn(512, n_out, device=device, generator=g) / 512 ** 0.5).to(torch.bfloat16)
        want = torch.ops.aten.threshold_backward(torch.mm(gy, w2), h_ref, 0)
        got = relu_epilogues.mm_relu_grad(gy, w2, mask)
        print(f"backward 512->{n_out}: max |diff| {(got.float() - want.float()).abs().max().item():.3e} "
              f"(max |g| {want.float().abs().max().item():.3e}); equal: {bool(torch.equal(got, want))}")
        pair(f"backward 512->{n_out}", lambda: torch.ops.aten.threshold_backward(torch.mm(gy, w2), h_ref, 0),
             lambda: relu_epilogues.mm_relu_grad(gy, w2, mask))
        del x, h_ref, h, mask, gy, want, got


if __name__ == "__main__":
    main()
