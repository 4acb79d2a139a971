"""The output directory of ``reconstruct`` / ``mesh`` / ``evaluate``: per-shape results, CSV, summary.

Layout of ``DIR``::

    job.json                 what produced the results (a re-run with other settings is refused)
    results/<scene>.json     one per finished shape, written atomically LAST: it marks the shape done
    meshes/<scene>.ply       binary PLY in the normalised frame
    meshes_original/<scene>.ply  the same mesh in the original frame (datasets with a normalisation)
    metrics.csv              scene, status, chamfer_l2, chamfer_l1, normal_consistency, fscore, sdf_l1,
                             iterations, seconds (blank where not applicable)
    summary.json             counts per status, mean and median of each metric, shapes/s

Scene names may hold ``/`` (``<dataset>/<class>/<instance>`` from DeepSDF): they become subdirectories.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdf_ray.errors import ConfigError
from sdf_ray.fsutil import write_json_atomic, write_text_atomic

RESULTS_DIR = "results"
MESHES_DIR = "meshes"
MESHES_ORIGINAL_DIR = "meshes_original"
JOB_FILE = "job.json"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
PICTURE_FILE = "reconstructions.png"
STAGES = ("load", "wait", "optimise", "measure", "mesh", "metrics")
"""Where a shape's time goes (a record's ``stages``; ``summary.json``'s ``stages``): on its optimiser actor, its
share of its batch's sample loading, wait for the device (another batch optimising), optimisation, and
``sdf_l1`` + grid decoding; in its CPU task, marching cubes with the PLY files, and the metrics."""
CSV_COLUMNS = ("scene", "status", "chamfer_l2", "chamfer_l1", "normal_consistency", "fscore", "sdf_l1",
               "iterations", "seconds")
SUMMARY_METRICS = ("chamfer_l2", "chamfer_l1", "normal_consistency", "fscore", "sdf_l1")
STATUSES = ("ok", "empty", "failed")


@dataclass(frozen=True)
class SceneInfo:
    """What every unit of work needs to know about one scene."""

    scene_id: int
    name: str
    normalization: dict[str, Any]
    has_ground_truth: bool


def scene_relpath(name: str, suffix: str) -> Path:
    """``a/b/c`` -> ``a/b/c<suffix>``; a name that could escape the directory is flattened instead."""
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        parts = [name.replace("/", "__").replace("..", "_") or "_"]
    return Path(*parts[:-1], parts[-1] + suffix)


def is_identity(normalization: dict[str, Any]) -> bool:
    return float(normalization.get("scale", 1.0)) == 1.0 and all(float(v) == 0.0 for v in normalization.get("offset", [0, 0, 0]))


def result_path(out_dir: Path, name: str) -> Path:
    return out_dir / RESULTS_DIR / scene_relpath(name, ".json")


def mesh_path(out_dir: Path, name: str, original: bool = False) -> Path:
    return out_dir / (MESHES_ORIGINAL_DIR if original else MESHES_DIR) / scene_relpath(name, ".ply")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf become null: JSON has no NaN."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def write_result(out_dir: Path, row: dict[str, Any]) -> None:
    path = result_path(out_dir, row["scene"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, _json_safe(row))


def read_result(out_dir: Path, name: str) -> dict[str, Any] | None:
    """A finished shape's record, or None (missing, or unreadable: the shape is redone)."""
    try:
        row = json.loads(result_path(out_dir, name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(row, dict) or row.get("status") not in STATUSES or row.get("scene") != name:
        return None
    return row


# --------------------------------------------------------------------------------------------------
# The job record: resuming is only safe with the settings that produced the existing results.


def check_job(out_dir: Path, job: dict[str, Any], overwrite: bool) -> bool:
    """Create ``out_dir`` for ``job``; True when it already holds results of this very job (resume).

    Results of a different job are refused (one line listing the differences) unless ``overwrite``, which
    removes only what these commands write.
    """
    path = out_dir / JOB_FILE
    previous: Any = None
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
    if overwrite:
        for name in (RESULTS_DIR, MESHES_DIR, MESHES_ORIGINAL_DIR):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        for name in (JOB_FILE, METRICS_FILE, SUMMARY_FILE, PICTURE_FILE):
            (out_dir / name).unlink(missing_ok=True)
        previous = None
    elif previous is not None and previous != json.loads(json.dumps(job)):
        diffs = _differences(previous, job)
        raise ConfigError(f"{out_dir} holds results of another job ({'; '.join(diffs[:4]) or 'different settings'}): "
                          f"use another --out, or --overwrite to replace them")
    elif previous is None and (out_dir / RESULTS_DIR).is_dir() and any((out_dir / RESULTS_DIR).iterdir()):
        raise ConfigError(f"{out_dir} holds results without a {JOB_FILE}: use another --out, or --overwrite")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out_dir}: cannot create it ({exc.strerror})") from None
    if previous is None:
        write_json_atomic(path, job)
    return previous is not None


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a) != json.dumps(b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# --------------------------------------------------------------------------------------------------
# CSV and summary


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.9g}"
    return str(value)


def metrics_csv(rows: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def summarise(rows: Sequence[dict[str, Any]], *, seconds: float, shapes_this_run: int,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts per status, and mean/median of each metric over the shapes that have it."""
    counts = {s: sum(1 for r in rows if r.get("status") == s) for s in STATUSES}
    metrics: dict[str, Any] = {}
    for name in SUMMARY_METRICS:
        values = [float(r[name]) for r in rows if _finite(r.get(name))]
        metrics[name] = ({"mean": statistics.fmean(values), "median": statistics.median(values), "count": len(values)}
                         if values else {"mean": None, "median": None, "count": 0})
    cd = metrics["chamfer_l2"]
    summary: dict[str, Any] = {
        "num_shapes": len(rows),
        "counts": counts,
        "metrics": metrics,
        "chamfer_l2_x1e3": {"mean": None if cd["mean"] is None else cd["mean"] * 1e3,
                            "median": None if cd["median"] is None else cd["median"] * 1e3},
        "num_with_ground_truth": sum(1 for r in rows if r.get("has_ground_truth")),
        "dropped_nan_samples": int(sum(int(r.get("dropped_nan_samples") or 0) for r in rows)),
        "shapes_this_run": shapes_this_run,
        "seconds": seconds,
        "shapes_per_s": shapes_this_run / seconds if seconds > 0 else None,
    }
    decoded = [r for r in rows if _finite(r.get("grid_points")) and _finite(r.get("grid_fraction"))]
    if decoded:
        summary["grid_points"] = {"mean": statistics.fmean(float(r["grid_points"]) for r in decoded),
                                  "fraction_of_dense": statistics.fmean(float(r["grid_fraction"]) for r in decoded),
                                  "count": len(decoded)}
    stages = [r["stages"] for r in rows if isinstance(r.get("stages"), dict)]
    if stages:
        summary["stages"] = {name: {"per_shape_s": statistics.fmean(float(s.get(name, 0.0)) for s in stages),
                                    "total_s": float(sum(float(s.get(name, 0.0)) for s in stages))}
                             for name in STAGES}
    summary.update(extra or {})
    return summary


def write_tables(out_dir: Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """``metrics.csv`` (rows sorted by scene) and ``summary.json``, each atomically."""
    write_text_atomic(out_dir / METRICS_FILE, metrics_csv(sorted(rows, key=lambda r: r["scene"])))
    write_json_atomic(out_dir / SUMMARY_FILE, summary)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Human lines: counts, Chamfer x 10^3, the other metrics, throughput."""
    c = summary["counts"]
    lines = [f"{summary['num_shapes']} shapes: {c['ok']} ok, {c['empty']} empty, {c['failed']} failed"]
    m = summary["metrics"]
    cd = summary["chamfer_l2_x1e3"]
    if cd["mean"] is not None:
        lines.append(f"  chamfer_l2 x 10^3: mean {cd['mean']:.4f}  median {cd['median']:.4f}  "
                     f"({m['chamfer_l2']['count']} shapes)")
        for name in ("chamfer_l1", "normal_consistency", "fscore"):
            if m[name]["mean"] is not None:
                lines.append(f"  {name}: mean {m[name]['mean']:.5f}  median {m[name]['median']:.5f}")
    elif summary["num_shapes"]:
        lines.append("  no surface metrics: they need ground truth (surface samples) in the dataset")
    if m["sdf_l1"]["mean"] is not None:
        lines.append(f"  sdf_l1: mean {m['sdf_l1']['mean']:.5f}  median {m['sdf_l1']['median']:.5f}")
    if summary.get("dropped_nan_samples"):
        lines.append(f"  dropped {summary['dropped_nan_samples']:,} samples holding NaN")
    if summary.get("grid_points"):
        g = summary["grid_points"]
        lines.append(f"  grid: {g['mean'] / 1e6:.2f} M points decoded per shape, {g['fraction_of_dense']:.1%} of the "
                     f"dense grid (reconstruct.mesh_coarse_stride, mesh_refine_margin, mesh_follow_surface)")
    if summary.get("stages"):
        per = {name: v["per_shape_s"] for name, v in summary["stages"].items()}
        device = "  ".join(f"{name} {per[name]:.3f}" for name in STAGES[:4])
        cpu = "  ".join(f"{name} {per[name]:.3f}" for name in STAGES[4:])
        lines.append(f"  seconds per shape: {device} (optimiser actors) | {cpu} (CPU tasks, in parallel)")
    if summary.get("shapes_per_s"):
        lines.append(f"  {summary['shapes_this_run']} shapes this run in {summary['seconds']:.1f} s "
                     f"({summary['shapes_per_s']:.2f} shapes/s)")
    return lines
