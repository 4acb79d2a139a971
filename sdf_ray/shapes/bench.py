"""Per-stage throughput of the output end on one device (no Ray): ``python -m sdf_ray.shapes.bench``.

- optimise: :func:`reconstruct_codes` for a batch of shapes with the DeepSDF-size decoder (random weights: the
  cost does not depend on them), ``num_iterations`` x ``samples_per_iteration``;
- decode: the coarse-to-fine grid of each shape. A random decoder has no realistic surface, so the points a
  shape needs are counted on analytic synthetic shapes (``sdf_ray.data.synth``: 1.4 M at 256^3) and decoded
  through the real decoder at that count. A trained decoder needs more (4.3 M at 256^3 for the model of
  docs/gpu-results/reconstruct-1000.sh: the ``grid`` line of a reconstruction's summary says it);
  ``--points-per-shape`` decodes that many instead;
- mesh: marching cubes on those analytic shapes' sparse grids (CPU, one core).

Prints one line per stage (seconds per shape, shapes/s) and the peak device memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from sdf_ray import config as config_mod
from sdf_ray.device_settings import resolve_precision
from sdf_ray.model import DeepSDFDecoder
from sdf_ray.shapes.config import ReconstructConfig
from sdf_ray.shapes.decode import decode_points, decode_shared
from sdf_ray.shapes.meshing import coarse_points, decode_grid, extract_mesh
from sdf_ray.shapes.reconstruct import SampleBank, freeze, prepare, reconstruct_codes
from sdf_ray.shapes.samples import ShapeSamples


def synthetic_bank(num_shapes: int, device: torch.device, rows: int, sdf_scale: float = 1.0) -> SampleBank:
    """``num_shapes`` shapes of ``rows`` samples uniform in [-1, 1]^3, their sdf uniform in
    [-sdf_scale, sdf_scale] (seeded: the same bank every run), on ``device``: an optimisation's cost does not depend
    on where the samples are."""
    rng = np.random.default_rng(0)
    shapes = []
    for i in range(num_shapes):
        samples = rng.uniform(-1, 1, size=(rows, 4)).astype(np.float32)
        samples[:, 3] *= sdf_scale
        shapes.append(ShapeSamples(i, samples[samples[:, 3] > 0], samples[samples[:, 3] <= 0]))
    return SampleBank.build(shapes, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=int, default=64, help="shapes per batch")
    p.add_argument("--iterations", type=int, default=800)
    p.add_argument("--samples", type=int, default=8000)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "tf32", "bf16"),
                   help="auto: bf16 on GPUs with native bf16, else fp32")
    p.add_argument("--mesh-shapes", type=int, default=4, help="analytic shapes for the decode and mesh stages")
    p.add_argument("--points-per-shape", type=int, default=0,
                   help="grid points to decode per shape (default: as many as the analytic shapes need); a "
                        "reconstruction's summary says how many a trained decoder needs")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder (optimisation and decoding)")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "max-autotune-no-cudagraphs", "reduce-overhead"))
    p.add_argument("--code-gradient", default="hand-written", choices=("hand-written", "autograd"),
                   help="reconstruct.code_gradient")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, device)
    cfg = dataclasses.replace(ReconstructConfig(), num_iterations=args.iterations, samples_per_iteration=args.samples,
                              precision=args.precision, mesh_resolution=args.resolution,
                              code_gradient=args.code_gradient, compile_mode=args.compile_mode)
    decoder = freeze(DeepSDFDecoder(config_mod.TrainConfig().model).to(device))
    bank = synthetic_bank(args.shapes, device, rows=250_000)
    prepared = prepare(decoder, cfg, 0.1, compile=args.compile)
    static_batch = args.shapes if args.compile else 0  # as the actors do (sdf_ray.shapes.work)
    warm = dataclasses.replace(cfg, num_iterations=3)
    t0 = time.perf_counter()
    reconstruct_codes(prepared.step, bank, warm, 0.1, 256, static_batch)
    _sync(device)
    print(f"warm-up (3 iterations{', compiling' if args.compile else ''}): {time.perf_counter() - t0:.1f} s")
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    codes = reconstruct_codes(prepared.step, bank, cfg, 0.1, 256, static_batch)
    _sync(device)
    t_opt = time.perf_counter() - t0
    print(f"optimise: {args.shapes} shapes x {args.iterations} it x {args.samples} samples ({args.precision}, {args.code_gradient}{f', compiled {args.compile_mode}' if args.compile else ''}) "
          f"{t_opt:.2f} s = {t_opt / args.shapes:.4f} s/shape, {args.shapes / t_opt:.1f} shapes/s", flush=True)

    from sdf_ray.data.synth import synth_shape

    spec = cfg.grid_spec()  # analytic shapes: true distances
    counts, t_mesh = [], 0.0
    for i in range(args.mesh_shapes):
        grid = decode_grid(synth_shape(i, 0).sdf, spec)
        counts.append(grid.num_decoded)
        t1 = time.perf_counter()
        result = extract_mesh(grid)
        t_mesh += time.perf_counter() - t1
        assert result.status == "ok"
    points = args.points_per_shape or int(np.mean(counts))
    pad = static_batch > 0
    all_codes = torch.stack([c.code for c in codes]).to(device)
    coarse_xyz = torch.from_numpy(coarse_points(spec)).to(device)
    # As the actors decode (sdf_ray.shapes.decode.decode_sparse_grids): the coarse grids of all shapes in shared
    # forwards, then the finer points (timed on 8 shapes' points) as decode_points decodes them. The first round
    # compiles.
    fine_shapes = min(8, len(all_codes))
    fine_per_shape = max(0, points - len(coarse_xyz))
    xyz = torch.rand(fine_per_shape * fine_shapes, 3, device=device) * 2 - 1
    index = torch.arange(fine_shapes, device=device).repeat_interleave(fine_per_shape)
    for _ in range(2):
        t1 = time.perf_counter()
        decode_shared(prepared.decode, all_codes, coarse_xyz, cfg.precision, cfg.points_per_forward, pad)
        _sync(device)
        t2 = time.perf_counter()
        decode_points(prepared.decode, all_codes, index, xyz, cfg.precision, cfg.points_per_forward, pad)
        _sync(device)
        t3 = time.perf_counter()
    t_coarse = (t2 - t1) / len(all_codes)
    t_fine = (t3 - t2) / fine_shapes
    t_dec = t_coarse + t_fine
    print(f"decode: {points:,} points/shape{'' if args.points_per_shape else ' (analytic shapes)'} at "
          f"N={spec.resolution} (dense {spec.resolution ** 3:,}; coarse "
          f"{len(coarse_xyz):,}): {t_dec:.4f} s/shape (coarse {t_coarse:.4f}, fine {t_fine:.4f}), "
          f"{1 / t_dec:.1f} shapes/s", flush=True)
    print(f"device total: {t_opt / args.shapes + t_dec:.4f} s/shape, "
          f"{1 / (t_opt / args.shapes + t_dec):.2f} shapes/s", flush=True)
    print(f"mesh (CPU, 1 core): {t_mesh / args.mesh_shapes:.3f} s/shape", flush=True)
    if device.type == "cuda":
        print(f"peak device memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
