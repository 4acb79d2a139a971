"""Metrics against hand-computed truth."""

from __future__ import annotations

import numpy as np
import pytest

from sdf_ray.data.format import to_normalized
from sdf_ray.shapes.meshing import Mesh
from sdf_ray.shapes.metrics import chamfer_l2, mesh_metrics, point_metrics, sample_mesh


def icosphere(radius: float, subdivisions: int = 5) -> Mesh:
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return Mesh(np.asarray(m.vertices), np.asarray(m.faces))


def sphere_points(radius: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.random.default_rng(seed).normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return d * radius, d


def expected_chamfer(r: float, d: float, n: int) -> tuple[float, float]:
    """(chamfer_l2, chamfer_l1) of n samples on a sphere of radius r against n on radius r + d: every point is d
    off radially, plus the tangential offset to the nearest sample of a Poisson set of density n / (4 pi R^2),
    whose mean square is 1 / (pi density) = 4 R^2 / n; for L1, sqrt(d^2 + t^2) ~ d + t^2 / (2d)."""
    t2_rec, t2_gt = 4 * r * r / n, 4 * (r + d) ** 2 / n
    l2 = 2 * d * d + t2_rec + t2_gt
    l1 = 0.5 * (2 * d + (t2_rec + t2_gt) / (2 * d)) if d > 0 else float("nan")
    return l2, l1


def test_hand_computed_example():
    rec = np.array([[0.0, 0.0, 0.0]])
    gt = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    # gt -> rec: 1 and 2 (squared 1, 4); rec -> gt: 1
    assert chamfer_l2(rec, gt) == pytest.approx((1 + 4) / 2 + 1)
    m = point_metrics(rec, gt, tau=1.5)
    assert m.chamfer_l2 == pytest.approx(3.5)
    assert m.chamfer_l1 == pytest.approx(0.5 * ((1 + 2) / 2 + 1))
    assert m.precision == 1.0 and m.recall == 0.5
    assert m.fscore == pytest.approx(2 * 0.5 / 1.5)
    assert np.isnan(m.normal_consistency)


def test_a_mesh_against_its_own_surface_samples_is_zero():
    mesh = icosphere(0.5, 4)
    gt, gt_n = sample_mesh(mesh, 30_000, seed=1)
    m = mesh_metrics(mesh, gt, gt_n, {"offset": [0, 0, 0], "scale": 1.0}, num_points=30_000, tau_normalized=0.03)
    assert m.chamfer_l2 == pytest.approx(expected_chamfer(0.5, 0.0, 30_000)[0], rel=0.1)
    assert m.chamfer_l2 < 1e-4
    assert m.normal_consistency > 0.999
    assert m.fscore > 0.999


@pytest.mark.parametrize("d", [0.02, 0.05])
def test_sphere_r_against_sphere_r_plus_d(d):
    r = 0.5
    gt, gt_n = sphere_points(r + d, 30_000, seed=0)
    m = mesh_metrics(icosphere(r, 6), gt, gt_n, {"offset": [0, 0, 0], "scale": 1.0}, num_points=30_000,
                     tau_normalized=d / 2)
    # every point is d from the other sphere: d^2 each way (2 d^2), plus the sampling term
    l2, l1 = expected_chamfer(r, d, 30_000)
    assert m.chamfer_l2 == pytest.approx(l2, rel=0.02)
    assert m.chamfer_l2 == pytest.approx(2 * d * d, rel=0.1)
    assert m.chamfer_l1 == pytest.approx(l1, rel=0.02)
    assert m.normal_consistency > 0.999
    assert m.fscore == 0.0  # tau = d / 2: nothing is within it
    loose = mesh_metrics(icosphere(r, 6), gt, gt_n, {"offset": [0, 0, 0], "scale": 1.0}, num_points=30_000,
                         tau_normalized=2 * d)
    assert loose.fscore == 1.0


def test_distances_are_measured_in_the_ground_truth_frame_and_tau_in_the_normalised_one():
    norm = {"offset": [1.0, -2.0, 0.5], "scale": 0.25}  # original = normalised / 0.25 - offset
    d = 0.02
    gt_normalised, gt_n = sphere_points(0.5 + d, 30_000, seed=3)
    gt_original = gt_normalised / norm["scale"] - np.asarray(norm["offset"])
    np.testing.assert_allclose(to_normalized(gt_original, norm), gt_normalised, atol=1e-12)
    m = mesh_metrics(icosphere(0.5, 6), gt_original, gt_n, norm, num_points=30_000, tau_normalized=2 * d)
    assert m.chamfer_l2 == pytest.approx(expected_chamfer(0.5, d, 30_000)[0] / norm["scale"] ** 2, rel=0.02)
    assert m.fscore == 1.0  # 2d in the normalised frame is 2d / scale in the original one


def test_normal_consistency_ignores_orientation_and_sees_perpendicular_normals():
    pts = np.random.default_rng(0).uniform(size=(500, 3))
    up = np.tile([0.0, 0.0, 1.0], (500, 1))
    assert point_metrics(pts, pts, 0.1, up, -up).normal_consistency == pytest.approx(1.0)
    side = np.tile([1.0, 0.0, 0.0], (500, 1))
    assert point_metrics(pts, pts, 0.1, up, side).normal_consistency == pytest.approx(0.0)


def test_surface_samples_are_area_weighted_and_seeded():
    # two triangles, the second with 3x the area
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [10, 0, 0], [13, 0, 0], [10, 1, 0]], dtype=float)
    mesh = Mesh(verts, np.array([[0, 1, 2], [3, 4, 5]]))
    a, _ = sample_mesh(mesh, 20_000, seed=7)
    b, _ = sample_mesh(mesh, 20_000, seed=7)
    np.testing.assert_array_equal(a, b)
    assert (a[:, 0] >= 10).mean() == pytest.approx(0.75, abs=0.02)
