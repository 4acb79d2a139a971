"""``sdf-ray plot``: draw the figures of a run directory or of a Tune sweep directory.

The CLI calls :func:`register` with its subparsers. A path that is neither a run nor a sweep, a run without
metrics or without a checkpoint (for ``--slices``) is a ``UserError`` (one line, exit code 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdf_ray.errors import UserError
from sdf_ray.run_files import TRIALS_SUBDIR


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plot`` command to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "plot", help="draw a run's or a sweep's figures (PNG, headless)",
        description="Draw PNG figures next to the data they show. RUN_DIR (<checkpoint.storage_path>/<run name>): "
                    "RUN_DIR/plots/training.png (loss, gradient norm and grad_clip, learning rates, samples/s, "
                    "validation, skipped steps, rollbacks and restarts); with --slices also RUN_DIR/plots/slices.png "
                    "(decoded SDF on the planes through the origin, next to the exact SDF of generated shapes). "
                    "SWEEP_DIR (an `sdf-ray tune` directory, holding trials.csv): SWEEP_DIR/plots/sweep.png.")
    p.add_argument("path", metavar="RUN_DIR|SWEEP_DIR", help="a training run directory or a sweep directory")
    p.add_argument("--slices", action="store_true",
                   help="also draw SDF slices of a few training scenes from the run's latest checkpoint")
    p.add_argument("--scenes", nargs="+", metavar="SCENE",
                   help="scenes for --slices: indices, names or unique parts of names (default: the first 4)")
    p.add_argument("--resolution", type=int, default=128, metavar="N",
                   help="samples per side of each slice (default 128)")
    p.set_defaults(func=cmd_plot)
    return p


def cmd_plot(args: argparse.Namespace) -> int:
    from sdf_ray import plots

    if not args.path:
        raise UserError("the directory must not be empty")
    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory")
    if args.scenes and not args.slices:
        raise UserError("--scenes selects scenes for --slices; add --slices")
    written: list[Path] = []
    if plots.is_sweep_dir(path):
        if args.slices:
            raise UserError(f"{path} is a sweep directory: --slices takes a run directory "
                            f"(for example {path / TRIALS_SUBDIR}/trial-<id>)")
        written.append(plots.plot_sweep(path))
    elif plots.is_run_dir(path):
        written.append(plots.plot_training(path).path)
        if args.slices:
            written.append(plots.plot_run_slices(path, args.scenes, resolution=args.resolution))
    else:
        raise UserError(f"{path} is neither a run directory (metrics.jsonl, config.yaml) nor a sweep directory "
                        f"(trials.csv)")
    for out in written:
        print(f"wrote {out}")
    return 0
