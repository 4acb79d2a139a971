"""SDF samples from one triangle mesh, DeepSDF-style, without OpenGL: pure functions, no Ray.

The recipe (:class:`~sdf_ray.data.mesh_config.MeshSamplingConfig` holds its numbers):

1. load (trimesh; a scene's meshes are concatenated with their transforms baked in) and validate;
2. optionally repair face orientation (consistent per connected part, each part pointing outwards);
3. normalise: bounding-box centre of the used vertices to the origin, farthest used vertex at 1/1.03;
4. draw area-weighted surface points, perturb each once per Gaussian variance, add uniform points;
5. exact unsigned distance to the triangles (libigl's AABB tree), sign from the generalised winding number
   (libigl's fast winding number, Barnes-Hut: exact near field, dipole expansions far away); samples whose
   winding number is within ``ambiguity_margin`` of 0.5 are dropped and counted;
6. ground truth: ``num_surface_samples`` area-weighted points with their face normals, in the original frame.

The winding number is 1 inside and 0 outside a closed, outward-oriented surface, and degrades gracefully
(towards 0.5) near holes; it ignores duplicated vertices and disconnected parts entirely. It is *not* immune
to flipped faces (a flipped face negates its contribution), which is why step 2 exists.

libigl runs its loops on ``IGL_NUM_THREADS`` threads (default: every core), read once per process: a Ray task
that owns one CPU sets it to 1 before the first call (see :func:`set_igl_threads`).
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from sdf_ray.data.mesh_config import MESH_SUFFIXES, MeshSamplingConfig
from sdf_ray.errors import DataError

_IGL: ModuleType | None = None


class MeshError(DataError):
    """A mesh that cannot be sampled; ``reason`` is the one-line cause written to ``report.csv``."""

    def __init__(self, reason: str, num_triangles: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.num_triangles = num_triangles


@dataclass(frozen=True)
class Mesh:
    """A triangle soup: ``vertices_V3`` float64, ``faces_F3`` int64 indices into it."""

    vertices_V3: np.ndarray
    faces_F3: np.ndarray

    @property
    def num_triangles(self) -> int:
        return int(self.faces_F3.shape[0])


@dataclass
class MeshSamples:
    """Everything one mesh contributes to a dataset.

    ``pos_N4``/``neg_N4`` hold rows ``(x, y, z, sdf)`` in the normalised frame (``sdf > 0`` / ``sdf <= 0``);
    ``surface_points_M3``/``surface_normals_M3`` are in the mesh's original frame;
    ``normalization`` maps original to normalised coordinates: ``(p + offset) * scale``.
    """

    pos_N4: np.ndarray
    neg_N4: np.ndarray
    surface_points_M3: np.ndarray
    surface_normals_M3: np.ndarray
    normalization: dict[str, Any]
    num_triangles: int
    num_dropped_ambiguous: int
    num_flipped_faces: int
    num_components: int
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# libigl


def set_igl_threads(num_threads: int) -> None:
    """Ask libigl for ``num_threads`` threads; effective only before its first parallel loop in this process."""
    os.environ["IGL_NUM_THREADS"] = str(int(num_threads))


def _igl() -> ModuleType:
    global _IGL
    if _IGL is None:
        try:
            import igl
        except ImportError:
            raise DataError("from-meshes needs libigl: pip install 'libigl>=2.6'") from None
        _IGL = igl
    return _IGL


# --------------------------------------------------------------------------------------------------
# Loading and validation


def file_type_of(path: str | Path) -> str:
    """trimesh's file type for a supported mesh path (``obj``, ``ply``, ...); MeshError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise MeshError(f"unsupported file type {suffix or '(none)'!r} (supported: {', '.join(MESH_SUFFIXES)})")
    return suffix[1:]


def load_mesh(source: str | Path | bytes, file_type: str | None = None, *, max_file_bytes: int | None = None) -> Mesh:
    """Read a mesh file (a path, or its bytes with ``file_type``) as one triangle soup.

    Scenes (GLB/GLTF, multi-object OBJ) are concatenated with their node transforms applied; quads and
    polygons come back triangulated. Vertices are kept as stored (``process=False``): no merging, so what is
    validated is what the file holds. Raises :class:`MeshError` when the file cannot be read.
    """
    import trimesh

    if isinstance(source, (bytes, bytearray, memoryview)):
        if file_type is None:
            raise ValueError("load_mesh: file_type is required when loading from bytes")
        size = len(source)
        file_obj: Any = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        file_type = file_type or file_type_of(path)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise MeshError(f"unreadable: {e.strerror or e}") from None
        file_obj = str(path)
    if max_file_bytes is not None and size > max_file_bytes:
        raise MeshError(f"over the size limit: file is {size:,} bytes, limit {max_file_bytes:,}")
    if size == 0:
        raise MeshError("unreadable: empty file")
    try:
        # Materials and textures are irrelevant to geometry and may reference files that do not exist.
        kwargs: dict[str, Any] = {"skip_materials": True} if file_type == "obj" else {}
        scene = trimesh.load_scene(file_obj, file_type=file_type, process=False, **kwargs)
        mesh = scene.to_mesh()
    except MeshError:
        raise
    except Exception as e:  # trimesh raises anything from ValueError to IndexError on broken files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MeshError(f"unreadable: {type(e).__name__}: {msg[:200]}") from None
    vertices = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    return Mesh(vertices_V3=np.ascontiguousarray(vertices), faces_F3=np.ascontiguousarray(faces))


def validate_mesh(mesh: Mesh, max_triangles: int) -> None:
    """Raise :class:`MeshError` with the first reason the mesh cannot be sampled, else return."""
    v, f = mesh.vertices_V3, mesh.faces_F3
    n = mesh.num_triangles
    if n == 0:
        raise MeshError("no triangles", 0)
    if n > max_triangles:
        raise MeshError(f"over the size limit: {n:,} triangles, limit {max_triangles:,}", n)
    if f.min() < 0 or f.max() >= len(v):
        raise MeshError("faces index vertices that do not exist", n)
    used = np.zeros(len(v), dtype=bool)
    used[f.ravel()] = True
    bad = ~np.isfinite(v[used]).all(axis=1)
    if bad.any():
        raise MeshError(f"NaN or infinite vertex coordinates ({int(bad.sum()):,} vertices)", n)
    areas = triangle_areas(v, f)
    extent = float(np.ptp(v[used], axis=0).max())
    # Relative to the mesh's own size: a mesh of slivers in a huge frame is still zero area.
    if extent == 0 or float(areas.sum()) <= 1e-12 * extent * extent:
        raise MeshError("zero surface area", n)


def triangle_areas(vertices_V3: np.ndarray, faces_F3: np.ndarray) -> np.ndarray:
    tri = vertices_V3[faces_F3]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


# --------------------------------------------------------------------------------------------------
# Normalisation


def normalization_params(mesh: Mesh, buffer: float = 1.03) -> dict[str, Any]:
    """DeepSDF's normalisation of the vertices used by faces: ``{"offset": -centre, "scale": 1/(buffer*r)}``.

    ``centre`` is the bounding-box centre, ``r`` the largest distance of a used vertex from it.
    """
    v = mesh.vertices_V3[np.unique(mesh.faces_F3)]
    centre = 0.5 * (v.min(axis=0) + v.max(axis=0))
    radius = float(np.sqrt(((v - centre) ** 2).sum(axis=1).max()))
    if radius <= 0:
        raise MeshError("zero surface area", mesh.num_triangles)
    return {"offset": [float(-c) + 0.0 for c in centre], "scale": 1.0 / (buffer * radius)}


def normalize_points(points_N3: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """Original frame to normalised frame: ``(p + offset) * scale``."""
    return (np.asarray(points_N3, dtype=np.float64) + np.asarray(normalization["offset"])) * float(normalization["scale"])


def denormalize_points(points_N3: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """Normalised frame to original frame: ``p / scale - offset``."""
    return np.asarray(points_N3, dtype=np.float64) / float(normalization["scale"]) - np.asarray(normalization["offset"])


# --------------------------------------------------------------------------------------------------
# Orientation repair


def orient_faces(mesh: Mesh) -> tuple[Mesh, int, int]:
    """Consistently orient each edge-connected part and point it outwards; returns (mesh, flipped, parts).

    Vertices are matched by position, so parts split at texture seams count as one. Two faces are neighbours
    when they share an edge used by exactly those two faces (non-manifold edges separate parts). Within a
    part, every face takes the orientation of a spanning tree's root; then a part whose signed volume is
    negative is reversed as a whole. Internal shells meant as cavities end up pointing outwards too (the
    cavity is then filled), as in the reference, which only sees surfaces visible from outside.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, connected_components

    v, f = mesh.vertices_V3, mesh.faces_F3
    m = len(f)
    _, vid = np.unique(v, axis=0, return_inverse=True)
    fm = vid.reshape(-1)[f]
    nv = int(fm.max()) + 1
    he_from = fm.ravel()
    he_to = fm[:, [1, 2, 0]].ravel()
    he_face = np.repeat(np.arange(m, dtype=np.int64), 3)
    ok = he_from != he_to
    he_from, he_to, he_face = he_from[ok], he_to[ok], he_face[ok]
    key = np.minimum(he_from, he_to) * nv + np.maximum(he_from, he_to)
    order = np.argsort(key, kind="stable")
    ks = key[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    counts = np.diff(np.r_[starts, len(ks)])
    two = starts[counts == 2]
    a, b = order[two], order[two + 1]
    fa, fb = he_face[a], he_face[b]
    keep = fa != fb
    a, b, fa, fb = a[keep], b[keep], fa[keep], fb[keep]
    # Same direction along the shared edge means the two faces disagree on orientation.
    flip_edge = (he_from[a] == he_from[b]).astype(np.int8)
    lo, hi = np.minimum(fa, fb), np.maximum(fa, fb)
    pair = lo * m + hi
    _, first = np.unique(pair, return_index=True)
    lo, hi, flip_edge = lo[first], hi[first], flip_edge[first]

    face_graph = coo_matrix((np.ones(len(lo), dtype=np.int8), (lo, hi)), shape=(m, m)).tocsr()
    num_parts, labels = connected_components(face_graph, directed=False)
    # A virtual root joined to one face per part lets a single BFS span every part.
    reps = np.unique(labels, return_index=True)[1]
    root = m
    rows = np.r_[lo, np.full(len(reps), root)]
    cols = np.r_[hi, reps]
    data = np.r_[flip_edge + 1, np.ones(len(reps), dtype=np.int8)]  # +1: keep explicit zeros
    g = coo_matrix((data, (rows, cols)), shape=(m + 1, m + 1)).tocsr()
    g = (g + g.T).tocsr()
    bfs, pred = breadth_first_order(g, root, directed=False, return_predecessors=True)
    parent = np.where(pred < 0, root, pred).astype(np.int64)
    parent[root] = root
    nodes = bfs[1:]
    step = np.zeros(m + 1, dtype=np.int8)
    step[nodes] = np.asarray(g[parent[nodes], nodes]).ravel().astype(np.int8) - 1
    # Parity to the root by pointer doubling: O(m log depth), no Python loop over faces.
    parity = step.copy()
    up = parent.copy()
    while True:
        moved = up != root
        if not moved.any():
            break
        parity ^= np.where(moved, parity[up], 0).astype(np.int8)
        up = np.where(moved, up[up], root)
    flip = parity[:m].astype(bool)
    oriented = f.copy()
    oriented[flip] = oriented[flip][:, [0, 2, 1]]

    # Signed volume per part, about the bounding-box centre to keep the cancellation small.
    centre = 0.5 * (v.min(axis=0) + v.max(axis=0))
    tri = v[oriented] - centre
    vol = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) / 6.0
    part_vol = np.bincount(labels, weights=vol, minlength=num_parts)
    inverted = part_vol[labels] < 0
    oriented[inverted] = oriented[inverted][:, [0, 2, 1]]
    num_flipped = int((flip ^ inverted).sum())
    return Mesh(vertices_V3=v, faces_F3=np.ascontiguousarray(oriented)), num_flipped, int(num_parts)


# --------------------------------------------------------------------------------------------------
# Sampling


def sample_surface(mesh: Mesh, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` area-weighted points on the triangles and their unit face normals (float64, the mesh's frame)."""
    v, f = mesh.vertices_V3, mesh.faces_F3
    tri = v[f]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area2 = np.linalg.norm(cross, axis=1)
    cdf = np.cumsum(area2)
    idx = np.searchsorted(cdf, rng.uniform(0.0, cdf[-1], size=n), side="right")
    idx = np.minimum(idx, len(f) - 1)
    r1 = np.sqrt(rng.uniform(size=(n, 1)))
    r2 = rng.uniform(size=(n, 1))
    t = tri[idx]
    points = (1 - r1) * t[:, 0] + r1 * (1 - r2) * t[:, 1] + r1 * r2 * t[:, 2]
    normals = cross[idx] / np.maximum(area2[idx], 1e-300)[:, None]
    return points, normals


def sample_query_points(mesh_normalized: Mesh, cfg: MeshSamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """The reference's query points in the normalised frame: near-surface pairs first, then uniform ones."""
    n_surf = cfg.num_near_surface_points
    surf, _ = sample_surface(mesh_normalized, n_surf, rng)
    std_a, std_b = (float(np.sqrt(v)) for v in cfg.near_variances)
    near_a = surf + rng.normal(scale=std_a, size=surf.shape)
    near_b = surf + rng.normal(scale=std_b, size=surf.shape)
    h = cfg.uniform_half_extent
    uniform = rng.uniform(-h, h, size=(cfg.num_uniform, 3))
    return np.concatenate([near_a, near_b, uniform])


# --------------------------------------------------------------------------------------------------
# Distance and sign


def unsigned_distance(mesh: Mesh, points_N3: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance from each point to the nearest triangle (libigl AABB tree)."""
    d2, _, _ = _igl().point_mesh_squared_distance(np.ascontiguousarray(points_N3, dtype=np.float64),
                                                    mesh.vertices_V3, mesh.faces_F3)
    return np.sqrt(np.maximum(d2, 0.0))


def winding_number(mesh: Mesh, points_N3: np.ndarray) -> np.ndarray:
    """Generalised winding number of the triangle soup at each point (libigl fast winding number)."""
    return _igl().fast_winding_number(mesh.vertices_V3, mesh.faces_F3,
                                      np.ascontiguousarray(points_N3, dtype=np.float64))


def spatial_order(points_N3: np.ndarray, bits: int = 10) -> np.ndarray:
    """A permutation putting the points in Morton (Z-curve) order.

    Queries that arrive in random order make every AABB / octree traversal start cold; neighbours in Z
    order walk the same branches. Measured on a 100,000-triangle mesh, 500,000 queries, one core: distance
    4.3-5.2 s -> 1.7-1.9 s, fast winding number 2.2-2.6 s -> 1.0 s, bit-identical results.
    """
    p = np.asarray(points_N3, dtype=np.float64)
    lo, hi = p.min(axis=0), p.max(axis=0)
    cells = (1 << bits) - 1
    grid = ((p - lo) / np.maximum(hi - lo, 1e-300) * cells).astype(np.uint64)
    code = np.zeros(len(p), dtype=np.uint64)
    for b in range(bits):
        for axis in range(3):
            code |= ((grid[:, axis] >> np.uint64(b)) & np.uint64(1)) << np.uint64(3 * b + axis)
    return np.argsort(code, kind="stable")


def distance_and_winding(mesh: Mesh, points_N3: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(unsigned distance, winding number, seconds per stage) at each point, queried in Morton order."""
    import time

    t0 = time.perf_counter()
    order = spatial_order(points_N3)
    q = np.ascontiguousarray(np.asarray(points_N3, dtype=np.float64)[order])
    t1 = time.perf_counter()
    d_sorted = unsigned_distance(mesh, q)
    t2 = time.perf_counter()
    w_sorted = winding_number(mesh, q)
    t3 = time.perf_counter()
    d = np.empty_like(d_sorted)
    w = np.empty_like(w_sorted)
    d[order] = d_sorted
    w[order] = w_sorted
    return d, w, {"order": t1 - t0, "distance": t2 - t1, "winding": t3 - t2}


def signed_distance(mesh: Mesh, points_N3: np.ndarray, ambiguity_margin: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(sdf, decided): exact distance, negative where the winding number exceeds 0.5.

    ``decided`` is False where ``|w - 0.5| < ambiguity_margin``: callers drop those points.
    """
    d, w, _ = distance_and_winding(mesh, points_N3)
    sdf = np.where(w > 0.5, -d, d)
    decided = np.abs(w - 0.5) >= ambiguity_margin
    return sdf, decided


# --------------------------------------------------------------------------------------------------
# The whole recipe


def scene_rng(seed: int, name: str) -> np.random.Generator:
    """The generator for scene ``name``: every draw is fixed by (seed, name), whatever node runs it."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def mesh_to_samples(mesh: Mesh, cfg: MeshSamplingConfig, rng: np.random.Generator) -> MeshSamples:
    """Validate, orient, normalise and sample one mesh; raises :class:`MeshError` when it cannot be used."""
    import time

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    validate_mesh(mesh, cfg.max_triangles)
    n_tri = mesh.num_triangles
    num_flipped, num_parts = 0, 0
    if cfg.repair_orientation:
        mesh, num_flipped, num_parts = orient_faces(mesh)
    t1 = time.perf_counter()
    timings["orient"] = t1 - t0

    norm = normalization_params(mesh, cfg.normalization_buffer)
    normed = Mesh(vertices_V3=np.ascontiguousarray(normalize_points(mesh.vertices_V3, norm)), faces_F3=mesh.faces_F3)
    xyz = sample_query_points(normed, cfg, rng)
    gt_points, gt_normals = sample_surface(mesh, cfg.num_surface_samples, rng)
    t2 = time.perf_counter()
    timings["sample"] = t2 - t1

    d, w, stage_seconds = distance_and_winding(normed, xyz)
    timings.update(stage_seconds)

    decided = np.abs(w - 0.5) >= cfg.ambiguity_margin
    num_dropped = int((~decided).sum())
    if num_dropped > cfg.max_ambiguous_fraction * len(xyz):
        raise MeshError(f"sign undecidable for {num_dropped / len(xyz):.0%} of the samples "
                        f"(limit {cfg.max_ambiguous_fraction:.0%}): mostly open surface", n_tri)
    sdf = np.where(w > 0.5, -d, d)[decided]
    rows = np.concatenate([xyz[decided], sdf[:, None]], axis=1).astype(np.float32)
    is_pos = rows[:, 3] > 0  # decided after the float32 cast, as the dataset format checks it
    pos, neg = rows[is_pos], rows[~is_pos]
    if len(neg) == 0:
        raise MeshError("no sample lies inside the mesh (it encloses no volume)", n_tri)
    if len(pos) == 0:
        raise MeshError("no sample lies outside the mesh", n_tri)
    timings["total"] = time.perf_counter() - t0
    return MeshSamples(pos_N4=pos, neg_N4=neg, surface_points_M3=gt_points.astype(np.float32),
                       surface_normals_M3=gt_normals.astype(np.float32), normalization=norm,
                       num_triangles=n_tri, num_dropped_ambiguous=num_dropped, num_flipped_faces=num_flipped,
                       num_components=num_parts, timings=timings)


def process_mesh(source: str | Path | bytes, name: str, cfg: MeshSamplingConfig,
                 file_type: str | None = None) -> MeshSamples:
    """Load, validate and sample one mesh file; raises :class:`MeshError` with the reason it was rejected."""
    mesh = load_mesh(source, file_type, max_file_bytes=cfg.max_file_bytes)
    return mesh_to_samples(mesh, cfg, scene_rng(cfg.seed, name))
