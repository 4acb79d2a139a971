"""Issue 12: the last level of grid decoding by the margin, or following the surface, with a trained decoder.

  source .gpu/gpu-env.sh; python docs/gpu-results/follow-surface-check.py RUN_DIR [SHAPES [DENSE]]

The first SHAPES (64) training codes of a trained run, decoded at the reference's 256^3 as the actors decode them
(bf16, the frozen decoder compiled, static batch) by three plans, alternated three times after a warm-up: the
margin at every level (``mesh_follow_surface`` off), following the surface at the last level, and that with values
beyond the run's clamp distance read as far (``GridSpec.far``, what the actors do). Points decoded per shape and wall
time; then every shape's meshes are compared with the margin's (faces and vertices), and the first DENSE (8) shapes
are also decoded densely (every grid point, through the same decoder calls) and compared with each.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from sdf_ray.shapes.config import ReconstructConfig
from sdf_ray.shapes.decode import decode_points, decode_sparse_grids
from sdf_ray.shapes.meshing import GridSpec, SparseGrid, extract_mesh, grid_points
from sdf_ray.shapes.reconstruct import freeze, prepare
from sdf_ray.shapes.trained_run import build_decoder, load_trained_run


def mesh_of(grid: SparseGrid) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    r = extract_mesh(grid)
    return (r.status, None, None) if r.mesh is None else (r.status, r.mesh.verts_V3, r.mesh.faces_F3)


def same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and (a[1] is None or (a[2].shape == b[2].shape and np.array_equal(a[2], b[2])
                                               and np.array_equal(a[1], b[1])))


def main() -> None:
    run = load_trained_run(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    n_dense = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    device = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu RES=32: a smoke test
    cfg = dataclasses.replace(ReconstructConfig(), precision="bf16" if device.type == "cuda" else "fp32", compile=True)
    prepared = prepare(freeze(build_decoder(run.decoder_payload(), device)), cfg, 0.1, compile=True)
    codes = run.latents_NL[:n].to(device)
    res = int(os.environ.get("RES", cfg.mesh_resolution))
    clamp = run.config.loss.clamp_dist
    specs = {"margin": GridSpec(res, cfg.mesh_coarse_stride, cfg.mesh_refine_margin, False),
             "follow": GridSpec(res, cfg.mesh_coarse_stride, cfg.mesh_refine_margin, True),
             f"follow, far beyond {clamp}": cfg.grid_spec(clamp, res)}

    def once(name: str) -> tuple[list[SparseGrid], float]:
        t0 = time.perf_counter()
        out = decode_sparse_grids(prepared.decode, codes, specs[name], cfg.precision, cfg.points_per_forward, n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    grids = {}
    for name in specs:
        grids[name], dt = once(name)
        print(f"warm-up, {name}: {dt:.2f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in specs}
    for _ in range(3):
        for name in specs:
            times[name].append(once(name)[1])
    for name in specs:
        g = grids[name]
        mid = sum(x.num_mid for x in g) / n
        fine = sum(x.fine_values.size for x in g) / n
        total = sum(x.num_decoded for x in g) / n
        best = min(times[name])
        print(f"{name}: {total / 1e6:.2f} M points per shape (mid levels {mid / 1e6:.2f} M, last "
              f"level {fine / 1e6:.2f} M, {total / res ** 3:.1%} of the grid); {n} shapes in "
              f"{', '.join(f'{t:.3f}' for t in times[name])} s: {best / n:.4f} s per shape (best); wall ratio "
              f"to the margin's {best / min(times['margin']):.3f}", flush=True)

    dense_spec = GridSpec(res)
    dense = []
    if n_dense:
        points = torch.from_numpy(grid_points(dense_spec.axis())).to(device)
        for b in range(n_dense):
            index = torch.full((len(points),), b, dtype=torch.int64, device=device)
            values = decode_points(prepared.decode, codes, index, points, cfg.precision, cfg.points_per_forward,
                                   pad=True)
            dense.append(SparseGrid(dense_spec, values.cpu().numpy(), np.zeros((0, 0, 0), dtype=bool),
                                    np.zeros(0, dtype=np.float32)))
    with ProcessPoolExecutor(max(1, (os.cpu_count() or 2) - 1)) as pool:
        meshes = {name: list(pool.map(mesh_of, grids[name])) for name in specs}
        dense_meshes = list(pool.map(mesh_of, dense))
    for name in specs:
        equal = sum(same(a, b) for a, b in zip(meshes["margin"], meshes[name]))
        print(f"meshes, {name} against the margin's: {equal} of {n} identical (statuses "
              f"{sorted(set(m[0] for m in meshes[name]))})")
    for b, d in enumerate(dense_meshes):
        print(f"  shape {b}: dense {d[0]} {0 if d[2] is None else len(d[2])} faces; identical: "
              + ", ".join(f"{name} {same(d, meshes[name][b])}" for name in specs))


if __name__ == "__main__":
    main()
