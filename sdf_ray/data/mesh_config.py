"""How ``sdf-ray data from-meshes`` turns one triangle mesh into SDF samples: the reference recipe as fields.

The defaults are DeepSDF's ``PreprocessMesh.cpp`` (facebookresearch/DeepSDF): 500,000 samples per mesh,
47/50 of them near the surface (area-weighted surface points, each perturbed twice by isotropic Gaussian
noise whose *variance* is 0.005 and 0.0005, i.e. standard deviations 0.0707 and 0.0224: the reference
builds ``normal_distribution(0, sqrt(variance))``) and 3/50 uniform in the cube [-1, 1]^3; the mesh is first
normalised so that its bounding-box centre is the origin and its farthest vertex lies at 1/1.03.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from sdf_ray.structure import Ge, Gt, Interval, NonNegativeInt, PositiveInt, Rule, structure

MESH_SUFFIXES = (".obj", ".ply", ".off", ".stl", ".glb", ".gltf")
"""File name endings ``from-meshes`` reads (case-insensitive)."""

SOURCE = "mesh sampling"
Finite = Rule(math.isfinite, "must be finite")
Variance = Annotated[float, Rule(lambda v: v > 0 and math.isfinite(v), "must be positive and finite")]


@dataclass(frozen=True, kw_only=True)
class MeshSamplingConfig:
    """Per-mesh sampling recipe and limits; every field has the reference's value as its default. Ranges sit in
    the field types (the shared structurer, :mod:`sdf_ray.structure`, checks them all at once)."""

    num_samples: Annotated[int, Ge(2)] = 500_000
    """Query points drawn per mesh, before ambiguous ones are dropped."""
    near_surface_fraction: Annotated[float, Interval(0, 1)] = 47 / 50
    """Share of ``num_samples`` drawn near the surface (the rest is uniform in the cube)."""
    near_variances: tuple[Variance, Variance] = (0.005, 0.0005)
    """Variances (not standard deviations) of the two Gaussian perturbations; each surface point is
    perturbed once with each, in the normalised frame."""
    uniform_half_extent: Annotated[float, Gt(0), Finite] = 1.0
    """Uniform samples fill [-h, h]^3 in the normalised frame."""
    normalization_buffer: Annotated[float, Ge(1), Finite] = 1.03
    """The farthest used vertex lands at distance 1 / buffer from the bounding-box centre."""
    num_surface_samples: NonNegativeInt = 30_000
    """Ground-truth surface points (with normals) kept per mesh, in the mesh's original frame."""
    ambiguity_margin: Annotated[float, Interval(0, 0.5, "[)")] = 0.2
    """Samples whose generalised winding number lies within this of 0.5 are dropped (their inside/outside
    is undecidable, e.g. in the plane of a hole) and counted."""
    max_ambiguous_fraction: Annotated[float, Interval(0, 1)] = 0.5
    """A mesh that loses a larger share of its samples to ambiguity is rejected (mostly open surface)."""
    repair_orientation: bool = True
    """Make face orientation consistent within each connected part and point each part's faces outwards
    (positive signed volume) before computing winding numbers: flipped faces would otherwise flip the sign
    of their neighbourhood."""
    max_triangles: PositiveInt = 5_000_000
    """Meshes with more triangles are rejected (memory and time guard)."""
    max_file_bytes: PositiveInt = 1 << 30
    """Files larger than this are rejected before they are read."""
    seed: NonNegativeInt = 0
    """Seed of the sampling; with the scene name it fixes every random draw of that scene."""

    @property
    def num_near_surface_points(self) -> int:
        """Surface points drawn for perturbation; each gives two samples (the reference's ``47 * N / 50 / 2``)."""
        return int(self.near_surface_fraction * self.num_samples) // 2

    @property
    def num_uniform(self) -> int:
        return self.num_samples - 2 * self.num_near_surface_points

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["near_variances"] = list(self.near_variances)
        return d

    @classmethod
    def from_dict(cls, raw: Any) -> MeshSamplingConfig:
        """Build from plain data (:meth:`to_dict` output, JSON); one ConfigError lists every problem."""
        return structure(cls, raw, source=SOURCE)

    def checked(self) -> MeshSamplingConfig:
        """This config, after the structurer's checks (for one built in code rather than read): one
        ConfigError lists every invalid field."""
        return MeshSamplingConfig.from_dict(self.to_dict())
