"""Quality and speed of the mesh-to-SDF path, on meshes whose exact SDF is known; prints Markdown tables.

    python -m sdf_ray.data.mesh_bench quality [--samples N]
    python -m sdf_ray.data.mesh_bench speed [--triangles T] [--samples N] [--repeats R]
    python -m sdf_ray.data.mesh_bench alternatives

``quality``: spheres, boxes and tori triangulated at several resolutions, closed and with defects (a hole
punched, a quarter of the faces flipped, every vertex split, all three at once, and a second, inside-out
part). Samples are drawn as ``from-meshes`` draws them; each kept sample's signed distance is compared with
the analytic SDF of the shape. The triangulation itself deviates from the analytic surface by up to ``h``
(measured on the mesh), so a sign counts as wrong only where ``|exact sdf| > 1e-3 + h`` and the distance error
is reported next to ``h``. Near a hole (within 2 hole radii of its centre) the closed shape's sign is the
reference.

``speed``: one core (``IGL_NUM_THREADS=1``) on a bumpy torus of about T triangles: time per stage, CPU and wall.
``alternatives``: the other candidates for distance and sign, timed on subsets and extrapolated.
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
    d = unsigned_distance(normed, xyz)
    w = winding_number(normed, xyz)
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


def run_speed(num_triangles: int, num_samples: int, repeats: int) -> None:
    import tempfile

    import trimesh

    from sdf_ray.data.mesh_sdf import load_mesh, mesh_to_samples, scene_rng

    mesh = bumpy_torus(num_triangles)
    cfg = MeshSamplingConfig(num_samples=num_samples)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bumpy.obj")
        trimesh.Trimesh(mesh.vertices_V3, mesh.faces_F3, process=False).export(path)
        size = os.path.getsize(path)
        best: dict[str, float] = {}
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            loaded = load_mesh(path)
            c1, t1 = time.process_time(), time.perf_counter()
            ms = mesh_to_samples(loaded, cfg, scene_rng(0, "bumpy"))
            c2, t2 = time.process_time(), time.perf_counter()
            stages = {"load": t1 - t0, **ms.timings, "cpu_total": (c1 - c0) + (c2 - c1), "wall_total": t2 - t0}
            for k, v in stages.items():
                best[k] = min(best.get(k, float("inf")), v)
    print(f"Bumpy torus, {mesh.num_triangles:,} triangles (OBJ {size / 1e6:.1f} MB), {num_samples:,} samples, "
          f"IGL_NUM_THREADS={os.environ.get('IGL_NUM_THREADS')}, best of {repeats}:\n")
    print("| stage | seconds (wall) |\n|---|---:|")
    for k in ("load", "orient", "sample", "distance", "winding", "total"):
        print(f"| {k} | {best[k]:.2f} |")
    print(f"\nwhole mesh (load + total): {best['wall_total']:.2f} s wall, {best['cpu_total']:.2f} s CPU; "
          f"kept {len(ms.pos_N4) + len(ms.neg_N4):,} samples, dropped {ms.num_dropped_ambiguous}")


def _gwn_numpy(v: np.ndarray, f: np.ndarray, q: np.ndarray, chunk: int = 64) -> np.ndarray:
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

    timed("libigl point_mesh_squared_distance (AABB)", len(q), lambda x: unsigned_distance(normed, x))
    timed("libigl fast_winding_number (Barnes-Hut)", len(q), lambda x: winding_number(normed, x))
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
    args = p.parse_args(argv)
    set_igl_threads(int(os.environ.get("IGL_NUM_THREADS", "1")))
    if args.what == "quality":
        run_quality(args.samples, tuple(float(m) for m in args.margins.split(",")))
    elif args.what == "speed":
        run_speed(args.triangles, args.samples, args.repeats)
    else:
        run_alternatives(args.triangles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
