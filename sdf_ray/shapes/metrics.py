"""Surface metrics of a reconstructed mesh against ground-truth surface samples (numpy, scipy, trimesh).

Frames. Ground truth lives in the ORIGINAL mesh frame; a reconstruction lives in the normalised frame
(``normalized = (p + offset) * scale``). As DeepSDF's ``evaluate.py`` does, points sampled on the
reconstruction are mapped to the ground truth's frame (``p / scale - offset``) and every distance is measured
there, so ``chamfer_l2`` and ``chamfer_l1`` are in original units (squared for L2). The F-score threshold
``tau`` is given in the normalised frame (0.01 = 1 % of the unit sphere's radius, comparable across shapes of
any size) and converted to ``tau / scale`` in the original frame before the comparison.

- ``chamfer_l2``: exactly DeepSDF's: ``num_points`` area-weighted samples on the reconstruction, squared
  nearest-neighbour distances both ways (scipy cKDTree), the SUM of the two means. Papers print it x 10^3.
- ``chamfer_l1`` (Occupancy Networks): the MEAN of the two directions' mean unsquared distances.
- ``normal_consistency`` (Occupancy Networks): mean ``|n . n_nearest|`` in each direction, averaged; NaN when
  the ground truth has no normals.
- ``fscore`` at ``tau`` (Tatarchenko et al. / Occupancy Networks): precision = share of reconstruction points
  within tau of the ground truth, recall = share of ground-truth points within tau of the reconstruction,
  ``2PR / (P + R)`` (0 when both are 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from sdf_ray.data.format import to_original
from sdf_ray.shapes.meshing import Mesh

METRIC_NAMES = ("chamfer_l2", "chamfer_l1", "normal_consistency", "fscore")


@dataclass
class SurfaceMetrics:
    chamfer_l2: float
    chamfer_l1: float
    normal_consistency: float
    fscore: float
    precision: float
    recall: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def sample_mesh(mesh: Mesh, num_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(points ``[n, 3]``, unit face normals ``[n, 3]``): area-weighted uniform samples (trimesh, seeded)."""
    import trimesh

    tm = trimesh.Trimesh(vertices=np.asarray(mesh.verts_V3, dtype=np.float64), faces=mesh.faces_F3, process=False)
    points, face_index = trimesh.sample.sample_surface(tm, num_points, seed=seed)
    return np.asarray(points, dtype=np.float64), np.asarray(tm.face_normals[face_index], dtype=np.float64)


def _unit(n: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.where(norm > 0, norm, 1.0)


def chamfer_l2(rec_points: np.ndarray, gt_points: np.ndarray) -> float:
    """DeepSDF's Chamfer distance: mean squared NN distance gt -> rec plus the same rec -> gt."""
    d_gt, _ = cKDTree(rec_points).query(gt_points)
    d_rec, _ = cKDTree(gt_points).query(rec_points)
    return float(np.mean(np.square(d_gt)) + np.mean(np.square(d_rec)))


def point_metrics(rec_points: np.ndarray, gt_points: np.ndarray, tau: float, rec_normals: np.ndarray | None = None,
                  gt_normals: np.ndarray | None = None) -> SurfaceMetrics:
    """All metrics between two point sets in ONE frame (``tau`` in that frame's units)."""
    rec = np.asarray(rec_points, dtype=np.float64)
    gt = np.asarray(gt_points, dtype=np.float64)
    d_gt, i_gt = cKDTree(rec).query(gt)  # completeness: every gt point's nearest reconstruction point
    d_rec, i_rec = cKDTree(gt).query(rec)  # accuracy: every reconstruction point's nearest gt point
    if rec_normals is not None and gt_normals is not None:
        rn, gn = _unit(np.asarray(rec_normals, dtype=np.float64)), _unit(np.asarray(gt_normals, dtype=np.float64))
        completeness_n = np.abs(np.sum(gn * rn[i_gt], axis=1)).mean()
        accuracy_n = np.abs(np.sum(rn * gn[i_rec], axis=1)).mean()
        nc = float(0.5 * (completeness_n + accuracy_n))
    else:
        nc = float("nan")
    precision = float(np.mean(d_rec < tau))
    recall = float(np.mean(d_gt < tau))
    fscore = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return SurfaceMetrics(
        chamfer_l2=float(np.mean(np.square(d_gt)) + np.mean(np.square(d_rec))),
        chamfer_l1=float(0.5 * (d_gt.mean() + d_rec.mean())),
        normal_consistency=nc, fscore=float(fscore), precision=precision, recall=recall)


def mesh_metrics(mesh_normalized: Mesh, gt_points: np.ndarray, gt_normals: np.ndarray | None,
                 normalization: dict[str, Any], *, num_points: int = 30_000, tau_normalized: float = 0.01,
                 seed: int = 0) -> SurfaceMetrics:
    """Metrics of a mesh in the NORMALISED frame against ground truth in the ORIGINAL frame (module docstring)."""
    points, normals = sample_mesh(mesh_normalized, num_points, seed)
    points_orig = to_original(points, normalization)  # float64 points: float64 distances
    tau_orig = tau_normalized / float(normalization["scale"])
    return point_metrics(points_orig, gt_points, tau_orig, normals, gt_normals)
