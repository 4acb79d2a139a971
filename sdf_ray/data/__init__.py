"""Datasets: Parquet format + manifest, synthetic shapes, DeepSDF import, and the device-resident sampler.

The format API is re-exported here; ``sdf_ray.data.sampler`` (torch) is imported explicitly by its users so that
``sdf-ray data ...`` does not pay for importing torch.
"""

from __future__ import annotations

from sdf_ray.data.format import (
    Manifest,
    PackedScenes,
    SceneSamples,
    load_scenes,
    read_manifest,
    validate_files,
    write_dataset,
)

__all__ = [
    "Manifest",
    "PackedScenes",
    "SceneSamples",
    "load_scenes",
    "read_manifest",
    "validate_files",
    "write_dataset",
]
