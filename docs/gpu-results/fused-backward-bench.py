"""Issue 12: the backward GEMM with the ReLU mask in its epilogue (sdf_ray.shapes.fused_backward) against torch's GEMM
and mask kernel, side by side in one process on one GPU.

    source .gpu/gpu-env.sh; python docs/gpu-results/fused-backward-bench.py

1. Each backward GEMM shape of the DeepSDF decoder at 64 shapes x 8,000 samples (512,000 rows): torch's
   ``mm`` + ``threshold_backward`` and the Triton kernel under several plans (tiles, epilogue, loop options), the
   package's own (``fused_backward.PLANS``) among them; the error of both against an fp32 reference.
2. The compiled reconstruction step (``reconstruct_codes``, 64 shapes x ITERS iterations x 8,000 samples, bf16) with
   the fused kernel (the package's plans) and without, in alternating rounds; the codes' agreement; the kernels of
   five iterations of each.
   (STEPS=0: only 1.)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import torch

from sdf_ray import config as config_mod
from sdf_ray.model import DeepSDFDecoder
from sdf_ray.shapes import fused_backward as fb
from sdf_ray.shapes.bench import synthetic_bank
from sdf_ray.shapes.config import ReconstructConfig
from sdf_ray.shapes.reconstruct import freeze, prepare, reconstruct_codes

ROWS = 512_000
ITERS = int(os.environ.get("ITERS", "200"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
B = 64
PLANS = [fb.Plan(t, pointer_epilogue=e, flatten=f, warp_specialize=ws)
         for t in ((128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4))
         for e in (False, True) for f in (False, True) for ws in (False, True)]


def timed(fn, reps: int = 40) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernels() -> None:
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {ROWS:,} rows")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    for N, K in ((512, 512), (512, 256), (256, 512)):
        g = torch.randn(ROWS, N, device=dev).to(torch.bfloat16)
        w = (torch.randn(N, K, device=dev) / N ** 0.5).to(torch.bfloat16)
        h = torch.relu(torch.randn(ROWS, K, device=dev)).to(torch.bfloat16)
        ref = (g.float() @ w.float()) * (h > 0)
        scale = ref.abs().max().item()
        torch_out = torch.ops.aten.threshold_backward(torch.mm(g, w), h, 0)
        t_torch = timed(lambda: torch.ops.aten.threshold_backward(torch.mm(g, w), h, 0))
        t_mm = timed(lambda: torch.mm(g, w))
        print(f"\n(g [{ROWS}, {N}] @ w [{N}, {K}]) * (h > 0): torch mm {t_mm:.3f} ms, mm + threshold_backward "
              f"{t_torch:.3f} ms; torch's max error vs fp32 {(torch_out.float() - ref).abs().max().item() / scale:.2e} "
              f"of the scale")
        flops = 2 * ROWS * N * K
        results = []
        for plan in PLANS:
            if plan.tiles[1] > K or plan.tiles[2] > N:
                continue
            out = torch.empty(ROWS, K, dtype=torch.bfloat16, device=dev)
            try:
                fb.launch(g, w, h, out, plan)
                torch.cuda.synchronize()
            except Exception as exc:  # a plan this GPU or Triton cannot build
                print(f"  {plan}: failed: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}")
                continue
            err = (out.float() - ref).abs().max().item() / scale
            zeros = bool((out[h <= 0] == 0).all())
            t = timed(lambda: fb.launch(g, w, h, out, plan))
            results.append((t, plan))
            print(f"  {plan}: {t:.3f} ms ({flops / t / 1e9:.0f} TFLOP/s), ratio to torch {t / t_torch:.3f}; "
                  f"max error {err:.2e}; zero where h <= 0: {zeros}", flush=True)
        if results:
            best = min(results, key=lambda r: r[0])
            chosen = fb.PLANS.get((N, K), fb.DEFAULT_PLAN)
            t_chosen = next((t for t, p in results if p == chosen), float("nan"))
            print(f"  fastest: {best[1]} {best[0]:.3f} ms; the package's plan {chosen} {t_chosen:.3f} ms; "
                  f"torch {t_torch:.3f} ms: ratio {t_chosen / t_torch:.3f}")


def steps() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    decoder = freeze(DeepSDFDecoder(config_mod.TrainConfig().model).to(device))
    bank = synthetic_bank(B, device, rows=50_000, sdf_scale=0.1)
    cfg = dataclasses.replace(ReconstructConfig(), num_iterations=ITERS, precision="bf16")
    warm = dataclasses.replace(cfg, num_iterations=3)
    variants = {}
    for name, fused in (("fused", True), ("unfused", False)):
        p = prepare(decoder, cfg, 0.1, compile=True)
        p.model.fused_backward = fused  # read when the step is traced, at its first call
        variants[name] = p.step
        t0 = time.perf_counter()
        reconstruct_codes(p.step, bank, warm, 0.1, 256, B)
        torch.cuda.synchronize()
        print(f"{name}: warm-up (compiles) {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in variants}
    codes = {}
    for _ in range(ROUNDS):
        for name, step in variants.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = reconstruct_codes(step, bank, cfg, 0.1, 256, B)
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            codes[name] = torch.stack([o.code for o in out])
    base = statistics.median(times["unfused"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"step {name}: {ITERS} it x {B} shapes: median {t:.3f} s ({' '.join(f'{x:.3f}' for x in ts)}); "
              f"{t / ITERS * 1e3:.2f} ms/iteration; {t / B * 800 / ITERS:.4f} s/shape at 800 it; ratio to unfused "
              f"{t / base:.3f}", flush=True)
    from torch.profiler import ProfilerActivity, profile

    five = dataclasses.replace(cfg, num_iterations=5)
    for name, step in variants.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            reconstruct_codes(step, bank, five, 0.1, 256, B)
            torch.cuda.synchronize()
        print(f"\n--- {name}: kernels of 5 iterations (CUDA time) ---")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    d = (codes["fused"] - codes["unfused"]).norm(dim=1) / codes["unfused"].norm(dim=1)
    print(f"codes fused vs unfused after {ITERS} it (same seeds): relative difference median {d.median():.2e}, "
          f"max {d.max():.2e}")


if __name__ == "__main__":
    kernels()
    if os.environ.get("STEPS", "1") == "1":
        steps()
