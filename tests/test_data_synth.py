"""Synthetic shapes: exact SDFs, DeepSDF-like sampling, determinism, and the synth -> Parquet -> sampler round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdf_ray.data import synth, synth_shapes
from sdf_ray.data.format import load_scenes, read_manifest
from sdf_ray.data.sampler import SceneSampler
from sdf_ray.data.synth import synth_dataset, synth_scene, synth_shape
from sdf_ray.data.synth_shapes import PRIMITIVES, Primitive, SynthShape, project_to_surface, smooth_min
from sdf_ray.errors import DataError


def test_primitive_sdfs_hand_values() -> None:
    p = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    np.testing.assert_allclose(synth_shapes.sdf_sphere(p, 1.0), [-1.0, 1.0, -0.5])
    np.testing.assert_allclose(synth_shapes.sdf_box(np.array([[0.0, 0, 0], [2, 0, 0], [2, 2, 0]]), 1, 1, 1),
                               [-1.0, 1.0, np.sqrt(2)])
    np.testing.assert_allclose(synth_shapes.sdf_rounded_box(np.array([[2.0, 2.0, 0.0]]), 1, 1, 1, 0.5),
                               [np.sqrt(2) * 1.5 - 0.5])
    np.testing.assert_allclose(synth_shapes.sdf_torus(np.array([[1.0, 0, 0], [0, 0, 0], [0, 1, 0]]), 1.0, 0.25),
                               [-0.25, 0.75, np.sqrt(2) - 0.25])
    np.testing.assert_allclose(synth_shapes.sdf_capsule(np.array([[0.0, 3, 0], [1.0, 0, 0]]), 1.0, 0.5), [1.5, 0.5])
    np.testing.assert_allclose(synth_shapes.sdf_cylinder(np.array([[0.0, 0, 0], [3, 3, 0], [0, 2, 0]]), 1.0, 1.0),
                               [-1.0, np.sqrt(8), 1.0])
    # Cone of half height 1 from radius 1 (bottom) to 0.5 (top): points on the axis and beyond each cap.
    np.testing.assert_allclose(synth_shapes.sdf_cone(np.array([[0.0, 2, 0], [0, -3, 0], [0, 0, 0]]), 1.0, 1.0, 0.5),
                               [1.0, 2.0, -0.75 * 2 / np.sqrt(4.25)], rtol=1e-6)


@pytest.mark.parametrize("kind", PRIMITIVES)
def test_primitive_sdf_is_exact_distance(kind: str) -> None:
    """|sdf(q)| equals the brute-force distance from q to a dense sampling of the surface."""
    rng = np.random.default_rng(7)
    prim = Primitive(kind=kind, params=synth_shapes._random_params(kind, rng), rotation=synth_shapes._random_rotation(rng),
                     translation=rng.uniform(-0.1, 0.1, size=3))
    shape = SynthShape(primitives=(prim,), blend_k=0.0, offset=np.zeros(3), scale=1.0)
    surface = synth._surface_points(shape, rng, 20_000)
    assert np.abs(shape.sdf(surface)).max() < 1e-4
    queries = rng.uniform(-1.2, 1.2, size=(200, 3))
    sq = (queries**2).sum(1)[:, None] + (surface**2).sum(1)[None, :] - 2 * queries @ surface.T
    brute = np.sqrt(np.maximum(sq.min(axis=1), 0.0))
    d = np.abs(shape.sdf(queries))
    # Never overestimates (surface points are within 1e-4 of the surface): the nearest one is at |sdf|.
    assert (d <= brute + 2e-4).all()
    assert np.percentile(brute - d, 95) < 0.03  # and the dense sampling gets close to it


def test_smooth_min_bounds() -> None:
    a = np.linspace(-1, 1, 101)
    b = a[::-1].copy()
    s = smooth_min(a, b, 0.2)
    assert (s <= np.minimum(a, b)).all() and (s >= np.minimum(a, b) - 0.05 - 1e-12).all()
    far = np.abs(a - b) >= 0.2
    np.testing.assert_array_equal(s[far], np.minimum(a, b)[far])


def test_scene_sampling_statistics() -> None:
    near, uniform_ok, kinds = [], [], set()
    for i in range(24):
        scene = synth_scene(i, seed=3, num_samples=4000)
        kinds.add(scene.name.split("-", 2)[2].split("-")[0])
        assert scene.name.startswith(f"synth-{i:06d}-")
        rows = np.concatenate([scene.pos_N4, scene.neg_N4])
        assert rows.shape == (4000, 4) and rows.dtype == np.float32
        assert len(scene.pos_N4) > 0 and len(scene.neg_N4) > 0
        assert (scene.pos_N4[:, 3] > 0).all() and (scene.neg_N4[:, 3] <= 0).all()
        near.append(float((np.abs(rows[:, 3]) < 0.1).mean()))
        uniform_ok.append(float((np.abs(rows[:, :3]) <= 1.0).all(axis=1).mean()))
        # The shape lies inside the unit sphere.
        shape = synth_shape(i, 3)
        surf = synth._surface_points(shape, np.random.default_rng(0), 2000)
        assert np.linalg.norm(surf, axis=1).max() <= 1.0
        assert scene.normalization["scale"] == pytest.approx(shape.scale)
    assert min(near) > 0.8  # ~94% of points are near-surface (sigma 0.05 / 0.016)
    assert np.mean(near) > 0.88
    assert min(uniform_ok) > 0.9
    assert "union" in kinds and len(kinds) >= 5


def test_near_surface_noise_levels() -> None:
    """The two near-surface bands have the DeepSDF noise scales (sdf std ~ sigma for a smooth surface)."""
    rng = np.random.default_rng(0)
    shape = SynthShape(primitives=(Primitive("sphere", (0.5,), np.eye(3), np.zeros(3)),), blend_k=0.0,
                       offset=np.zeros(3), scale=1.0)
    pts = synth._draw_points(shape, rng, 20_000)
    d = shape.sdf(pts)
    n_near = 20_000 - round(0.06 * 20_000)
    assert np.std(d[: n_near // 2]) == pytest.approx(0.05, rel=0.1)
    assert np.std(d[n_near // 2:n_near]) == pytest.approx(np.sqrt(0.00025), rel=0.1)
    assert np.abs(pts[n_near:]).max() <= 1.0


def test_union_projection_converges() -> None:
    for i in range(60):
        shape = synth_shape(i, 11)
        if len(shape.primitives) > 1:
            start = np.random.default_rng(i).uniform(-1, 1, size=(2000, 3))
            _, ok = project_to_surface(shape, start, 3)
            assert ok.mean() > 0.9, shape.kind
            break
    else:  # pragma: no cover
        pytest.fail("no union among 60 scenes")


def test_determinism_and_seed_dependence() -> None:
    a, b = synth_scene(5, 1, 1000), synth_scene(5, 1, 1000)
    np.testing.assert_array_equal(a.pos_N4, b.pos_N4)
    np.testing.assert_array_equal(a.neg_N4, b.neg_N4)
    assert a.name == b.name and a.normalization == b.normalization
    c = synth_scene(5, 2, 1000)
    d = synth_scene(6, 1, 1000)
    for other in (c, d):
        assert other.normalization != a.normalization
        assert not np.array_equal(np.concatenate([other.pos_N4, other.neg_N4]), np.concatenate([a.pos_N4, a.neg_N4]))


def test_tiny_scene_has_both_signs() -> None:
    for i in range(20):
        s = synth_scene(i, 0, 2)
        assert len(s.pos_N4) == 1 and len(s.neg_N4) == 1


def test_bad_arguments() -> None:
    with pytest.raises(DataError, match="positive even"):
        synth_dataset("/nonexistent/never", 2, 101, 0)
    with pytest.raises(DataError, match="seed must be non-negative"):
        synth_dataset("/nonexistent/never", 2, 100, -1)
    with pytest.raises(DataError, match="at least 2 samples"):
        synth_scene(0, 0, 1)


def test_synth_parquet_sampler_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = synth_dataset(out, num_scenes=6, samples_per_scene=2000, seed=4)
    assert manifest.num_scenes == 6 and manifest.num_samples == 12_000
    assert [s.name for s in read_manifest(out).scenes] == [synth_scene(i, 4, 8).name for i in range(6)]
    ids = [5, 1, 3]
    packed = load_scenes(out, ids)
    sampler = SceneSampler(packed, scenes_per_step=2, samples_per_scene=64, steps_per_epoch=2, seed=0, rank=0,
                           device=torch.device("cpu"))
    for step in range(4):
        scene_idx, xyz, sdf = sampler.batch(step)
        for b, local in enumerate(scene_idx.tolist()):
            rows = slice(b * 64, (b + 1) * 64)
            shape = synth_shape(ids[local], 4)
            expected = shape.sdf(xyz[rows].numpy().astype(np.float64))
            np.testing.assert_allclose(sdf[rows].numpy(), expected, atol=2e-6)
            assert (sdf[rows][:32] > 0).all() and (sdf[rows][32:] <= 0).all()
    # The stored data equals a fresh generation of the same scenes.
    again = synth_scene(3, 4, 2000)
    j = ids.index(3)
    stored = packed.samples_M4[packed.pos_offset[j]:packed.neg_offset[j] + packed.neg_count[j]]
    np.testing.assert_array_equal(stored, np.concatenate([again.pos_N4, again.neg_N4]))
    # A different seed gives a different dataset.
    other = synth_dataset(tmp_path / "other", num_scenes=6, samples_per_scene=2000, seed=5)
    assert [s.normalization for s in other.scenes] != [s.normalization for s in manifest.scenes]
