"""Datasets: Parquet format + manifest, synthetic shapes, DeepSDF import, and the device-resident sampler.

The format API is re-exported here; ``sdf_ray.data.sampler`` (torch) is imported explicitly by its users so that
``sdf-ray data ...`` does not pay for importing torch.
"""

from __future__ import annotations

from sdf_ray.data.format import (
    Manifest,
    PackedScenes,
    SceneSamples,
    SurfaceSamples,
    load_scenes,
    load_surface,
    read_manifest,
    to_normalized,
    to_original,
    validate_files,
    write_dataset,
)

__all__ = [
    "Manifest",
    "PackedScenes",
    "SceneSamples",
    "SurfaceSamples",
    "load_scenes",
    "load_surface",
    "read_manifest",
    "to_normalized",
    "to_original",
    "validate_files",
    "write_dataset",
]
