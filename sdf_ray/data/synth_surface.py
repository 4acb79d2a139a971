"""Ground truth of synthetic shapes: area-uniform surface samples with exact normals.

What ``sdf-ray data synth`` stores per scene (30,000 points by default, as DeepSDF's SurfaceSamples), in the
shape's original frame. Each primitive's surface is sampled analytically and area-uniform in its local frame
(pieces chosen by area: faces, rounded edges and corners, tube, caps), with its analytic normal. A union keeps
the points of each primitive that lie outside every other one; where the smooth union equals the plain one
(the union's SDF is exactly 0 there) those points and normals are exact. The few in the blend are
Newton-projected onto the blended surface (near-uniform there) and take the normalised SDF gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sdf_ray.data.synth_shapes import SynthShape, project_to_surface, sdf_gradient


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    u = rng.normal(size=(n, 3))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def _by_pdf(rng: np.random.Generator, n: int, lo: float, hi: float, weight: Callable[[np.ndarray], np.ndarray],
            max_weight: float) -> np.ndarray:
    """``n`` draws on [lo, hi] with density proportional to ``weight`` (rejection sampling)."""
    out: list[np.ndarray] = []
    have = 0
    while have < n:
        x = rng.uniform(lo, hi, size=2 * (n - have) + 16)
        x = x[rng.uniform(size=x.shape) * max_weight < weight(x)]
        out.append(x)
        have += len(x)
    return np.concatenate(out)[:n]


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.where(rng.uniform(size=n) < 0.5, -1.0, 1.0)


def _around_y(phi: np.ndarray, radial: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
    """Points (or directions) at angle ``phi`` around the y axis."""
    return np.stack([radial * np.cos(phi), np.broadcast_to(y, phi.shape), radial * np.sin(phi)], axis=1)


def _disk(rng: np.random.Generator, n: int, r: float, y: float) -> tuple[np.ndarray, np.ndarray]:
    phi = rng.uniform(0, 2 * np.pi, size=n)
    return _around_y(phi, r * np.sqrt(rng.uniform(size=n)), y), np.tile([0.0, np.sign(y), 0.0], (n, 1))


def _rounded_box_pieces(b: tuple[float, ...], r: float) -> tuple[np.ndarray, np.ndarray]:
    """Inner half extents, and the areas of the faces (per axis, both signs), the rounded edges (per axis
    they run along) and the corners."""
    a = np.array(b[:3]) - r
    faces = np.array([8 * a[1] * a[2], 8 * a[0] * a[2], 8 * a[0] * a[1]])
    edges = 4 * np.pi * a * r
    return a, np.concatenate([faces, edges, [4 * np.pi * r * r]])


def _primitive_area(kind: str, p: tuple[float, ...]) -> float:
    if kind == "sphere":
        return 4 * np.pi * p[0] ** 2
    if kind in ("box", "rounded_box"):
        return float(_rounded_box_pieces(p, p[3] if kind == "rounded_box" else 0.0)[1].sum())
    if kind == "torus":
        return 4 * np.pi**2 * p[0] * p[1]
    if kind == "capsule":
        return 4 * np.pi * p[1] * (p[0] + p[1])
    if kind == "cylinder":
        return 2 * np.pi * p[0] * (2 * p[1] + p[0])
    if kind == "cone":
        h, r1, r2 = p
        return float(np.pi * (r1 + r2) * np.hypot(r2 - r1, 2 * h) + np.pi * (r1 * r1 + r2 * r2))
    raise AssertionError(kind)


def _box_surface(p: tuple[float, ...], r: float, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    a, areas = _rounded_box_pieces(p, r)
    piece = rng.choice(len(areas), size=n, p=areas / areas.sum())
    pts, nrm = np.zeros((n, 3)), np.zeros((n, 3))
    for axis in range(3):
        j, k = (axis + 1) % 3, (axis + 2) % 3
        face, edge = piece == axis, piece == axis + 3
        m = int(face.sum())
        nrm[face, axis] = _signs(rng, m)
        pts[face, axis] = nrm[face, axis] * (a[axis] + r)
        pts[face, j] = rng.uniform(-a[j], a[j], size=m)
        pts[face, k] = rng.uniform(-a[k], a[k], size=m)
        m = int(edge.sum())
        theta = rng.uniform(0, np.pi / 2, size=m)
        nrm[edge, j] = _signs(rng, m) * np.cos(theta)
        nrm[edge, k] = _signs(rng, m) * np.sin(theta)
        pts[edge] = a * np.sign(nrm[edge]) + r * nrm[edge]
        pts[edge, axis] = rng.uniform(-a[axis], a[axis], size=m)
    corner = piece == 6
    nrm[corner] = np.sign(rng.normal(size=(int(corner.sum()), 3))) * np.abs(_unit_vectors(rng, int(corner.sum())))
    pts[corner] = a * np.sign(nrm[corner]) + r * nrm[corner]
    return pts, nrm


def _primitive_surface(kind: str, p: tuple[float, ...], rng: np.random.Generator,
                       n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` area-uniform points on a primitive's surface and their unit normals, in its local frame."""
    if kind == "sphere":
        u = _unit_vectors(rng, n)
        return p[0] * u, u
    if kind in ("box", "rounded_box"):
        return _box_surface(p, p[3] if kind == "rounded_box" else 0.0, rng, n)
    phi = rng.uniform(0, 2 * np.pi, size=n)
    if kind == "torus":
        big_r, r = p
        theta = _by_pdf(rng, n, 0, 2 * np.pi, lambda t: big_r + r * np.cos(t), big_r + r)
        return _around_y(phi, big_r + r * np.cos(theta), r * np.sin(theta)), _around_y(phi, np.cos(theta), np.sin(theta))
    if kind in ("capsule", "cylinder"):
        if kind == "capsule":
            h, r = p
            side = rng.uniform(size=n) < h / (h + r)  # side 4 pi r h, the two caps 4 pi r^2
        else:
            r, h = p
            side = rng.uniform(size=n) < 2 * h / (2 * h + r)  # side 4 pi r h, the two caps 2 pi r^2
        pts, nrm = _around_y(phi, r, rng.uniform(-h, h, size=n)), _around_y(phi, 1.0, 0.0)
        m = int((~side).sum())
        if kind == "capsule":
            nrm[~side] = _unit_vectors(rng, m)
            pts[~side] = r * nrm[~side] + np.outer(np.where(nrm[~side, 1] < 0, -h, h), [0.0, 1.0, 0.0])
        else:
            top = rng.uniform(size=m) < 0.5
            caps = [_disk(rng, m, r, h), _disk(rng, m, r, -h)]
            pts[~side] = np.where(top[:, None], caps[0][0], caps[1][0])
            nrm[~side] = np.where(top[:, None], caps[0][1], caps[1][1])
        return pts, nrm
    if kind == "cone":
        h, r1, r2 = p
        areas = np.array([np.pi * (r1 + r2) * np.hypot(r2 - r1, 2 * h), np.pi * r1 * r1, np.pi * r2 * r2])
        piece = rng.choice(3, size=n, p=areas / areas.sum())  # lateral, bottom (y = -h), top (y = +h)
        m1, m2 = int((piece == 1).sum()), int((piece == 2).sum())

        def radius_at(y: np.ndarray) -> np.ndarray:
            return r1 + (r2 - r1) * (y + h) / (2 * h)

        y = _by_pdf(rng, n, -h, h, radius_at, max(r1, r2))  # the lateral area element grows with the radius
        slope = np.hypot(2 * h, r1 - r2)
        pts, nrm = _around_y(phi, radius_at(y), y), _around_y(phi, 2 * h / slope, (r1 - r2) / slope)
        (pts[piece == 1], nrm[piece == 1]), (pts[piece == 2], nrm[piece == 2]) = _disk(rng, m1, r1, -h), _disk(rng, m2, r2, h)
        return pts, nrm
    raise AssertionError(kind)


def surface_samples(shape: SynthShape, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` area-uniform points on the shape's surface and their unit normals (the normalised SDF gradient),
    float64, in the shape's ORIGINAL (world) frame: ``normalized = (p + shape.offset) * shape.scale``."""
    prims = shape.primitives
    areas = np.array([_primitive_area(q.kind, q.params) for q in prims])
    points: list[np.ndarray] = []
    normals: list[np.ndarray] = []
    have = 0
    for _ in range(50):
        m = int((n - have) * (1.0 if len(prims) == 1 else 1.5)) + 16
        owner = rng.choice(len(prims), size=m, p=areas / areas.sum())
        world, nrm = np.empty((m, 3)), np.empty((m, 3))
        for i, q in enumerate(prims):
            mine = owner == i
            local_p, local_n = _primitive_surface(q.kind, q.params, rng, int(mine.sum()))
            world[mine], nrm[mine] = local_p @ q.rotation.T + q.translation, local_n @ q.rotation.T
        if len(prims) > 1:
            keep = np.ones(m, dtype=bool)
            for i, q in enumerate(prims):
                keep &= (owner == i) | (q.sdf(world) > 0)  # on the union's surface only outside the others
            world, nrm = world[keep], nrm[keep]
            p = (world + shape.offset) * shape.scale
            blend = np.flatnonzero(np.abs(shape.sdf(p)) > 1e-9)
            if blend.size:
                p[blend], ok = project_to_surface(shape, p[blend], 10, tol=1e-7)
                g = sdf_gradient(shape, p[blend])
                nrm[blend] = g / np.linalg.norm(g, axis=1, keepdims=True)
                world[blend] = p[blend] / shape.scale - shape.offset
                good = np.ones(len(p), dtype=bool)
                good[blend[~ok]] = False
                world, nrm = world[good], nrm[good]
        points.append(world)
        normals.append(nrm)
        have += len(world)
        if have >= n:
            break
    if have < n:  # pragma: no cover - would need a degenerate shape
        raise AssertionError(f"surface sampling found only {have} of {n} points")
    return np.concatenate(points)[:n], np.concatenate(normals)[:n]
