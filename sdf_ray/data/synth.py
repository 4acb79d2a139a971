"""Synthetic datasets: random analytic shapes with exact SDFs, sampled like DeepSDF, with exact ground truth.

Each scene is one primitive or a smooth union of 2-3 of them (:mod:`~sdf_ray.data.synth_shapes`).
Samples follow DeepSDF's recipe: ~47% of the points near the surface with Gaussian noise of variance
0.0025, ~47% with variance 0.00025, ~6% uniform in [-1, 1]^3, around surface points found by projecting
random points onto the surface with a few Newton steps along the (finite-difference) gradient.
Every scene also carries exact ground truth: area-uniform surface samples with their normals, in the shape's
original frame (:mod:`~sdf_ray.data.synth_surface`), 30,000 by default like DeepSDF's SurfaceSamples.

Everything is deterministic in ``(seed, index)``: ``np.random.default_rng([seed, index])`` draws the
shape first, then the samples, so :func:`synth_shape` rebuilds exactly the shape :func:`synth_scene` sampled;
the ground truth comes from a stream of its own, ``[seed, index, 1]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sdf_ray.data.format import Manifest, SceneSamples, write_dataset
from sdf_ray.data.synth_shapes import SynthShape, draw_shape, project_to_surface, seed_key, synth_shape
from sdf_ray.data.synth_surface import surface_samples
from sdf_ray.errors import DataError

__all__ = ["DEFAULT_SURFACE_SAMPLES", "SynthShape", "check_synth_args", "surface_samples", "synth_dataset",
           "synth_scene", "synth_shape"]

NEAR_SIGMAS = (float(np.sqrt(0.0025)), float(np.sqrt(0.00025)))
UNIFORM_FRACTION = 0.06
DEFAULT_SURFACE_SAMPLES = 30_000  # ground-truth points per scene, as DeepSDF's SurfaceSamples


# --------------------------------------------------------------------------------------------------
# Sampling of SDF samples


def _surface_points(shape: SynthShape, rng: np.random.Generator, n: int) -> np.ndarray:
    # One Newton step lands an exact SDF's points on the surface (up to the O(eps^2) gradient error);
    # the smooth-min is not a distance near the blend, so unions take a few more.
    steps = 1 if len(shape.primitives) == 1 else 3
    out: list[np.ndarray] = []
    have = 0
    for _ in range(20):
        m = int((n - have) * 1.1) + 16
        start = rng.normal(size=(m, 3))
        start *= (rng.uniform(size=(m, 1)) ** (1 / 3)) / np.linalg.norm(start, axis=1, keepdims=True)
        p, ok = project_to_surface(shape, start, steps)
        out.append(p[ok])
        have += int(ok.sum())
        if have >= n:
            break
    pts = np.concatenate(out)
    if len(pts) < n:  # pragma: no cover - would need a degenerate shape
        raise AssertionError(f"surface projection converged for only {len(pts)} of {n} points")
    return pts[:n]


def _draw_points(shape: SynthShape, rng: np.random.Generator, num_samples: int) -> np.ndarray:
    n_uniform = int(round(UNIFORM_FRACTION * num_samples))
    n_near = num_samples - n_uniform
    n_a = n_near // 2
    surf = _surface_points(shape, rng, n_near)
    sigma = np.where(np.arange(n_near) < n_a, NEAR_SIGMAS[0], NEAR_SIGMAS[1])[:, None]
    near = surf + rng.normal(size=(n_near, 3)) * sigma
    uniform = rng.uniform(-1.0, 1.0, size=(n_uniform, 3))
    return np.concatenate([near, uniform])


def synth_scene(index: int, seed: int, num_samples: int, num_surface: int = DEFAULT_SURFACE_SAMPLES) -> SceneSamples:
    """Scene ``index`` of the synthetic dataset ``seed``: ``num_samples`` points with their SDF, and
    ``num_surface`` ground-truth surface points with their normals (0: none).

    Guaranteed to contain both signs (points are redrawn in the rare case one side is empty). The surface
    samples come from a random stream of their own, so the SDF samples do not depend on ``num_surface``.
    """
    if num_samples < 2:
        raise DataError(f"a synthetic scene needs at least 2 samples, got {num_samples}")
    if num_surface < 0:
        raise DataError(f"the number of surface samples must be >= 0, got {num_surface}")
    rng = np.random.default_rng(seed_key(seed, index))
    shape = draw_shape(rng)
    for _ in range(100):
        xyz = _draw_points(shape, rng, num_samples).astype(np.float32)
        # The SDF of the stored float32 point, so stored values are exact for what is stored.
        sdf = shape.sdf(xyz.astype(np.float64)).astype(np.float32)
        samples = np.concatenate([xyz, sdf[:, None]], axis=1)
        is_pos = sdf > 0
        if 0 < int(is_pos.sum()) < num_samples:
            break
    else:  # pragma: no cover - probability ~2^-100
        raise AssertionError("could not draw samples of both signs")
    points = normals = None
    if num_surface:
        points, normals = surface_samples(shape, np.random.default_rng([*seed_key(seed, index), 1]), num_surface)
    return SceneSamples(
        name=f"synth-{index:06d}-{shape.kind.replace('_', '-')}",
        pos_N4=samples[is_pos],
        neg_N4=samples[~is_pos],
        normalization={"offset": [float(v) for v in shape.offset], "scale": float(shape.scale)},
        surface_points_M3=None if points is None else points.astype(np.float32),
        surface_normals_M3=None if normals is None else normals.astype(np.float32),
    )


def synth_dataset(out_dir: str | Path, num_scenes: int, samples_per_scene: int, seed: int,
                  overwrite: bool = False, *, surface_samples_per_scene: int = DEFAULT_SURFACE_SAMPLES) -> Manifest:
    """Generate ``num_scenes`` synthetic scenes and write them as a dataset at ``out_dir`` (atomically), each
    with ``surface_samples_per_scene`` ground-truth surface samples (0: none)."""
    check_synth_args(num_scenes, samples_per_scene, seed, surface_samples_per_scene)

    def scenes() -> Iterator[SceneSamples]:
        for i in range(num_scenes):
            yield synth_scene(i, seed, samples_per_scene, surface_samples_per_scene)

    source = {"type": "synth", "num_scenes": num_scenes, "samples_per_scene": samples_per_scene, "seed": seed}
    return write_dataset(out_dir, scenes(), source, overwrite=overwrite)


def check_synth_args(num_scenes: int, samples_per_scene: int, seed: int,
                     surface_samples_per_scene: int = DEFAULT_SURFACE_SAMPLES) -> None:
    """Raise DataError on arguments :func:`synth_dataset` cannot honour."""
    if num_scenes <= 0:
        raise DataError(f"number of scenes must be positive, got {num_scenes}")
    if samples_per_scene <= 0 or samples_per_scene % 2:
        raise DataError(f"samples per scene must be a positive even number, got {samples_per_scene}")
    if seed < 0:
        raise DataError(f"seed must be non-negative, got {seed}")
    if surface_samples_per_scene < 0:
        raise DataError(f"surface samples per scene must be >= 0 (0: no ground truth), got "
                        f"{surface_samples_per_scene}")
