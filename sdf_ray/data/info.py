"""Summary statistics of a dataset (``sdf-ray data info``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdf_ray.data.format import MANIFEST_NAME, validate_files
from sdf_ray.errors import DataError


def dataset_info(path: str | Path) -> dict[str, Any]:
    """Validate the dataset and summarise it; reads the ``sdf`` column once (streamed, batch by batch)."""
    d = Path(path)
    manifest = validate_files(d)
    sdf_min, sdf_max, abs_sum, count = math.inf, -math.inf, 0.0, 0
    for f in manifest.files:
        try:
            pf = pq.ParquetFile(d / f.name, memory_map=True)
            for batch in pf.iter_batches(batch_size=1 << 20, columns=["sdf"]):
                sdf = batch.column(0).to_numpy(zero_copy_only=False)
                if sdf.size:
                    sdf_min = min(sdf_min, float(sdf.min()))
                    sdf_max = max(sdf_max, float(sdf.max()))
                    abs_sum += float(np.abs(sdf, dtype=np.float64).sum())
                    count += sdf.size
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"corrupt or truncated Parquet file {f.name} in {d}: {e}") from None
    num_pos, num_neg = manifest.num_pos, manifest.num_neg
    per_scene = [s.num_rows for s in manifest.scenes]
    files = manifest.files + manifest.surface_files
    size = sum((d / f.name).stat().st_size for f in files) + (d / MANIFEST_NAME).stat().st_size
    return {
        "path": str(d),
        "source": manifest.source,
        "num_scenes": manifest.num_scenes,
        "num_samples": manifest.num_samples,
        "num_files": len(manifest.files),
        "num_pos": num_pos,
        "num_neg": num_neg,
        "pos_fraction": num_pos / max(num_pos + num_neg, 1),
        "samples_per_scene_min": min(per_scene),
        "samples_per_scene_max": max(per_scene),
        "sdf_min": sdf_min,
        "sdf_max": sdf_max,
        "sdf_mean_abs": abs_sum / max(count, 1),
        "dropped_nan_rows": manifest.dropped_nan_rows,
        "num_with_ground_truth": manifest.num_with_ground_truth,
        "num_surface_samples": manifest.num_surface_samples,
        "num_with_surface_normals": sum(1 for s in manifest.scenes if s.num_surface and s.surface_has_normals),
        "format_version": manifest.format_version,
        "size_bytes": size,
    }


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _ground_truth(info: dict[str, Any]) -> str:
    n, total = info["num_with_ground_truth"], info["num_scenes"]
    if not n:
        return "none: no scene has ground-truth surface samples (reconstruction metrics need them)"
    normals = info["num_with_surface_normals"]
    with_normals = "with normals" if normals == n else f"{normals:,} of them with normals"
    return (f"{n:,} of {total:,} scenes with ground-truth surface samples ({info['num_surface_samples']:,} points, "
            f"{with_normals})")


def format_info(info: dict[str, Any]) -> str:
    """Human-readable multi-line summary of :func:`dataset_info`'s result."""
    src = info["source"]
    src_desc = ", ".join(f"{k}={v}" for k, v in src.items()) if isinstance(src, dict) else str(src)
    lines = [
        f"dataset   {info['path']}",
        f"source    {src_desc}",
        f"scenes    {info['num_scenes']:,} in {info['num_files']} file(s), {format_bytes(info['size_bytes'])} on disk",
        f"samples   {info['num_samples']:,} ({info['samples_per_scene_min']:,}..{info['samples_per_scene_max']:,} per scene)",
        f"balance   {info['num_pos']:,} with sdf > 0, {info['num_neg']:,} with sdf <= 0 "
        f"({100 * info['pos_fraction']:.1f}% positive)",
        f"sdf       min {info['sdf_min']:.4g}, max {info['sdf_max']:.4g}, mean |sdf| {info['sdf_mean_abs']:.4g}",
        f"dropped   {info['dropped_nan_rows']:,} NaN rows at import",
        f"truth     {_ground_truth(info)}",
    ]
    return "\n".join(lines)
