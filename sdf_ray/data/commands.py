"""``sdf-ray data ...`` subcommands: synth, import-deepsdf, from-meshes, info.

The CLI calls :func:`register` with its subparsers; each leaf sets ``func(args) -> int``. Problems are raised as
``DataError``/``UserError`` for the CLI to print as one line (exit code 2).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from sdf_ray.errors import EXIT_OK, DataError, UserError


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``data`` command (with its subcommands) to an ``argparse`` subparsers object."""
    data = subparsers.add_parser("data", help="create, import and inspect datasets",
                                 description="Create, import and inspect sdf-ray datasets (Parquet + manifest.json).")
    sub = data.add_subparsers(dest="data_command", metavar="{synth,import-deepsdf,from-meshes,info}")
    sub.required = True

    synth = sub.add_parser("synth", help="generate a dataset of analytic shapes",
                           description="Generate analytic shapes (exact SDFs) sampled like DeepSDF.")
    synth.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    synth.add_argument("--num-scenes", type=int, default=64, metavar="N", help="number of scenes (default 64)")
    synth.add_argument("--samples-per-scene", type=int, default=16384, metavar="M",
                       help="samples per scene, even (default 16384)")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    synth.add_argument("--surface-samples", type=int, default=30_000, metavar="K",
                       help="exact ground-truth surface points per scene, with normals (default 30000, as DeepSDF; "
                            "0: none)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    synth.set_defaults(func=cmd_synth)

    imp = sub.add_parser("import-deepsdf", help="convert DeepSDF SdfSamples .npz files",
                         description="Convert DeepSDF's <data-source>/SdfSamples/<dataset>/<class>/<instance>.npz "
                                     "files listed in a split JSON into an sdf-ray dataset.")
    imp.add_argument("--data-source", required=True, metavar="DIR", help="DeepSDF data source (holds SdfSamples/)")
    imp.add_argument("--split", required=True, metavar="SPLIT.json", help="DeepSDF split file")
    imp.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    imp.set_defaults(func=cmd_import_deepsdf)

    from sdf_ray.data.from_meshes import add_arguments as add_from_meshes_arguments

    meshes = sub.add_parser("from-meshes", help="sample SDFs from triangle meshes on Ray",
                            description="DeepSDF-style SDF samples, ground-truth surface points and the normalisation "
                                        "from OBJ/PLY/OFF/STL/GLB/GLTF meshes, one Ray task per mesh over every CPU; "
                                        "resumable; skipped meshes are listed in DATASET/report.csv.")
    add_from_meshes_arguments(meshes)
    meshes.set_defaults(func=cmd_from_meshes)
    info = sub.add_parser("info", help="validate a dataset and print its statistics")
    info.add_argument("path", metavar="DIR", help="dataset directory")
    info.set_defaults(func=cmd_info)
    return data


def _summary(verb: str, manifest: Any, out: str, seconds: float) -> str:
    from sdf_ray.data.format import MANIFEST_NAME
    from sdf_ray.data.info import format_bytes

    d = Path(out)
    size = (sum((d / f.name).stat().st_size for f in (*manifest.files, *manifest.surface_files))
            + (d / MANIFEST_NAME).stat().st_size)
    return (f"{verb} {manifest.num_scenes:,} scenes, {manifest.num_samples:,} samples to {out} "
            f"({format_bytes(size)}) in {seconds:.1f} s; "
            f"{manifest.num_with_ground_truth:,} with ground truth")


def cmd_synth(args: argparse.Namespace) -> int:
    from sdf_ray.data.synth import check_synth_args, synth_dataset

    check_synth_args(args.num_scenes, args.samples_per_scene, args.seed)
    t0 = time.perf_counter()
    manifest = synth_dataset(args.out, args.num_scenes, args.samples_per_scene, args.seed, overwrite=args.overwrite)
    print(_summary("wrote", manifest, args.out, time.perf_counter() - t0))
    return EXIT_OK


def cmd_import_deepsdf(args: argparse.Namespace) -> int:
    from sdf_ray.data.deepsdf_import import import_deepsdf

    for label, value in (("--data-source", args.data_source), ("--split", args.split), ("--out", args.out)):
        if not value:
            raise UserError(f"{label} must not be empty")
    t0 = time.perf_counter()
    manifest = import_deepsdf(args.data_source, args.split, args.out, overwrite=args.overwrite)
    line = _summary("imported", manifest, args.out, time.perf_counter() - t0)
    if manifest.dropped_nan_rows:
        line += f"; dropped {manifest.dropped_nan_rows:,} rows with NaN"
    print(line)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from sdf_ray.data.info import dataset_info, format_info

    if not args.path:
        raise DataError("dataset path must not be empty")
    print(format_info(dataset_info(args.path)))
    return EXIT_OK


def cmd_from_meshes(args: argparse.Namespace) -> int:
    from sdf_ray.data.from_meshes import cmd_from_meshes as run

    return run(args)
