"""Issue 12: the reconstruction step several ways on one GPU, side by side in one process, then a kernel profile.

  source .gpu/gpu-env.sh; VARIANTS="frozen-compiled frozen-autotune" python docs/gpu-results/reconstruct-step-variants.py

- autograd-compiled: the compiled DeepSDFDecoder module and autograd to the codes (sessions 4-6's path);
- frozen-compiled / frozen-autotune / frozen-eager: sdf_ray.shapes.frozen_decoder (fused bias+ReLU GEMMs,
  hand-written backward), compiled (default or max-autotune-no-cudagraphs) or not; VARIANTS picks them.

Each: ``reconstruct_codes`` on 64 shapes x ITERS iterations x 8,000 samples (bf16), after a 3-iteration warm-up
that compiles; rounds alternate (A B C A B C ...) and the median per round is printed. Then the codes' agreement
(the same seeds: frozen against autograd), the decode forward on 262,144 points x 64 codes, and the top kernels of
one iteration of each compiled path.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

import torch

from sdf_ray import config as config_mod
from sdf_ray.device_settings import compile_module
from sdf_ray.model import DeepSDFDecoder
from sdf_ray.shapes.bench import synthetic_bank
from sdf_ray.shapes.config import ReconstructConfig
from sdf_ray.shapes.frozen_decoder import FrozenDecoder
from sdf_ray.shapes.reconstruct import freeze, prepare, reconstruct_codes

ITERS = int(os.environ.get("ITERS", "200"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
VARIANTS = os.environ.get("VARIANTS", "frozen-compiled frozen-eager").split()
if os.environ.get("INDUCTOR_TMA") == "1":
    # Session 10: max-autotune with Triton's persistent TMA matmul templates only, so that the ReLU masks of the
    # hand-written backward are fused into the GEMMs' epilogues (cuBLAS, which cannot take them, won every GEMM in
    # session 5's autotuning). Affects only the max-autotune variants (default mode lowers to ATen's mm).
    import torch._inductor.config as inductor_config

    inductor_config.triton.enable_persistent_tma_matmul = True
    inductor_config.max_autotune_gemm_backends = "TRITON"
B = int(os.environ.get("SHAPES", "64"))
DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu SHAPES=2 ITERS=2 ROUNDS=1: a smoke test of the script


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    decoder = freeze(DeepSDFDecoder(config_mod.TrainConfig().model).to(device))
    bank = synthetic_bank(B, device, rows=50_000, sdf_scale=0.1)
    cfg = dataclasses.replace(ReconstructConfig(), num_iterations=ITERS, precision="bf16")
    warm = dataclasses.replace(cfg, num_iterations=3)

    def step(code_gradient: str, compile: bool, mode: str = "default") -> Any:
        c = dataclasses.replace(cfg, code_gradient=code_gradient, compile_mode=mode)
        return prepare(decoder, c, 0.1, compile=compile).step

    makers = {
        "autograd-compiled": lambda: step("autograd", True),
        "frozen-compiled": lambda: step("hand-written", True),
        "frozen-autotune": lambda: step("hand-written", True, "max-autotune-no-cudagraphs"),
        "frozen-eager": lambda: step("hand-written", False),
    }
    names = ["autograd-compiled"] + [n for n in VARIANTS if n != "autograd-compiled"]
    variants: dict[str, Any] = {name: makers[name]() for name in names}
    for name, step in variants.items():
        t0 = time.perf_counter()
        reconstruct_codes(step, bank, warm, 0.1, 256, B)
        sync()
        print(f"{name}: warm-up (compiles) {time.perf_counter() - t0:.1f} s", flush=True)

    times: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, float] = {}
    codes: dict[str, torch.Tensor] = {}
    for _ in range(ROUNDS):
        for name, step in variants.items():
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            out = reconstruct_codes(step, bank, cfg, 0.1, 256, B)
            sync()
            times[name].append(time.perf_counter() - t0)
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
            codes[name] = torch.stack([o.code for o in out])
    base = statistics.median(times["autograd-compiled"])
    for name, ts in times.items():
        t = statistics.median(ts)
        per_shape_800 = t / B * 800 / ITERS
        print(f"{name}: {ITERS} it x {B} shapes: median {t:.3f} s ({' '.join(f'{x:.3f}' for x in ts)}); "
              f"{t / ITERS * 1e3:.2f} ms/iteration; {per_shape_800:.4f} s/shape at 800 it; "
              f"ratio to autograd-compiled {t / base:.3f}; peak {peaks[name]:.2f} GiB", flush=True)
    ref = codes["autograd-compiled"]
    for name in names[1:]:
        d = (codes[name] - ref).norm(dim=1) / ref.norm(dim=1)
        print(f"codes {name} vs autograd-compiled after {ITERS} it (bf16, same seeds): relative difference "
              f"median {d.median():.2e}, max {d.max():.2e}")

    # Decode: forward only, 64 codes x 4,096 points per forward (262,144 evaluations), as decode_shared chunks.
    frozen = FrozenDecoder(decoder, torch.bfloat16)
    z = torch.randn(B, 256, device=device) * 0.01
    xyz = torch.rand(1, 4096, 3, device=device) * 2 - 1
    compiled = compile_module(decoder, "default", dynamic=False)
    frozen_fwd = compile_module(frozen, "default", dynamic=False)

    def module_fwd() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            return compiled(z.unsqueeze(1), xyz).float()

    def frozen_fwd_call() -> torch.Tensor:
        with torch.no_grad():
            return frozen_fwd(z.unsqueeze(1), xyz)

    for name, fn in (("module-compiled", module_fwd), ("frozen-compiled", frozen_fwd_call)):
        for _ in range(3):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        sync()
        dt = (time.perf_counter() - t0) / 50
        print(f"decode forward {name}: {dt * 1e3:.3f} ms per {B * 4096:,} evaluations "
              f"({B * 4096 / dt / 1e6:.0f} M points/s)", flush=True)
    a, b = module_fwd(), frozen_fwd_call()
    print(f"decode values frozen vs module (bf16): max |diff| {(a - b).abs().max():.2e}, mean |sdf| {a.abs().mean():.2e}")

    from torch.profiler import ProfilerActivity, profile

    one = dataclasses.replace(cfg, num_iterations=5)
    for name in ("autograd-compiled", "frozen-compiled"):
        with profile(activities=[ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU]) as prof:
            reconstruct_codes(variants[name], bank, one, 0.1, 256, B)
            sync()
        print(f"\n--- {name}: kernels of 5 iterations (CUDA time) ---")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main()
