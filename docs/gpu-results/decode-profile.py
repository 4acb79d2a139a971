"""Issue 12: where a batch's grid decoding spends its wall time, as an optimiser actor decodes it.

  source .gpu/gpu-env.sh; python docs/gpu-results/decode-profile.py RUN_DIR [SHAPES [DATASET]]

The first SHAPES (64) training codes of a trained run, its decoder compiled as the actors compile it (bf16, the
frozen decoder, static batch), ``decode_sparse_grids`` at the reference's 256^3 twice (the first compiles), then
timed three times, then once under the torch profiler: the top host-side ops by self CPU time and the device's
busy time against the wall. With DATASET (the run's training data): ``sdf_l1`` of those shapes too, timed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from sdf_ray.shapes.config import ReconstructConfig
from sdf_ray.shapes.decode import decode_sparse_grids
from sdf_ray.shapes.meshing import GridSpec
from sdf_ray.shapes.reconstruct import freeze, prepare, sdf_l1
from sdf_ray.shapes.trained_run import build_decoder, load_trained_run


def main() -> None:
    run = load_trained_run(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    device = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu RES=32: a smoke test
    cfg = dataclasses.replace(ReconstructConfig(), precision="bf16" if device.type == "cuda" else "fp32", compile=True)
    prepared = prepare(freeze(build_decoder(run.decoder_payload(), device)), cfg, 0.1, compile=True)
    codes = run.latents_NL[:n].to(device)
    spec = GridSpec(int(os.environ.get("RES", cfg.mesh_resolution)), cfg.mesh_coarse_stride, cfg.mesh_refine_margin)

    def once() -> list:
        out = decode_sparse_grids(prepared.decode, codes, spec, cfg.precision, cfg.points_per_forward, n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    for _ in range(2):
        t0 = time.perf_counter()
        grids = once()
        print(f"warm-up: {time.perf_counter() - t0:.2f} s", flush=True)
    points = sum(g.num_decoded for g in grids) / len(grids)
    if len(sys.argv) > 3:
        from sdf_ray.data.format import read_manifest
        from sdf_ray.shapes.reconstruct import SampleBank
        from sdf_ray.shapes.samples import load_shape_samples

        shapes = load_shape_samples(sys.argv[3], list(range(n)), read_manifest(sys.argv[3]))
        bank = SampleBank.build(shapes, device)
        for _ in range(3):
            t0 = time.perf_counter()
            sdf_l1(prepared.model, bank, codes, 0.1, cfg.precision, cfg.points_per_forward)
            print(f"sdf_l1 of {n} shapes ({sum(map(sum, bank.sign_counts)):,} samples): "
                  f"{time.perf_counter() - t0:.3f} s", flush=True)
    for _ in range(3):
        t0 = time.perf_counter()
        once()
        dt = time.perf_counter() - t0
        print(f"decode {n} shapes: {dt:.3f} s wall = {dt / n:.4f} s/shape ({points / 1e6:.2f} M points/shape, "
              f"{points * n / dt / 1e6:.0f} M points/s)", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        once()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    print(f"\nprofiled: wall {wall:.3f} s, device busy {device_us / 1e6:.3f} s (kernels and copies)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
