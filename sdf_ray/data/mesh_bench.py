"""Quality and speed of the mesh-to-SDF path, on meshes whose exact SDF is known; prints Markdown tables.

    python -m sdf_ray.data.mesh_bench quality [--samples N]
    python -m sdf_ray.data.mesh_bench speed [--triangles T] [--samples N] [--repeats R]
    python -m sdf_ray.data.mesh_bench alternatives [--triangles T]
    python -m sdf_ray.data.mesh_bench ray [--meshes M] [--triangles T] [--samples N] [--address ADDR]

``quality``: spheres, boxes and tori triangulated at several resolutions, closed and with defects (a hole
punched, a quarter of the faces flipped, every vertex split, all three at once, and a second, inside-out
part). Samples are drawn as ``from-meshes`` draws them; each kept sample's signed distance is compared with
the analytic SDF of the shape. The triangulation itself deviates from the analytic surface by up to ``h``
(measured on the mesh), so a sign counts as wrong only where ``|exact sdf| > 1e-3 + h`` and the distance error
is reported next to ``h``. Near a hole (within 2 hole radii of its centre) the closed shape's sign is the
reference.

``speed``: one core (``IGL_NUM_THREADS=1``) on a bumpy torus of about T triangles: time per stage, CPU and wall.
``alternatives``: the other candidates for distance and sign, timed on subsets and extrapolated, and the
wrong-sign rate of each sign method on a defective sphere.
``ray``: ``run_from_meshes`` end to end over every CPU of the cluster (a local Ray unless ``--address``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sdf_ray.data.mesh_config import MeshSamplingConfig
from sdf_ray.data.mesh_sdf import (
    Mesh,
    distance_and_winding,
    normalization_params,
    normalize_points,
    orient_faces,
    sample_query_points,
    sample_surface,
    set_igl_threads,
    unsigned_distance,
    winding_number,
)

SdfFn = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------------
# Test shapes (original frame) and their exact SDFs


@dataclass(frozen=True)
class Shape:
    label: str
    mesh: Mesh
    sdf: SdfFn
    hole_centre: np.ndarray | None = None
    hole_radius: float = 0.0


def _mesh(tm: object) -> Mesh:
    return Mesh(vertices_V3=np.ascontiguousarray(np.asarray(tm.vertices, dtype=np.float64)),  # type: ignore[attr-defined]
                faces_F3=np.ascontiguousarray(np.asarray(tm.faces, dtype=np.int64)))  # type: ignore[attr-defined]


def sphere(subdivisions: int, radius: float = 1.0) -> tuple[Mesh, SdfFn]:
    import trimesh

    return _mesh(trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)), \
        lambda p: np.linalg.norm(p, axis=1) - radius


def box(subdivisions: int, extents: tuple[float, float, float] = (1.6, 1.0, 0.6)) -> tuple[Mesh, SdfFn]:
    import trimesh

    tm = trimesh.creation.box(extents=extents)
    for _ in range(subdivisions):
        tm = tm.subdivide()
    half = np.asarray(extents) / 2

    def sdf(p: np.ndarray) -> np.ndarray:
        q = np.abs(p) - half
        return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)

    return _mesh(tm), sdf


def torus(major_sections: int, minor_sections: int, big_r: float = 1.0, r: float = 0.35) -> tuple[Mesh, SdfFn]:
    import trimesh

    tm = trimesh.creation.torus(big_r, r, major_sections=major_sections, minor_sections=minor_sections)

    def sdf(p: np.ndarray) -> np.ndarray:  # around the z axis, as trimesh builds it
        return np.hypot(np.hypot(p[:, 0], p[:, 1]) - big_r, p[:, 2]) - r

    return _mesh(tm), sdf


def punch_hole(mesh: Mesh, centre: np.ndarray, radius: float) -> Mesh:
    """Remove every face whose centroid lies within ``radius`` of ``centre``."""
    cent = mesh.vertices_V3[mesh.faces_F3].mean(axis=1)
    keep = np.linalg.norm(cent - centre, axis=1) > radius
    return Mesh(mesh.vertices_V3, np.ascontiguousarray(mesh.faces_F3[keep]))


def flip_faces(mesh: Mesh, fraction: float, rng: np.random.Generator) -> Mesh:
    f = mesh.faces_F3.copy()
    sel = rng.uniform(size=len(f)) < fraction
    f[sel] = f[sel][:, [0, 2, 1]]
    return Mesh(mesh.vertices_V3, f)


def split_vertices(mesh: Mesh) -> Mesh:
    """A triangle soup: every face gets its own three vertices (texture seams everywhere)."""
    v = mesh.vertices_V3[mesh.faces_F3].reshape(-1, 3)
    return Mesh(np.ascontiguousarray(v), np.arange(len(v), dtype=np.int64).reshape(-1, 3))


def two_parts(mesh: Mesh, sdf: SdfFn, offset: np.ndarray) -> tuple[Mesh, SdfFn]:
    """The mesh plus a translated copy given inside out (all faces reversed)."""
    v = np.concatenate([mesh.vertices_V3, mesh.vertices_V3 + offset])
    f = np.concatenate([mesh.faces_F3, mesh.faces_F3[:, [0, 2, 1]] + len(mesh.vertices_V3)])
    return Mesh(v, f), lambda p: np.minimum(sdf(p), sdf(p - offset))


def quality_cases() -> list[tuple[str, Mesh, SdfFn]]:
    """(label, closed mesh, exact sdf) for every shape and resolution of the quality table."""
    cases: list[tuple[str, Mesh, SdfFn]] = []
    for sub in (2, 3, 4, 5):
        m, f = sphere(sub)
        cases.append(("sphere", m, f))
    for sub in (0, 2, 4):
        m, f = box(sub)
        cases.append(("box", m, f))
    for maj, mnr in ((24, 12), (64, 32), (160, 64)):
        m, f = torus(maj, mnr)
        cases.append(("torus", m, f))
    return cases


def defects(label: str, mesh: Mesh, sdf: SdfFn, rng: np.random.Generator) -> list[Shape]:
    """The closed mesh and its defective variants."""
    # Holes around the vertex farthest along +x (on a box: a corner, the hardest place for a hole).
    top = mesh.vertices_V3[np.argmax(mesh.vertices_V3[:, 0])]
    ext = np.ptp(mesh.vertices_V3, axis=0)
    parts, parts_sdf = two_parts(mesh, sdf, np.array([ext[0] * 1.5, 0.0, 0.0]))
    out = [Shape("closed", mesh, sdf)]
    for radius in (0.15, 0.3):
        holed = punch_hole(mesh, top, radius)
        if holed.num_triangles < mesh.num_triangles:  # coarse meshes have no face that small
            out.append(Shape(f"hole r={radius}", holed, sdf, top, radius))
    out += [
        Shape("flipped 25%", flip_faces(mesh, 0.25, rng), sdf),
        Shape("split vertices", split_vertices(mesh), sdf),
    ]
    holed = punch_hole(mesh, top, 0.15)
    if holed.num_triangles < mesh.num_triangles:
        out.append(Shape("hole r=0.15 + flipped + split", split_vertices(flip_faces(holed, 0.25, rng)), sdf, top, 0.15))
    out.append(Shape("two parts, one inside out", parts, parts_sdf))
    return out


# --------------------------------------------------------------------------------------------------
# Quality


@dataclass
class QualityRow:
    shape: str
    faces: int
    variant: str
    kept: int
    dropped_pct: float
    h: float
    max_dist_err: float
    wrong_pct: float
    wrong_count: int
    near_hole_wrong_pct: float | None
    near_hole_dropped_pct: float | None


def evaluate(shape: Shape, cfg: MeshSamplingConfig, seed: int = 0, margins: tuple[float, ...] = ()) -> tuple[QualityRow, dict[float, tuple[float, float]]]:
    """Sample ``shape`` as from-meshes does and score the kept samples against the exact SDF.

    Also returns, for each extra ambiguity margin, (near-hole wrong %, near-hole dropped %).
    """
    rng = np.random.default_rng(seed)
    mesh = shape.mesh
    if cfg.repair_orientation:
        mesh, _, _ = orient_faces(mesh)
    norm = normalization_params(mesh, cfg.normalization_buffer)
    scale = float(norm["scale"])
    normed = Mesh(np.ascontiguousarray(normalize_points(mesh.vertices_V3, norm)), mesh.faces_F3)
    xyz = sample_query_points(normed, cfg, rng)
    d, w, _ = distance_and_winding(normed, xyz)
    orig = xyz / scale - np.asarray(norm["offset"])
    exact = shape.sdf(orig) * scale
    surf, _ = sample_surface(shape.mesh, 100_000, np.random.default_rng(seed + 1))
    h = float(np.abs(shape.sdf(surf)).max()) * scale
    near = np.zeros(len(xyz), dtype=bool)
    if shape.hole_centre is not None:
        near = np.linalg.norm(orig - shape.hole_centre, axis=1) < 2 * shape.hole_radius

    def score(margin: float) -> tuple[np.ndarray, np.ndarray]:
        keep = np.abs(w - 0.5) >= margin
        sdf = np.where(w > 0.5, -d, d)
        wrong = keep & (np.abs(exact) > 1e-3 + h) & ((sdf <= 0) != (exact <= 0))
        return keep, wrong

    keep, wrong = score(cfg.ambiguity_margin)
    judged = keep & (np.abs(exact) > 1e-3 + h)
    extra = {}
    for m in margins:
        k, wr = score(m)
        extra[m] = (100 * wr[near].sum() / max(1, (k & near).sum()), 100 * (~k & near).sum() / max(1, near.sum()))
    row = QualityRow(
        shape="", faces=shape.mesh.num_triangles, variant=shape.label, kept=int(keep.sum()),
        dropped_pct=100 * float((~keep).mean()), h=h,
        max_dist_err=float(np.abs(d - np.abs(exact))[keep].max()),
        wrong_pct=100 * float(wrong.sum()) / max(1, int(judged.sum())), wrong_count=int(wrong.sum()),
        near_hole_wrong_pct=(100 * float(wrong[near].sum()) / max(1, int((keep & near).sum()))) if near.any() else None,
        near_hole_dropped_pct=(100 * float((~keep & near).sum()) / max(1, int(near.sum()))) if near.any() else None,
    )
    return row, extra


def run_quality(num_samples: int, margins: tuple[float, ...]) -> None:
    cfg = MeshSamplingConfig(num_samples=num_samples)
    print(f"Samples per mesh: {num_samples:,} (recipe defaults otherwise; ambiguity margin {cfg.ambiguity_margin}).\n")
    print("| shape | faces | variant | kept | dropped % | h (mesh vs shape) | max dist err | wrong sign % (count) "
          "| near hole: wrong % | near hole: dropped % |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    margin_rows: list[str] = []
    for label, mesh, sdf in quality_cases():
        for shape in defects(label, mesh, sdf, rng):
            row, extra = evaluate(shape, cfg, margins=margins if shape.hole_centre is not None else ())
            nh = "" if row.near_hole_wrong_pct is None else f"{row.near_hole_wrong_pct:.3f}"
            nd = "" if row.near_hole_dropped_pct is None else f"{row.near_hole_dropped_pct:.1f}"
            print(f"| {label} | {row.faces:,} | {row.variant} | {row.kept:,} | {row.dropped_pct:.2f} | {row.h:.1e} | "
                  f"{row.max_dist_err:.1e} | {row.wrong_pct:.4f} ({row.wrong_count}) | {nh} | {nd} |", flush=True)
            if extra:
                cells = " | ".join(f"{extra[m][0]:.3f} / {extra[m][1]:.1f}" for m in margins)
                margin_rows.append(f"| {label} {row.faces:,} | {shape.label} | {cells} |")
    if margin_rows:
        print("\nNear-hole wrong sign % / dropped % by ambiguity margin:\n")
        print("| mesh | variant | " + " | ".join(f"margin {m}" for m in margins) + " |")
        print("|---|---|" + "---:|" * len(margins))
        print("\n".join(margin_rows))


# --------------------------------------------------------------------------------------------------
# Speed


def bumpy_torus(num_triangles: int) -> Mesh:
    """A torus with a smooth bumpy displacement: about ``num_triangles`` faces, irregular like a scan."""
    import trimesh

    minor = max(8, int(np.sqrt(num_triangles / 2 / 2.5)))
    major = max(8, int(num_triangles / 2 / minor))
    tm = trimesh.creation.torus(1.0, 0.35, major_sections=major, minor_sections=minor)
    v = np.asarray(tm.vertices, dtype=np.float64)
    bump = 1 + 0.08 * np.sin(7 * v[:, 0]) * np.sin(5 * v[:, 1]) * np.cos(9 * v[:, 2])
    ring = np.stack([v[:, 0], v[:, 1], np.zeros(len(v))], 1)
    ring = ring / np.linalg.norm(ring, axis=1, keepdims=True)
    v = ring + (v - ring) * bump[:, None]
    return Mesh(np.ascontiguousarray(v), np.ascontiguousarray(np.asarray(tm.faces, dtype=np.int64)))


class _StageClock:
    """CPU seconds between successive :meth:`lap` calls."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.wall0 = time.perf_counter()
        self._last = time.process_time()

    def lap(self, label: str) -> None:
        now = time.process_time()
        self.laps[label] = now - self._last
        self._last = now


def run_speed(num_triangles: int, num_samples: int, repeats: int) -> None:
    import tempfile

    import trimesh

    from sdf_ray.data.mesh_sdf import load_mesh, mesh_to_samples, scene_rng, spatial_order

    mesh = bumpy_torus(num_triangles)
    cfg = MeshSamplingConfig(num_samples=num_samples)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bumpy.obj")
        trimesh.Trimesh(mesh.vertices_V3, mesh.faces_F3, process=False).export(path)
        size = os.path.getsize(path)
        best: dict[str, float] = {}
        for _ in range(repeats):
            clock = _StageClock()
            loaded = load_mesh(path)
            clock.lap("load")
            oriented, _, _ = orient_faces(loaded)
            clock.lap("orient")
            rng = scene_rng(0, "bumpy")
            norm = normalization_params(oriented, cfg.normalization_buffer)
            normed = Mesh(np.ascontiguousarray(normalize_points(oriented.vertices_V3, norm)), oriented.faces_F3)
            xyz = sample_query_points(normed, cfg, rng)
            sample_surface(oriented, cfg.num_surface_samples, rng)
            clock.lap("sample")
            q = np.ascontiguousarray(xyz[spatial_order(xyz)])
            clock.lap("order")
            unsigned_distance(normed, q)
            clock.lap("distance")
            winding_number(normed, q)
            clock.lap("winding")
            stages = {**clock.laps, "total": sum(clock.laps.values()), "wall": time.perf_counter() - clock.wall0}
            for k, v in stages.items():
                best[k] = min(best.get(k, float("inf")), v)
        # The same work through the public entry point, to check it adds nothing beyond the stages.
        c = time.process_time()
        ms = mesh_to_samples(load_mesh(path), cfg, scene_rng(0, "bumpy"))
        whole = time.process_time() - c
    print(f"Bumpy torus, {mesh.num_triangles:,} triangles (OBJ {size / 1e6:.1f} MB), {num_samples:,} samples, "
          f"IGL_NUM_THREADS={os.environ.get('IGL_NUM_THREADS')}, best of {repeats}:\n")
    print("| stage | CPU seconds |\n|---|---:|")
    for k in ("load", "orient", "sample", "order", "distance", "winding", "total"):
        print(f"| {k} | {best[k]:.2f} |")
    print(f"\nwall time of the staged run {best['wall']:.2f} s; mesh_to_samples after load_mesh: {whole:.2f} s CPU, kept "
          f"{len(ms.pos_N4) + len(ms.neg_N4):,} samples, dropped {ms.num_dropped_ambiguous}")


def brute_force_distance(mesh: Mesh, points_N3: np.ndarray) -> np.ndarray:
    """Distance from each point to every triangle, minimum taken (Ericson's closest point on a triangle)."""
    tri = mesh.vertices_V3[mesh.faces_F3]
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    ab, ac = b - a, c - a
    out = np.empty(len(points_N3))
    for i, p in enumerate(np.asarray(points_N3, dtype=np.float64)):
        ap, bp, cp = p - a, p - b, p - c
        d1, d2 = (ab * ap).sum(1), (ac * ap).sum(1)
        d3, d4 = (ab * bp).sum(1), (ac * bp).sum(1)
        d5, d6 = (ab * cp).sum(1), (ac * cp).sum(1)
        va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
        with np.errstate(divide="ignore", invalid="ignore"):
            denom = 1.0 / (va + vb + vc)
            closest = a + ab * (vb * denom)[:, None] + ac * (vc * denom)[:, None]  # inside the face
            t = (d4 - d3) / ((d4 - d3) + (d5 - d6))
            m = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
            closest[m] = (b + (c - b) * t[:, None])[m]  # edge bc
            t = d2 / (d2 - d6)
            m = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
            closest[m] = (a + ac * t[:, None])[m]  # edge ac
            t = d1 / (d1 - d3)
            m = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
            closest[m] = (a + ab * t[:, None])[m]  # edge ab
        for vertex, m in ((c, (d6 >= 0) & (d5 <= d6)), (b, (d3 >= 0) & (d4 <= d3)), (a, (d1 <= 0) & (d2 <= 0))):
            closest[m] = vertex[m]
        out[i] = np.sqrt(((closest - p) ** 2).sum(1).min())
    return out


def _gwn_numpy(v: np.ndarray, f: np.ndarray, q: np.ndarray, chunk: int = 8) -> np.ndarray:
    """Exact generalised winding number, all pairs (Van Oosterom-Strackee solid angles), in numpy."""
    out = np.empty(len(q))
    tri = v[f]
    for i in range(0, len(q), chunk):
        a = tri[None, :, 0] - q[i:i + chunk, None]
        b = tri[None, :, 1] - q[i:i + chunk, None]
        c = tri[None, :, 2] - q[i:i + chunk, None]
        la, lb, lc = (np.linalg.norm(x, axis=2) for x in (a, b, c))
        det = np.einsum("qtd,qtd->qt", a, np.cross(b, c))
        den = la * lb * lc + np.einsum("qtd,qtd->qt", a, b) * lc + np.einsum("qtd,qtd->qt", b, c) * la \
            + np.einsum("qtd,qtd->qt", c, a) * lb
        out[i:i + chunk] = np.arctan2(det, den).sum(axis=1) / (2 * np.pi)
    return out


def run_alternatives(num_triangles: int) -> None:
    import igl
    import trimesh

    mesh = bumpy_torus(num_triangles)
    tm = trimesh.Trimesh(mesh.vertices_V3, mesh.faces_F3, process=False)
    rng = np.random.default_rng(0)
    cfg = MeshSamplingConfig()
    norm = normalization_params(mesh)
    normed = Mesh(np.ascontiguousarray(normalize_points(mesh.vertices_V3, norm)), mesh.faces_F3)
    tm_n = trimesh.Trimesh(normed.vertices_V3, normed.faces_F3, process=False)
    q = sample_query_points(normed, cfg, rng)
    rng.shuffle(q)
    rows: list[tuple[str, int, float]] = []

    def timed(label: str, n: int, fn: Callable[[np.ndarray], object]) -> object:
        t = time.process_time()
        res = fn(q[:n])
        rows.append((label, n, time.process_time() - t))
        return res

    timed("libigl point_mesh_squared_distance (AABB), random order", len(q), lambda x: unsigned_distance(normed, x))
    timed("libigl fast_winding_number (Barnes-Hut), random order", len(q), lambda x: winding_number(normed, x))
    timed("both, queries in Morton order (what from-meshes runs)", len(q), lambda x: distance_and_winding(normed, x))
    timed("libigl winding_number (exact, all triangles)", 5_000, lambda x: igl.winding_number(normed.vertices_V3, normed.faces_F3, x))
    timed("numpy exact winding number (all pairs)", 200, lambda x: _gwn_numpy(normed.vertices_V3, normed.faces_F3, x))
    timed("trimesh.proximity.closest_point", 1_000, lambda x: trimesh.proximity.closest_point(tm_n, x))
    small = trimesh.creation.icosphere(subdivisions=3)
    t = time.process_time()
    small.contains(q[:2_000] * 1.1)
    rows.append((f"trimesh contains (ray parity, {trimesh.ray.has_embree and 'embree' or 'rtree'}) on a "
                 f"{len(small.faces):,}-face sphere", 2_000, time.process_time() - t))
    del tm
    print(f"Bumpy torus, {mesh.num_triangles:,} triangles, one core; CPU seconds, extrapolated linearly to 500,000 "
          "queries where fewer were timed:\n")
    print("| method | queries timed | CPU s | CPU s per 500,000 |\n|---|---:|---:|---:|")
    for label, n, s in rows:
        print(f"| {label} | {n:,} | {s:.2f} | {s * 500_000 / n:,.1f} |")
    fast = igl.fast_winding_number(normed.vertices_V3, normed.faces_F3, q[:5_000])
    exact = igl.winding_number(normed.vertices_V3, normed.faces_F3, q[:5_000])
    print(f"\nfast vs exact winding number on 5,000 queries: max |difference| {np.abs(fast - exact).max():.1e}")
    _, tm_d, _ = trimesh.proximity.closest_point(tm_n, q[:200])
    brute = brute_force_distance(normed, q[:200])
    ours = unsigned_distance(normed, q[:200])
    print(f"distance on 200 queries against brute force over all triangles: libigl max |difference| "
          f"{np.abs(ours - brute).max():.1e}, trimesh closest_point {np.abs(tm_d - brute).max():.1e}")
    run_sign_robustness()


def run_sign_robustness(num_queries: int = 5_000) -> None:
    """Wrong-sign % of each sign method on a defective sphere (1,280 faces), near-surface queries."""
    import trimesh

    mesh, sdf = sphere(3)
    rng = np.random.default_rng(0)
    top = mesh.vertices_V3[np.argmax(mesh.vertices_V3[:, 0])]
    variants = [("closed", mesh), ("hole r=0.3", punch_hole(mesh, top, 0.3)),
                ("flipped 25%", flip_faces(mesh, 0.25, rng)), ("split vertices", split_vertices(mesh))]
    surf, _ = sample_surface(mesh, num_queries, rng)
    q = surf + rng.normal(scale=np.sqrt(0.005), size=surf.shape)
    exact = sdf(q)
    h = float(np.abs(sdf(sample_surface(mesh, 100_000, rng)[0])).max())
    judged = np.abs(exact) > 1e-3 + h
    inside = exact <= 0

    def pct(pred_inside: np.ndarray, keep: np.ndarray | None = None) -> str:
        k = judged if keep is None else judged & keep
        return f"{100 * float((pred_inside != inside)[k].mean()):.2f}"

    print(f"\nSign robustness, sphere of {mesh.num_triangles:,} faces, {num_queries:,} queries near the surface "
          "(sigma = sqrt(0.005)); wrong sign % where |exact sdf| > 1e-3 + h:\n")
    print("| variant | ray parity (trimesh contains) | winding number, no repair | from-meshes (repair + margin 0.2) |")
    print("|---|---:|---:|---:|")
    for label, m in variants:
        tm = trimesh.Trimesh(m.vertices_V3, m.faces_F3, process=False)
        parity = np.asarray(tm.contains(q), dtype=bool)
        w_raw = winding_number(m, q)
        fixed, _, _ = orient_faces(m)
        w = winding_number(fixed, q)
        print(f"| {label} | {pct(parity)} | {pct(w_raw > 0.5)} | {pct(w > 0.5, np.abs(w - 0.5) >= 0.2)} |")


def run_ray(num_meshes: int, num_triangles: int, num_samples: int, address: str | None) -> None:
    """``run_from_meshes`` end to end on ``num_meshes`` bumpy tori: meshes per second over the whole cluster."""
    import logging
    import tempfile

    import trimesh

    from sdf_ray.data.from_meshes import run_from_meshes

    logging.basicConfig(level=logging.INFO, format="[sdf-ray] %(message)s", stream=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(num_meshes):
            m = bumpy_torus(num_triangles)
            v = m.vertices_V3 * (1 + 0.1 * i)
            trimesh.Trimesh(v, m.faces_F3, process=False).export(os.path.join(tmp, f"torus{i:03d}.obj"))
        import ray

        t0 = time.perf_counter()
        summary = run_from_meshes(tmp, os.path.join(tmp, "out", "ds"), cfg=MeshSamplingConfig(num_samples=num_samples),
                                  address=address, progress_every_s=1.0)
        seconds = time.perf_counter() - t0
        cpus = int(ray.cluster_resources().get("CPU", 1))
        compute = sum(o.seconds for o in summary.outcomes)
    print(f"{num_meshes} meshes of {num_triangles:,} triangles, {num_samples:,} samples each, {cpus} CPUs: "
          f"{seconds:.1f} s in all (Ray start and dataset write included), {num_meshes / seconds:.2f} meshes/s; "
          f"{compute / num_meshes:.2f} s per mesh inside the tasks")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdf_ray.data.mesh_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--samples", type=int, default=200_000)
    q.add_argument("--margins", default="0,0.05,0.1,0.2,0.3")
    s = sub.add_parser("speed")
    s.add_argument("--triangles", type=int, default=100_000)
    s.add_argument("--samples", type=int, default=500_000)
    s.add_argument("--repeats", type=int, default=3)
    a = sub.add_parser("alternatives")
    a.add_argument("--triangles", type=int, default=100_000)
    r = sub.add_parser("ray")
    r.add_argument("--meshes", type=int, default=8)
    r.add_argument("--triangles", type=int, default=100_000)
    r.add_argument("--samples", type=int, default=500_000)
    r.add_argument("--address", default=None)
    args = p.parse_args(argv)
    set_igl_threads(int(os.environ.get("IGL_NUM_THREADS", "1")))
    if args.what == "quality":
        run_quality(args.samples, tuple(float(m) for m in args.margins.split(",")))
    elif args.what == "speed":
        run_speed(args.triangles, args.samples, args.repeats)
    elif args.what == "alternatives":
        run_alternatives(args.triangles)
    else:
        run_ray(args.meshes, args.triangles, args.samples, args.address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
