"""Analytic shapes with exact signed distance functions: the geometry behind ``sdf-ray data synth``.

Seven primitives (sphere, box, rounded box, torus, capsule, capped cylinder, capped cone) with exact SDFs, a
smooth union of 2-3 of them, random sizes, rotations and translations normalised into the unit sphere, and
Newton projection of points onto the zero level set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sdf_ray.errors import DataError

PRIMITIVES = ("sphere", "box", "rounded_box", "torus", "capsule", "cylinder", "cone")
NORMALIZATION_BUFFER = 1.03  # as DeepSDF: the shape ends up strictly inside the unit sphere


# --------------------------------------------------------------------------------------------------
# Exact SDFs of primitives in their local frame (main axis = y). p: (N, 3) float64.


def _length(*parts: np.ndarray) -> np.ndarray:
    return np.sqrt(sum(q * q for q in parts))  # type: ignore[return-value]


def sdf_sphere(p: np.ndarray, r: float) -> np.ndarray:
    return np.sqrt(np.einsum("nd,nd->n", p, p)) - r


def sdf_box(p: np.ndarray, bx: float, by: float, bz: float) -> np.ndarray:
    qx, qy, qz = np.abs(p[:, 0]) - bx, np.abs(p[:, 1]) - by, np.abs(p[:, 2]) - bz
    outside = _length(np.maximum(qx, 0.0), np.maximum(qy, 0.0), np.maximum(qz, 0.0))
    inside = np.minimum(np.maximum(np.maximum(qx, qy), qz), 0.0)
    return outside + inside


def sdf_rounded_box(p: np.ndarray, bx: float, by: float, bz: float, r: float) -> np.ndarray:
    """Box of half extents (bx, by, bz) whose edges are rounded with radius r (< min half extent)."""
    return sdf_box(p, bx - r, by - r, bz - r) - r


def sdf_torus(p: np.ndarray, big_r: float, r: float) -> np.ndarray:
    qx = _length(p[:, 0], p[:, 2]) - big_r
    return _length(qx, p[:, 1]) - r


def sdf_capsule(p: np.ndarray, h: float, r: float) -> np.ndarray:
    """Segment from (0,-h,0) to (0,h,0) thickened by r."""
    y = p[:, 1] - np.clip(p[:, 1], -h, h)
    return _length(p[:, 0], y, p[:, 2]) - r


def sdf_cylinder(p: np.ndarray, r: float, h: float) -> np.ndarray:
    """Capped cylinder of radius r and half height h."""
    dx = _length(p[:, 0], p[:, 2]) - r
    dy = np.abs(p[:, 1]) - h
    return np.minimum(np.maximum(dx, dy), 0.0) + _length(np.maximum(dx, 0.0), np.maximum(dy, 0.0))


def sdf_cone(p: np.ndarray, h: float, r1: float, r2: float) -> np.ndarray:
    """Capped cone of half height h, radius r1 at y=-h and r2 at y=+h (Inigo Quilez's exact formula)."""
    qx = _length(p[:, 0], p[:, 2])
    qy = p[:, 1]
    k2x, k2y = r2 - r1, 2.0 * h
    ca_x = qx - np.minimum(qx, np.where(qy < 0.0, r1, r2))
    ca_y = np.abs(qy) - h
    t = np.clip(((r2 - qx) * k2x + (h - qy) * k2y) / (k2x * k2x + k2y * k2y), 0.0, 1.0)
    cb_x = qx - r2 + k2x * t
    cb_y = qy - h + k2y * t
    s = np.where((cb_x < 0.0) & (ca_y < 0.0), -1.0, 1.0)
    return s * np.sqrt(np.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))


_SDF: dict[str, Callable[..., np.ndarray]] = {
    "sphere": sdf_sphere,
    "box": sdf_box,
    "rounded_box": sdf_rounded_box,
    "torus": sdf_torus,
    "capsule": sdf_capsule,
    "cylinder": sdf_cylinder,
    "cone": sdf_cone,
}


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum: equals min(a, b) where |a - b| >= k, never below min(a, b) - k/4."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25


# --------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Primitive:
    kind: str
    params: tuple[float, ...]
    rotation: np.ndarray
    """(3, 3); columns are the local axes expressed in world coordinates."""
    translation: np.ndarray

    @property
    def bounding_radius(self) -> float:
        """Radius of a sphere around ``translation`` that contains the primitive."""
        p = self.params
        if self.kind == "sphere":
            return p[0]
        if self.kind in ("box", "rounded_box"):
            return float(np.linalg.norm(p[:3]))
        if self.kind == "torus":
            return p[0] + p[1]
        if self.kind == "capsule":
            return p[0] + p[1]
        if self.kind == "cylinder":
            return float(np.hypot(p[0], p[1]))
        if self.kind == "cone":
            return float(np.hypot(p[0], max(p[1], p[2])))
        raise AssertionError(self.kind)

    def sdf(self, world_N3: np.ndarray) -> np.ndarray:
        local = (world_N3 - self.translation) @ self.rotation
        return _SDF[self.kind](local, *self.params)


@dataclass(frozen=True)
class SynthShape:
    """A primitive or a smooth union of primitives, plus the map into the unit sphere.

    ``normalized = (world + offset) * scale``. :meth:`sdf` takes normalised points and returns the SDF in
    normalised units (the world SDF times ``scale``). For a single primitive it is the exact signed distance.
    For a smooth union it is the polynomial smooth-min of exact distances: its zero set is the blended
    surface, its sign is right everywhere and it equals the exact distance away from the blend region, but
    near the blend it underestimates the true distance by up to ``k/4`` (it is a bound, not a distance).
    """

    primitives: tuple[Primitive, ...]
    blend_k: float
    offset: np.ndarray
    scale: float

    @property
    def kind(self) -> str:
        if len(self.primitives) == 1:
            return self.primitives[0].kind
        return "union-" + "-".join(p.kind for p in self.primitives)

    def sdf(self, xyz_N3: np.ndarray) -> np.ndarray:
        world = np.asarray(xyz_N3, dtype=np.float64) / self.scale - self.offset
        d = self.primitives[0].sdf(world)
        for prim in self.primitives[1:]:
            d = smooth_min(d, prim.sdf(world), self.blend_k)
        return d * self.scale


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _random_params(kind: str, rng: np.random.Generator) -> tuple[float, ...]:
    u = rng.uniform
    if kind == "sphere":
        return (u(0.3, 0.8),)
    if kind == "box":
        return (u(0.15, 0.7), u(0.15, 0.7), u(0.15, 0.7))
    if kind == "rounded_box":
        b = (u(0.2, 0.7), u(0.2, 0.7), u(0.2, 0.7))
        return (*b, u(0.05, 0.6) * min(b))
    if kind == "torus":
        big_r = u(0.35, 0.7)
        return (big_r, u(0.15, 0.45) * big_r)
    if kind == "capsule":
        return (u(0.15, 0.6), u(0.12, 0.35))
    if kind == "cylinder":
        return (u(0.15, 0.5), u(0.15, 0.6))
    if kind == "cone":
        return (u(0.2, 0.6), u(0.15, 0.6), u(0.05, 0.4))
    raise AssertionError(kind)


def draw_shape(rng: np.random.Generator) -> SynthShape:
    # 7 primitives + unions, unions about 30% of scenes.
    if rng.uniform() < 0.3:
        kinds = [str(k) for k in rng.choice(PRIMITIVES, size=int(rng.integers(2, 4)), replace=True)]
        spread = 0.35
    else:
        kinds = [str(rng.choice(PRIMITIVES))]
        spread = 0.0
    prims = tuple(
        Primitive(kind=k, params=_random_params(k, rng), rotation=_random_rotation(rng),
                  translation=rng.normal(scale=spread, size=3) if spread else rng.uniform(-0.2, 0.2, size=3))
        for k in kinds
    )
    blend_k = float(rng.uniform(0.1, 0.3)) if len(prims) > 1 else 0.0
    t = np.stack([p.translation for p in prims])
    r = np.array([p.bounding_radius for p in prims])
    center = 0.5 * ((t - r[:, None]).min(axis=0) + (t + r[:, None]).max(axis=0))
    # The smooth union grows the shape by at most blend_k / 4 beyond the plain union.
    radius = float((np.linalg.norm(t - center, axis=1) + r).max()) + blend_k / 4
    return SynthShape(primitives=prims, blend_k=blend_k, offset=-center, scale=1.0 / (radius * NORMALIZATION_BUFFER))


def synth_shape(index: int, seed: int) -> SynthShape:
    """The shape of scene ``index`` for ``seed`` (the same one :func:`synth_scene` samples)."""
    return draw_shape(np.random.default_rng(seed_key(seed, index)))


def seed_key(seed: int, index: int) -> list[int]:
    if seed < 0 or index < 0:
        raise DataError(f"seed and scene index must be non-negative, got seed={seed}, index={index}")
    return [int(seed), int(index)]


# --------------------------------------------------------------------------------------------------
# Projection onto the surface, and the SDF's gradient

_TETRA = np.array([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=np.float64)


def _newton_step(shape: SynthShape, p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """``p - f(p) * g / |g|^2`` with a tetrahedral finite-difference gradient (4 SDF evaluations per point)."""
    n = len(p)
    vals = shape.sdf((p[None, :, :] + eps * _TETRA[:, None, :]).reshape(-1, 3)).reshape(4, n)
    f = vals.mean(axis=0)  # second-order accurate since the tetrahedron's vertices sum to zero
    g = np.einsum("kn,kd->nd", vals, _TETRA) / (4 * eps)
    g2 = np.maximum(np.einsum("nd,nd->n", g, g), 1e-12)
    return p - (f / g2)[:, None] * g


def project_to_surface(shape: SynthShape, p_N3: np.ndarray, num_steps: int, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Newton-project points onto the zero set; returns (points, converged mask with |sdf| < tol).

    Later steps only touch points that have not converged yet. Points that start near the medial axis
    (where the gradient vanishes) may not converge: callers drop them.
    """
    p = np.array(p_N3, dtype=np.float64)
    active = np.arange(len(p))
    converged = np.zeros(len(p), dtype=bool)
    for _ in range(num_steps):
        p[active] = _newton_step(shape, p[active])
        ok = np.abs(shape.sdf(p[active])) < tol
        converged[active[ok]] = True
        active = active[~ok]
        if not active.size:
            break
    return p, converged


def sdf_gradient(shape: SynthShape, p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of ``shape.sdf`` (6 evaluations per point)."""
    steps = np.concatenate([np.eye(3), -np.eye(3)]) * eps
    vals = shape.sdf((p[None, :, :] + steps[:, None, :]).reshape(-1, 3)).reshape(6, len(p))
    return (vals[:3] - vals[3:]).T / (2 * eps)
