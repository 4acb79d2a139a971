"""Mesh to SDF samples (no Ray): distances and signs against exact SDFs, defects, sampling, normalisation, bad meshes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trimesh

from sdf_ray.data.mesh_bench import (
    box,
    brute_force_distance,
    flip_faces,
    punch_hole,
    sphere,
    split_vertices,
    torus,
    two_parts,
)
from sdf_ray.data.mesh_config import MeshSamplingConfig
from sdf_ray.data.mesh_sdf import (
    Mesh,
    MeshError,
    denormalize_points,
    distance_and_winding,
    load_mesh,
    mesh_to_samples,
    normalization_params,
    normalize_points,
    orient_faces,
    process_mesh,
    sample_query_points,
    sample_surface,
    scene_rng,
    set_igl_threads,
    signed_distance,
    spatial_order,
    unsigned_distance,
)
from sdf_ray.errors import ConfigError

set_igl_threads(1)
SMALL = MeshSamplingConfig(num_samples=4000, num_surface_samples=500)


def queries(mesh: Mesh, n: int, seed: int = 0) -> np.ndarray:
    """Near-surface and uniform points around ``mesh`` in its own frame."""
    rng = np.random.default_rng(seed)
    surf, _ = sample_surface(mesh, n // 2, rng)
    lo, hi = mesh.vertices_V3.min(0) - 0.3, mesh.vertices_V3.max(0) + 0.3
    return np.concatenate([surf + rng.normal(scale=0.05, size=surf.shape), rng.uniform(lo, hi, size=(n - n // 2, 3))])


def deviation(mesh: Mesh, sdf) -> float:
    """How far the triangulation strays from the analytic surface."""
    surf, _ = sample_surface(mesh, 50_000, np.random.default_rng(9))
    return float(np.abs(sdf(surf)).max())


def wrong_signs(mesh: Mesh, sdf, q: np.ndarray, margin: float = 0.2) -> tuple[int, int]:
    """(wrong signs among decided points away from the surface, dropped points)."""
    got, decided = signed_distance(mesh, q, margin)
    exact = sdf(q)
    judged = decided & (np.abs(exact) > 1e-3 + deviation(mesh, sdf))
    return int(((got <= 0) != (exact <= 0))[judged].sum()), int((~decided).sum())


def save(mesh: Mesh, path: Path) -> Path:
    trimesh.Trimesh(mesh.vertices_V3, mesh.faces_F3, process=False).export(path)
    return path


# --------------------------------------------------------------------------------------------------
# Distances and signs against exact SDFs


def test_box_distance_and_sign_are_exact():
    mesh, sdf = box(1)
    q = queries(mesh, 4000)
    got, decided = signed_distance(mesh, q)
    assert decided.all()
    np.testing.assert_allclose(got, sdf(q), atol=1e-12)


def test_distance_is_exact_to_the_triangles():
    mesh, _ = torus(24, 12)
    q = queries(mesh, 300)
    np.testing.assert_allclose(unsigned_distance(mesh, q), brute_force_distance(mesh, q), rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: sphere(3), lambda: torus(48, 24), lambda: box(2)],
                         ids=["sphere", "torus", "box"])
def test_closed_meshes_have_no_wrong_sign_away_from_the_surface(make):
    mesh, sdf = make()
    q = queries(mesh, 6000)
    wrong, dropped = wrong_signs(mesh, sdf, q)
    assert (wrong, dropped) == (0, 0)
    d, _ = signed_distance(mesh, q)
    # The triangulation deviates from the analytic surface by h: so may the distances.
    assert np.abs(np.abs(d) - np.abs(sdf(q))).max() <= deviation(mesh, sdf) + 1e-9


@pytest.mark.parametrize("variant", ["flipped", "split", "flipped+split", "inside-out"])
def test_sign_survives_flipped_faces_and_split_vertices(variant):
    mesh, sdf = torus(48, 24)
    rng = np.random.default_rng(3)
    if "flipped" in variant:
        mesh = flip_faces(mesh, 0.3, rng)
    if "split" in variant:
        mesh = split_vertices(mesh)
    if variant == "inside-out":
        mesh = Mesh(mesh.vertices_V3, mesh.faces_F3[:, [0, 2, 1]])
    repaired, num_flipped, parts = orient_faces(mesh)
    assert parts == 1  # seams are matched by position
    assert (num_flipped > 0) == (variant != "split")
    assert wrong_signs(repaired, sdf, queries(mesh, 6000)) == (0, 0)


def test_without_orientation_repair_flipped_faces_break_the_sign():
    mesh, sdf = sphere(3)
    flipped = flip_faces(mesh, 0.3, np.random.default_rng(0))
    q = queries(mesh, 4000)
    wrong, dropped = wrong_signs(flipped, sdf, q)
    assert wrong + dropped > 100  # why MeshSamplingConfig.repair_orientation exists


def test_orientation_repair_keeps_a_consistent_mesh_and_counts_flips():
    mesh, _ = sphere(3)
    same, flipped, parts = orient_faces(mesh)
    assert (flipped, parts) == (0, 1)
    np.testing.assert_array_equal(same.faces_F3, mesh.faces_F3)
    rng = np.random.default_rng(1)
    f = mesh.faces_F3.copy()
    sel = rng.uniform(size=len(f)) < 0.2
    f[sel] = f[sel][:, [0, 2, 1]]
    fixed, flipped, _ = orient_faces(Mesh(mesh.vertices_V3, f))
    assert flipped == int(sel.sum())
    np.testing.assert_array_equal(np.sort(fixed.faces_F3, axis=1), np.sort(mesh.faces_F3, axis=1))


def test_two_disconnected_parts_one_inside_out():
    mesh, sdf = sphere(3)
    parts, parts_sdf = two_parts(mesh, sdf, np.array([3.0, 0.0, 0.0]))
    repaired, _, num_parts = orient_faces(parts)
    assert num_parts == 2
    assert wrong_signs(repaired, parts_sdf, queries(parts, 6000)) == (0, 0)


@pytest.mark.parametrize("defects", ["hole", "hole+flipped+split"])
def test_holes_cost_few_wrong_signs_and_only_near_the_hole(defects):
    mesh, sdf = sphere(4)
    top = np.array([1.0, 0.0, 0.0])
    holed = punch_hole(mesh, top, 0.3)
    assert holed.num_triangles < mesh.num_triangles
    if defects != "hole":
        holed = split_vertices(flip_faces(holed, 0.25, np.random.default_rng(0)))
    repaired, _, _ = orient_faces(holed)
    q = queries(mesh, 20_000)
    got, decided = signed_distance(repaired, q)
    exact = sdf(q)
    judged = decided & (np.abs(exact) > 1e-3 + deviation(mesh, sdf))
    wrong = judged & ((got <= 0) != (exact <= 0))
    near = np.linalg.norm(q - top, axis=1) < 0.6
    assert not (wrong & ~near).any()
    assert wrong[near].sum() <= 0.005 * judged[near].sum()
    assert not (~decided & ~near).any()  # only samples near the hole are ambiguous


# --------------------------------------------------------------------------------------------------
# Sampling recipe


def test_sampling_proportions_and_variances():
    mesh, _ = sphere(4)
    norm = normalization_params(mesh)
    normed = Mesh(normalize_points(mesh.vertices_V3, norm), mesh.faces_F3)
    cfg = MeshSamplingConfig(num_samples=40_000)
    xyz = sample_query_points(normed, cfg, np.random.default_rng(0))
    n_surf = cfg.num_near_surface_points
    assert n_surf == 18_800 and cfg.num_uniform == 2_400 and len(xyz) == 40_000  # 47/50 near, 3/50 uniform
    uniform = xyz[2 * n_surf:]
    assert np.abs(uniform).max() <= 1.0 and np.abs(uniform).max() > 0.99
    # Isotropic Gaussian noise of std sigma: the distance to a (locally flat) surface is half-normal,
    # mean sigma * sqrt(2/pi). "Variance" in the reference is the variance: sigma = sqrt(0.005), sqrt(0.0005).
    d = unsigned_distance(normed, xyz)
    for part, variance in ((d[:n_surf], 0.005), (d[n_surf:2 * n_surf], 0.0005)):
        assert part.mean() == pytest.approx(np.sqrt(variance) * np.sqrt(2 / np.pi), rel=0.05)


def test_mesh_to_samples_splits_by_sign_and_keeps_every_decided_sample():
    mesh, sdf = torus(48, 24)
    ms = mesh_to_samples(mesh, SMALL, scene_rng(0, "torus"))
    assert len(ms.pos_N4) + len(ms.neg_N4) + ms.num_dropped_ambiguous == SMALL.num_samples
    assert ms.num_dropped_ambiguous == 0
    assert (ms.pos_N4[:, 3] > 0).all() and (ms.neg_N4[:, 3] <= 0).all()
    assert ms.pos_N4.dtype == np.float32
    # Stored SDFs are in the normalised frame: the original-frame SDF times the scale.
    rows = np.concatenate([ms.pos_N4, ms.neg_N4]).astype(np.float64)
    orig = denormalize_points(rows[:, :3], ms.normalization)
    exact = sdf(orig) * ms.normalization["scale"]
    h = deviation(mesh, sdf) * ms.normalization["scale"]
    assert np.abs(rows[:, 3] - exact).max() <= h + 1e-6


def test_ground_truth_surface_is_in_the_original_frame_with_unit_outward_normals():
    mesh, sdf = sphere(4, radius=2.5)
    mesh = Mesh(mesh.vertices_V3 + [10.0, -3.0, 1.0], mesh.faces_F3)
    ms = mesh_to_samples(flip_faces(mesh, 0.3, np.random.default_rng(0)), SMALL, scene_rng(0, "s"))
    pts, nrm = ms.surface_points_M3.astype(np.float64), ms.surface_normals_M3.astype(np.float64)
    assert pts.shape == nrm.shape == (500, 3) and ms.surface_points_M3.dtype == np.float32
    assert unsigned_distance(mesh, pts).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1, atol=1e-5)
    radial = (pts - [10.0, -3.0, 1.0]) / 2.5
    assert (np.einsum("ij,ij->i", radial, nrm) > 0.9).all()  # repaired orientation: all outward


def test_samples_are_deterministic_in_seed_and_scene_name():
    mesh, _ = box(1)
    a = mesh_to_samples(mesh, SMALL, scene_rng(0, "a"))
    b = mesh_to_samples(mesh, SMALL, scene_rng(0, "a"))
    c = mesh_to_samples(mesh, SMALL, scene_rng(0, "c"))
    np.testing.assert_array_equal(a.pos_N4, b.pos_N4)
    assert not np.array_equal(a.pos_N4[:10], c.pos_N4[:10])


def test_spatial_order_is_a_permutation_and_changes_nothing():
    mesh, _ = sphere(3)
    q = queries(mesh, 3000)
    order = spatial_order(q)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(q)))
    d, w, _ = distance_and_winding(mesh, q)
    np.testing.assert_array_equal(d, unsigned_distance(mesh, q))


# --------------------------------------------------------------------------------------------------
# Normalisation


def test_normalization_matches_the_reference_and_round_trips():
    rng = np.random.default_rng(0)
    mesh, _ = torus(32, 16)
    v = mesh.vertices_V3 * [3.0, 1.0, 0.5] + [100.0, -7.0, 2.0]
    # An unused far-away vertex must not move the frame (the reference only counts vertices in faces).
    mesh = Mesh(np.concatenate([v, [[1e6, 1e6, 1e6]]]), mesh.faces_F3)
    norm = normalization_params(mesh, 1.03)
    used = normalize_points(v, norm)
    np.testing.assert_allclose(used.min(0) + used.max(0), 0, atol=1e-9)  # bounding-box centre at the origin
    assert np.linalg.norm(used, axis=1).max() == pytest.approx(1 / 1.03)
    p = rng.normal(size=(100, 3)) * 50
    np.testing.assert_allclose(denormalize_points(normalize_points(p, norm), norm), p, atol=1e-9)
    assert json.loads(json.dumps(norm)) == norm and norm["scale"] > 0


# --------------------------------------------------------------------------------------------------
# Loading and bad meshes


def test_every_supported_format_loads_and_scenes_are_concatenated(tmp_path):
    mesh, _ = box(1)
    tm = trimesh.Trimesh(mesh.vertices_V3, mesh.faces_F3, process=False)
    for ext in ("obj", "ply", "off", "stl"):
        loaded = load_mesh(save(mesh, tmp_path / f"m.{ext}"))
        assert loaded.num_triangles == mesh.num_triangles, ext
    other = tm.copy()
    scene = trimesh.Scene()
    scene.add_geometry(tm, node_name="a")
    scene.add_geometry(other, node_name="b", transform=trimesh.transformations.translation_matrix([5.0, 0, 0]))
    (tmp_path / "s.glb").write_bytes(scene.export(file_type="glb"))
    glb = load_mesh(tmp_path / "s.glb")
    assert glb.num_triangles == 2 * mesh.num_triangles
    assert glb.vertices_V3[:, 0].max() == pytest.approx(5.8)  # the node transform is baked in
    gltf_dir = tmp_path / "gltf"
    gltf_dir.mkdir()
    for name, data in scene.export(file_type="gltf").items():
        (gltf_dir / name).write_bytes(data)
    assert load_mesh(gltf_dir / "model.gltf").num_triangles == 2 * mesh.num_triangles


BAD = {
    "garbage.ply": (b"this is not a ply file\x00\x01", "unreadable"),
    "empty.obj": (b"", "unreadable: empty file"),
    "points.obj": (b"v 0 0 0\nv 1 0 0\nv 0 1 0\n", "no triangles"),
    "text.obj": (b"hello world\n", "no triangles"),
    "flat.obj": (b"v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n", "zero surface area"),
    "nan.obj": (b"v 0 0 0\nv nan 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 3 4\n", "NaN or infinite vertex"),
    "index.obj": (b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 7\n", "unreadable"),
    "sheet.obj": (b"v 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\nf 1 2 3\nf 2 4 3\n", "encloses no volume"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_mesh_kind_gives_its_reason(tmp_path, name):
    data, reason = BAD[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(MeshError, match=reason):
        process_mesh(path, name, SMALL)


def test_size_limits_and_other_rejections(tmp_path):
    mesh, _ = sphere(2)
    path = save(mesh, tmp_path / "s.obj")
    with pytest.raises(MeshError, match="over the size limit: 320 triangles") as exc:
        process_mesh(path, "s", replace(SMALL, max_triangles=100))
    assert exc.value.num_triangles == 320
    with pytest.raises(MeshError, match="over the size limit: file is"):
        process_mesh(path, "s", replace(SMALL, max_file_bytes=100))
    with pytest.raises(MeshError, match="unreadable"):
        process_mesh(tmp_path / "missing.obj", "m", SMALL)
    with pytest.raises(MeshError, match="unsupported file type"):
        process_mesh(tmp_path / "x.fbx", "x", SMALL)
    # An open sheet leaves many samples undecidable: over the limit, that is the reason given.
    sheet = tmp_path / "sheet.obj"
    sheet.write_bytes(BAD["sheet.obj"][0])
    with pytest.raises(MeshError, match="sign undecidable for"):
        process_mesh(sheet, "sheet", replace(SMALL, max_ambiguous_fraction=0.01))


def test_config_validation_lists_every_problem():
    with pytest.raises(ConfigError) as exc:
        MeshSamplingConfig(num_samples=1, near_variances=(0.005, -1.0), ambiguity_margin=0.5, seed=-1).checked()
    msg = str(exc.value)
    for key in ("num_samples", "near_variances", "ambiguity_margin", "seed"):
        assert key in msg
    cfg = MeshSamplingConfig(num_samples=1000)
    assert MeshSamplingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="`num_sample`: unknown key, did you mean `num_samples`"):
        MeshSamplingConfig.from_dict({"num_sample": 5})
