"""``sdf-ray tune``: search hyperparameters with Ray Tune, pruning trials that diverge.

``sdf_ray.cli`` calls :func:`register` with its subparsers. User errors are raised as ``ConfigError`` /
``UserError`` / ``ClusterError`` for the CLI to print as one line (exit code 2).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from sdf_ray.config_args import add_config_args, load_config
from sdf_ray.errors import EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="search hyperparameters with Ray Tune (prunes diverging trials)",
        description="Run a Ray Tune sweep of training runs. Each trial applies its sampled values to the training "
                    "config and trains with Ray Train; diverging trials are stopped at once, ASHA stops slow ones. "
                    "Writes trials.csv, best_config.yaml and tune_summary.json under "
                    "<checkpoint.storage_path>/<name>/. Re-running the same command resumes an interrupted sweep.")
    add_config_args(p)
    p.add_argument("--search", required=True, metavar="SEARCH.yaml", help="search file (space, scheduler, ...)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--name", help="sweep name: the directory under checkpoint.storage_path (default: the search "
                                  "file's stem)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing sweep of the same name first")
    p.set_defaults(func=cmd_tune)
    return p


def cmd_tune(args: argparse.Namespace) -> int:
    from sdf_ray import launch
    from sdf_ray.ray_session import connect_ray
    from tuning import outputs, search, sweep

    name = args.name or Path(args.search).stem
    if not _NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"--name {name!r}: must be a plain directory name (letters, digits, . _ -)")
    cfg = launch.resolve_paths(load_config(args))
    spec = search.load(args.search, cfg)
    num_scenes = launch.check_dataset(cfg)
    # Ray Train's default health check: see sdf_ray.ray_session.HEALTH_CHECK_ENV and tuning/reaper.py.
    where = connect_ray(args.address, fast_reports=False, import_meanwhile=launch.DRIVER_IMPORTS)
    print(f"sdf-ray tune: {name} on {where}", flush=True)
    summary = sweep.run(cfg, spec, name, num_scenes=num_scenes, overwrite=args.overwrite)
    print(outputs.format_table(spec, summary))
    if summary.get("samples_per_s"):
        print(f"throughput: {summary['samples_trained']:,} samples trained in {summary['elapsed_s']:g} s, "
              f"{summary['samples_per_s'] / 1e6:.2f} M samples/s over the sweep; a trial's start-up "
              f"{summary.get('trial_startup_seconds_mean')} s and teardown {summary.get('trial_teardown_seconds_mean')} "
              f"s on average (each trial's summary.json has its breakdown)")
    from sdf_ray.plots import write_sweep_plot

    plot = write_sweep_plot(summary["directory"])
    if plot is not None:
        print(f"sweep plot {plot}")
    if summary["status_counts"].get("unfinished"):
        print(f"sdf-ray tune: interrupted with {summary['status_counts']['unfinished']} trial(s) unfinished; "
              "re-run the same command to resume")
        return EXIT_INTERRUPTED
    if summary["best_trial_id"]:
        return EXIT_OK
    return EXIT_DIVERGED if summary["status_counts"].get("pruned_diverged") else EXIT_FAILED
