"""``sdf-ray``: train, tune, check and print configs, manage datasets, benchmark.

``ray.init`` happens here and nowhere in library code. Exit codes: 0 success, 1 failure (a traceback
means a bug), 2 a user error (one line, no traceback), 3 training diverged.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from sdf_ray import config as config_mod
from sdf_ray.errors import ClusterError, UserError, first_line

EXIT_OK, EXIT_FAILED, EXIT_USER, EXIT_DIVERGED = 0, 1, 2, 3
log = logging.getLogger("sdf_ray")


def _add_config_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", help="training config YAML")
    else:
        p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML-parsed), repeatable")


def _load(args: argparse.Namespace) -> config_mod.TrainConfig:
    return config_mod.load(args.config, args.overrides)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"{args.config}: OK ({cfg.scaling.num_workers} worker(s), {cfg.optim.num_epochs} epochs, "
          f"run name {cfg.checkpoint.run_name!r})")
    return EXIT_OK


def cmd_print_config(args: argparse.Namespace) -> int:
    print(config_mod.to_yaml(_load(args)), end="")
    return EXIT_OK


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _probe(gcs_address: str, timeout_s: float = 3.0) -> None:
    host, _, port = gcs_address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError):
        raise ClusterError(f"no Ray cluster is reachable at {gcs_address} (nothing answered within "
                           f"{timeout_s:g} s); check the address, or start one with `ray start --head`") from None


# Ray Train V2 workers hand each ``ray.train.report`` to a queue of size 1 that the controller drains
# once per health check (every 2 s by default): a worker that reports more often than that blocks in
# report. Measured on an H200, logging every 40 steps (1.3 s) held training to one interval per 2 s: 20.9 M
# instead of 31.6 M samples/s. Polling 10x a second costs one small RPC per worker per poll.
# Not for Tune: a controller that polls this often notices its workers dying while Tune is killing the
# trial, retries, and creates a new placement group that outlives it (seen in CI: the next trial then
# waited forever for CPUs). Leaks end with the job, which for `sdf-ray train` is the run itself.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
FAST_HEALTH_CHECK_S = "0.1"


def job_env_vars(gcs_address: str, *, fast_reports: bool = True) -> dict[str, str]:
    """Environment for every process of the job (Ray Train's controller and workers included).

    Under ``ray job submit`` the job's runtime env comes first: Ray refuses a driver that sets a
    variable the job's runtime env already sets.
    """
    env = {"RAY_ADDRESS": gcs_address}
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if fast_reports and HEALTH_CHECK_ENV not in ((job_config.get("runtime_env") or {}).get("env_vars") or {}):
        env[HEALTH_CHECK_ENV] = os.environ.get(HEALTH_CHECK_ENV, FAST_HEALTH_CHECK_S)
    return env


def connect_ray(address: str | None, *, fast_reports: bool = True) -> str:
    """Connect to ``address`` / ``RAY_ADDRESS``, else start an embedded local Ray; returns a description.

    Every process of the job gets ``RAY_ADDRESS`` = this cluster's GCS address. Ray Train's
    PlacementGroupCleaner queries the State API from inside an actor with no address of its own: it
    would otherwise guess (``/tmp/ray/ray_current_cluster``, then a process scan), fail with "multiple
    active Ray instances" when several clusters share a machine, and flood the console with "State API
    may be temporarily unavailable"; or find another cluster's API and clean up a live run's
    placement group. The State API is served by the dashboard, so the embedded Ray keeps it on.

    ``fast_reports``: Ray Train collects reports every 0.1 s instead of 2 s (see HEALTH_CHECK_ENV); off
    for Tune sweeps.
    """
    import ray
    from ray._private.services import canonicalize_bootstrap_address_or_die

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "existing Ray session"
    if address:
        if address.startswith("http"):
            raise ClusterError(f"--address {address}: give the Ray GCS address (host:6379 or 'auto'); "
                               "dashboard URLs are for `ray job submit`")
        try:
            # Only "auto" is looked up: Ray's canonicalisation would turn 127.0.0.1 into the host's IP.
            gcs_address = canonicalize_bootstrap_address_or_die(address) if address == "auto" else address
        except ConnectionError as exc:
            raise ClusterError(f"cannot find a Ray cluster for address {address!r}: "
                               f"{first_line(exc)}") from None
        _probe(gcs_address)
        try:
            ray.init(address=gcs_address, logging_level=logging.WARNING,
                     runtime_env={"env_vars": job_env_vars(gcs_address, fast_reports=fast_reports)})
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot connect to the Ray cluster at {gcs_address}: {first_line(exc)}") from None
        return f"Ray cluster at {gcs_address}"
    missing = ray._private.utils.get_dashboard_dependency_error()
    if missing:
        log.warning("Ray's dashboard packages are missing (%s): install 'ray[default]'. Without the dashboard "
                    "there is no State API, and Ray Train's placement-group cleaner will log warnings.", missing)
    port = _free_port()
    gcs_address = f"127.0.0.1:{port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=not missing, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING, runtime_env={"env_vars": job_env_vars(gcs_address, fast_reports=fast_reports)})
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    return f"embedded local Ray ({gcs_address})"


def _print_summary(summary: dict[str, Any]) -> None:
    checks = summary.get("replica_checksums") or []
    same = "all equal" if checks and len(set(checks)) == 1 else "DIFFER" if checks else "n/a"
    loss = summary.get("final_loss")
    loss_text = f"{loss:.5f}" if isinstance(loss, float) and math.isfinite(loss) else str(loss)
    print(f"status {summary.get('status')}: {summary.get('message', '')}\n"
          f"  steps {summary.get('steps')}  epochs {summary.get('epochs')}  final loss {loss_text}  "
          f"samples/s {summary.get('samples_per_s', 0):,.0f}\n"
          f"  skipped steps {summary.get('skipped_steps')}  rollbacks {summary.get('rollbacks')}  "
          f"restarts {summary.get('restarts')}  replica checksums {same} ({len(checks)} ranks)")


def cmd_train(args: argparse.Namespace) -> int:
    from sdf_ray import launch

    cfg = launch.resolve_paths(_load(args))
    num_scenes = launch.check_dataset(cfg)
    directory, resuming = launch.prepare_run_dir(cfg, overwrite=args.overwrite)
    from sdf_ray.train_loop import steps_per_epoch

    total_steps = cfg.optim.num_epochs * steps_per_epoch(num_scenes, cfg.data.scenes_per_step)
    previous = launch.read_summary(cfg)
    if resuming and previous and previous.get("status") == "finished" and previous.get("steps", 0) >= total_steps:
        print(f"run {directory} already finished ({previous['steps']} steps); raise optim.num_epochs to train "
              f"further or pass --overwrite to start again")
        _print_summary(previous)
        return EXIT_OK
    where = connect_ray(args.address)
    launch.check_cluster_resources(cfg)
    import ray

    warning = launch.storage_warning(cfg, len([n for n in ray.nodes() if n.get("Alive")]))
    if warning:
        log.warning("warning: %s", warning)
    print(f"sdf-ray train: {cfg.scaling.num_workers} worker(s) on {where}; run directory {directory}"
          + (" (resuming)" if resuming else ""), flush=True)
    summary = launch.fit(cfg)
    _print_summary(summary)
    return {"finished": EXIT_OK, "diverged": EXIT_DIVERGED}.get(summary["status"], EXIT_FAILED)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdf-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train on a Ray cluster (embedded local Ray by default)")
    _add_config_args(p)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory of the same name")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check-config", help="validate a config (exit 2 with every problem listed)")
    _add_config_args(p, positional=True)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("print-config", help="print the resolved config as YAML")
    _add_config_args(p, positional=True)
    p.set_defaults(func=cmd_print_config)

    for module in ("sdf_ray.data.commands", "tuning.cli", "sdf_ray.bench"):
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[sdf-ray] %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except UserError as exc:
        print(f"sdf-ray: error: {exc}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("sdf-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
