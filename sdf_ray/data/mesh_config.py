"""How ``sdf-ray data from-meshes`` turns one triangle mesh into SDF samples: the reference recipe as fields.

The defaults are DeepSDF's ``PreprocessMesh.cpp`` (facebookresearch/DeepSDF): 500,000 samples per mesh,
47/50 of them near the surface (area-weighted surface points, each perturbed twice by isotropic Gaussian
noise whose *variance* is 0.005 and 0.0005, i.e. standard deviations 0.0707 and 0.0224: the reference
builds ``normal_distribution(0, sqrt(variance))``) and 3/50 uniform in the cube [-1, 1]^3; the mesh is first
normalised so that its bounding-box centre is the origin and its farthest vertex lies at 1/1.03.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from sdf_ray.errors import ConfigError

MESH_SUFFIXES = (".obj", ".ply", ".off", ".stl", ".glb", ".gltf")
"""File name endings ``from-meshes`` reads (case-insensitive)."""


@dataclass(frozen=True, kw_only=True)
class MeshSamplingConfig:
    """Per-mesh sampling recipe and limits; every field has the reference's value as its default."""

    num_samples: int = 500_000
    """Query points drawn per mesh, before ambiguous ones are dropped."""
    near_surface_fraction: float = 47 / 50
    """Share of ``num_samples`` drawn near the surface (the rest is uniform in the cube)."""
    near_variances: tuple[float, float] = (0.005, 0.0005)
    """Variances (not standard deviations) of the two Gaussian perturbations; each surface point is
    perturbed once with each, in the normalised frame."""
    uniform_half_extent: float = 1.0
    """Uniform samples fill [-h, h]^3 in the normalised frame."""
    normalization_buffer: float = 1.03
    """The farthest used vertex lands at distance 1 / buffer from the bounding-box centre."""
    num_surface_samples: int = 30_000
    """Ground-truth surface points (with normals) kept per mesh, in the mesh's original frame."""
    ambiguity_margin: float = 0.2
    """Samples whose generalised winding number lies within this of 0.5 are dropped (their inside/outside
    is undecidable, e.g. in the plane of a hole) and counted."""
    max_ambiguous_fraction: float = 0.5
    """A mesh that loses a larger share of its samples to ambiguity is rejected (mostly open surface)."""
    repair_orientation: bool = True
    """Make face orientation consistent within each connected part and point each part's faces outwards
    (positive signed volume) before computing winding numbers: flipped faces would otherwise flip the sign
    of their neighbourhood."""
    max_triangles: int = 5_000_000
    """Meshes with more triangles are rejected (memory and time guard)."""
    max_file_bytes: int = 1 << 30
    """Files larger than this are rejected before they are read."""
    seed: int = 0
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
    def from_dict(cls, raw: dict[str, Any]) -> MeshSamplingConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys and invalid values raise one ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError([f"mesh sampling: unknown key {k!r}" for k in unknown])
        values = dict(raw)
        if "near_variances" in values and isinstance(values["near_variances"], list):
            values["near_variances"] = tuple(values["near_variances"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise one ConfigError listing every invalid field."""
        problems: list[str] = []

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.num_samples) or self.num_samples < 2:
            problems.append(f"num_samples must be an integer >= 2, got {self.num_samples!r}")
        if not is_num(self.near_surface_fraction) or not 0 <= self.near_surface_fraction <= 1:
            problems.append(f"near_surface_fraction must be in [0, 1], got {self.near_surface_fraction!r}")
        nv = self.near_variances
        if not (isinstance(nv, tuple) and len(nv) == 2 and all(is_num(v) and v > 0 for v in nv)):
            problems.append(f"near_variances must be two positive numbers, got {nv!r}")
        if not is_num(self.uniform_half_extent) or self.uniform_half_extent <= 0:
            problems.append(f"uniform_half_extent must be positive, got {self.uniform_half_extent!r}")
        if not is_num(self.normalization_buffer) or self.normalization_buffer < 1:
            problems.append(f"normalization_buffer must be >= 1, got {self.normalization_buffer!r}")
        if not is_int(self.num_surface_samples) or self.num_surface_samples < 0:
            problems.append(f"num_surface_samples must be an integer >= 0, got {self.num_surface_samples!r}")
        if not is_num(self.ambiguity_margin) or not 0 <= self.ambiguity_margin < 0.5:
            problems.append(f"ambiguity_margin must be in [0, 0.5), got {self.ambiguity_margin!r}")
        if not is_num(self.max_ambiguous_fraction) or not 0 <= self.max_ambiguous_fraction <= 1:
            problems.append(f"max_ambiguous_fraction must be in [0, 1], got {self.max_ambiguous_fraction!r}")
        if not isinstance(self.repair_orientation, bool):
            problems.append(f"repair_orientation must be true or false, got {self.repair_orientation!r}")
        if not is_int(self.max_triangles) or self.max_triangles < 1:
            problems.append(f"max_triangles must be a positive integer, got {self.max_triangles!r}")
        if not is_int(self.max_file_bytes) or self.max_file_bytes < 1:
            problems.append(f"max_file_bytes must be a positive integer, got {self.max_file_bytes!r}")
        if not is_int(self.seed) or self.seed < 0:
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if problems:
            raise ConfigError(problems, source="mesh sampling")
