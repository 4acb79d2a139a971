"""Config -> ``TorchTrainer``: scaling, storage, failure handling, checkpoint retention; driver-side checks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from sdf_ray.config import TrainConfig, to_dict, to_yaml, yaml_load
from sdf_ray.errors import ClusterError, ConfigError, DataError, UserError, first_line
from sdf_ray.fsutil import write_json_atomic, write_text_atomic
from sdf_ray.run_files import RESOLVED_CONFIG_FILE, SUMMARY_FILE, WORKER_GROUP_STARTS_FILE
from sdf_ray.startup import StartupClock

# Keys that may change when a stopped run is resumed (resources, cadences, debugging, length).
# Settings a resumed run may change. model.compile_cacheable changes how the step is compiled, not what it computes
# (the same values and gradients, bitwise: tests/test_dropout.py).
RESUMABLE_CHANGES = ("scaling.", "logging.", "debug.", "checkpoint.", "validation.", "optim.num_epochs",
                     "model.compile_cacheable")


DRIVER_IMPORTS = ("torch", "sdf_ray.train_loop")
"""What ``fit`` imports next in the driver, none of them importing Ray: loaded while Ray starts
(``connect_ray(..., import_meanwhile=DRIVER_IMPORTS)``)."""


# ---------------------------------------------------------------------------------------------
# Storage policy: `sdf-ray train`/`tune` here and cluster/preflight.py (before `ray job submit`) both ask it.

SHARED_MOUNTS = ("/mnt/",)
"""Where ray_cluster.yaml and the KubeRay manifests mount the volume every node shares (EFS, ReadWriteMany)."""

StorageKind = Literal["uri", "relative", "shared", "local"]


def storage_kind(path: str) -> StorageKind:
    """How a storage path behaves on a cluster.

    ``uri``: refused. sdf-ray needs a filesystem path: rank 0 writes metrics.jsonl, TensorBoard events and
    summary.json beside Ray's checkpoints, which an object-store URI cannot hold as files, and datasets are
    read as local files. ``relative``: resolved in each process's working directory (under ``ray job
    submit``, the job's node-local copy of the working dir). ``shared``: below a shared mount. ``local``:
    another absolute path, which a multi-node cluster may not share.
    """
    if "://" in path:
        return "uri"
    if not os.path.isabs(path):
        return "relative"
    return "shared" if path.startswith(SHARED_MOUNTS) else "local"


def check_storage_path(path: str) -> None:
    """``ConfigError`` for a ``checkpoint.storage_path`` that is a URI (see :func:`storage_kind`)."""
    if storage_kind(path) == "uri":
        raise ConfigError(f"`checkpoint.storage_path`: {path} is a URI; use a filesystem path (a shared NFS "
                          f"mount on multi-node clusters)")


def storage_warning(storage_path: str, num_nodes: int) -> str | None:
    """A warning when a multi-node cluster would write checkpoints to a path that may not be shared."""
    if num_nodes <= 1 or storage_kind(storage_path) == "shared":
        return None
    return (f"checkpoint.storage_path {storage_path} is a local path and the cluster has {num_nodes} nodes: unless "
            f"it is shared storage (NFS) mounted at the same path on every node, checkpoints will not be shared "
            f"and a restarted worker group cannot resume (set checkpoint.storage_path to a shared mount)")


# ---------------------------------------------------------------------------------------------
# Driver-side checks


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute local paths: Ray workers run in another working directory. A URI is refused."""
    check_storage_path(cfg.checkpoint.storage_path)
    data = dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).expanduser().resolve()))
    storage = str(Path(cfg.checkpoint.storage_path).expanduser().resolve())
    validation = cfg.validation
    if validation.path:
        validation = dataclasses.replace(validation, path=str(Path(validation.path).expanduser().resolve()))
    return dataclasses.replace(cfg, data=data, validation=validation,
                               checkpoint=dataclasses.replace(cfg.checkpoint, storage_path=storage))


def run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.checkpoint.storage_path) / cfg.checkpoint.run_name


COMPILE_CACHE_SUBDIR = ".compile-cache"


def compile_cache_dir(storage_path: str) -> str:
    """torch.compile's caches (inductor's and Triton's) for every run and sweep trial under ``storage_path``: the
    compiled artifacts of one run are reused by the next and by the trials of a sweep running beside it."""
    return str(Path(storage_path) / COMPILE_CACHE_SUBDIR)


def check_dataset(cfg: TrainConfig) -> int:
    """Driver-side dataset checks before any worker starts; returns the number of scenes."""
    from sdf_ray.data.format import read_manifest, validate_files

    if cfg.validation.path:
        held_out = read_manifest(cfg.validation.path)
        if held_out.num_scenes == 0:
            raise DataError(f"validation.path {cfg.validation.path}: the held-out dataset has no scenes")
        validate_files(cfg.validation.path)
    manifest = read_manifest(cfg.data.path)
    validate_files(cfg.data.path)
    if manifest.num_scenes < cfg.scaling.num_workers:
        raise DataError(f"dataset {cfg.data.path} has {manifest.num_scenes} scenes, fewer than "
                        f"scaling.num_workers={cfg.scaling.num_workers}: every worker needs at least one scene")
    return int(manifest.num_scenes)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES))


def prepare_run_dir(cfg: TrainConfig, overwrite: bool) -> tuple[Path, bool]:
    """Create or check the run directory; returns (run_dir, resuming).

    A run directory holding a different config is refused unless ``overwrite`` (which deletes it).
    """
    directory = run_dir(cfg)
    saved = directory / RESOLVED_CONFIG_FILE
    if directory.exists() and overwrite:
        shutil.rmtree(directory)
    resuming = saved.exists()
    if resuming:
        try:
            old = yaml_load(saved.read_text())
        except Exception:  # an unreadable config means we cannot prove it is the same run
            raise ConfigError(f"{saved} is unreadable; pass --overwrite to start the run afresh") from None
        diffs = config_differences(old, to_dict(cfg))
        if diffs:
            shown = ", ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")
            raise ConfigError(f"run directory {directory} holds a run with a different config ({shown}); "
                              f"pass --overwrite to replace it or choose another checkpoint.run_name")
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, to_yaml(cfg))
    return directory, resuming


def read_summary(cfg: TrainConfig) -> dict[str, Any] | None:
    path = run_dir(cfg) / SUMMARY_FILE
    if not path.exists():
        return None
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def num_alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_cluster_resources(cfg: TrainConfig) -> None:
    """Fail fast when the cluster can never provide the workers asked for (autoscaling clusters aside)."""
    import ray

    total = ray.cluster_resources()
    s = cfg.scaling
    cpus_needed = s.num_workers * s.cpus_per_worker
    have_cpus, have_gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    num_nodes = num_alive_nodes()
    exists = f"the cluster has {num_nodes} node(s), {have_cpus:g} CPU(s), {have_gpus:g} GPU(s)"
    gpus_needed = s.num_workers * s.gpus_per_worker
    if s.use_gpu and have_gpus + 1e-9 < gpus_needed:
        share = f" x gpus_per_worker={s.gpus_per_worker:g}" if s.gpus_per_worker != 1 else ""
        raise ClusterError(f"scaling.num_workers={s.num_workers}{share} with use_gpu needs {gpus_needed:g} GPU(s); "
                           f"{exists}")
    if cpus_needed > have_cpus:
        raise ClusterError(f"scaling.num_workers={s.num_workers} x cpus_per_worker={s.cpus_per_worker:g} needs "
                           f"{cpus_needed:g} CPUs; {exists}")
    if s.placement_strategy == "STRICT_SPREAD" and num_nodes < s.num_workers:
        raise ClusterError(f"placement_strategy STRICT_SPREAD needs {s.num_workers} nodes; {exists}")


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """Ray resources each worker holds: its CPUs and, with use_gpu, its share of a GPU."""
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}


def may_compile(cfg: TrainConfig) -> bool:
    """Whether the run's workers may compile: ``model.compile`` true, or auto on GPUs (resolved on the worker: a GPU
    too old for Triton does not)."""
    return cfg.model.compile is True or (cfg.model.compile == "auto" and cfg.scaling.use_gpu)


def prestart_processes(cfg: TrainConfig) -> dict[str, str] | None:
    """Right after an embedded Ray starts: its raylet starts Ray Train's controller and worker processes for ``cfg``
    ahead of need (``ray_session.prestart_train_processes``). Not for a run the cluster cannot hold (its one-line
    error comes next, from :func:`check_cluster_resources`)."""
    from sdf_ray.ray_session import prestart_train_processes, train_worker_runtime_env

    try:
        check_cluster_resources(cfg)
    except ClusterError:
        return None
    return prestart_train_processes(cfg.scaling.num_workers, train_worker_runtime_env(may_compile(cfg)))


def build_trainer(cfg: TrainConfig, *, callbacks: list[Any] | None = None, startup: StartupClock | None = None,
                  cache_dir: str | None = None) -> Any:
    """A ``TorchTrainer`` running ``sdf_ray.worker.train_fn_per_worker`` for ``cfg`` (paths resolved).

    ``startup``: the driver's start-up marks, continued by the workers; ``cache_dir``: torch.compile's cache
    (default: :func:`compile_cache_dir` of the run's storage path).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sdf_ray.ray_session import train_backend_config, train_worker_runtime_env
    from sdf_ray.worker import train_fn_per_worker

    s = cfg.scaling
    loop_config = {"train_config": to_dict(cfg), "run_dir": str(run_dir(cfg)),
                   "compile_cache_dir": cache_dir or compile_cache_dir(cfg.checkpoint.storage_path),
                   "startup": (startup or StartupClock()).to_dict()}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        torch_config=train_backend_config("nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=worker_resources(cfg),
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(  # type: ignore[call-arg]  # Train V2's RunConfig takes logging_config
            name=cfg.checkpoint.run_name,
            storage_path=cfg.checkpoint.storage_path,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=callbacks,
            worker_runtime_env=train_worker_runtime_env(may_compile(cfg)),
            # Ray Train's own INFO lines repeat every metrics dict; rank 0's progress lines say it better.
            logging_config=LoggingConfig(log_level="INFO" if cfg.logging.level == "DEBUG" else "WARNING"),
        ),
    )


def _find_user_error(exc: BaseException) -> UserError | None:
    """A UserError raised in a worker, wherever Ray wrapped it (causes, worker failure lists)."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        if isinstance(e, BaseException):
            stack += [e.__cause__, e.__context__]
        for attr in ("worker_failures", "failures", "errors"):
            value = getattr(e, attr, None)
            if isinstance(value, dict):
                stack += list(value.values())
            elif isinstance(value, (list, tuple)):
                stack += list(value)
    return None


def fit(cfg: TrainConfig, *, callbacks: list[Any] | None = None, startup: StartupClock | None = None,
        cache_dir: str | None = None) -> dict[str, Any]:
    """Run the trainer to completion; returns the run's summary (``status: failed`` if Ray gave up).

    ``startup``: the caller's clock (the command's, or a Tune trial's); ``fit()`` marks its start and end, and the
    summary carries every mark with the breakdown (``sdf_ray.startup``).
    """
    from ray.train import TrainingFailedError

    from sdf_ray.ray_session import wait_for_autoscaling_coordinator

    clock = startup or StartupClock()
    summary_path = run_dir(cfg) / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)
    (run_dir(cfg) / WORKER_GROUP_STARTS_FILE).unlink(missing_ok=True)  # restarts are counted per fit()
    trainer = build_trainer(cfg, callbacks=callbacks, startup=clock, cache_dir=cache_dir)
    wait_for_autoscaling_coordinator()  # after build_trainer's imports, which its start overlaps
    clock.mark("fit_start")
    try:
        trainer.fit()
    except TrainingFailedError as exc:
        user_error = _find_user_error(exc)
        if user_error is not None:  # e.g. a dataset that changed under a resumed run: exit 2, not a failure
            raise user_error from None
        cause = exc.__cause__ or exc
        first = first_line(cause)
        failed: dict[str, Any] = {"status": "failed", "message": f"training failed after "
                   f"scaling.max_failures={cfg.scaling.max_failures} restart(s): {first}",
                   "run_name": cfg.checkpoint.run_name}
        clock.mark("fit_end")
        failed = clock.complete(failed)
        write_json_atomic(summary_path, failed)
        return failed
    clock.mark("fit_end")
    summary = read_summary(cfg)
    if summary is None:  # workers ended without a summary: a bug, not a user error
        summary = {"status": "failed", "message": "workers exited without writing summary.json",
                   "run_name": cfg.checkpoint.run_name}
    summary = clock.complete(summary)
    summary.update(prestarted_processes(summary.get("startup_marks") or {}, restarts=int(summary.get("restarts") or 0)))
    write_json_atomic(summary_path, summary)
    return summary


def unused_prestart_warning(summary: dict[str, Any]) -> str | None:
    """A line when Ray Train's processes ran with runtime envs other than those prestarted for them
    (``startup_prestart_runtime_envs`` against ``startup_runtime_envs``): Ray could never use the prestarted ones,
    which idled beside the run (a Ray whose runtime envs no longer hash as ``ray_session`` computes them). A
    prestarted process passed over although it matched (``startup_prestarted``) is the raylet's choice: no line."""
    from sdf_ray.ray_session import PRESTART_ENV

    asked = summary.get("startup_prestart_runtime_envs") or {}
    ran = summary.get("startup_runtime_envs") or {}
    differ = [who for who, digest in asked.items() if who in ran and ran[who] != digest]
    if not differ:
        return None
    return (f"Ray Train's processes ({', '.join(differ)}) ran with runtime envs other than those prestarted for them, "
            f"which idled beside the run; {PRESTART_ENV}=0 turns prestarting off")


def prestarted_processes(marks: dict[str, float], *, restarts: int = 0) -> dict[str, Any]:
    """``startup_prestarted``: which of Ray Train's processes (controller, rank 0) were running before ``fit()``
    (``prestart_processes``), from the run's marks; absent when the marks do not say. After a restart of the worker
    group, rank 0's mark is its new process's: then only the controller is told."""
    if "fit_start" not in marks:
        return {}
    which = [("controller", "controller_process_started")] + ([("rank0", "worker_process_started")] if not restarts
                                                                else [])
    found = {who: marks[mark] < marks["fit_start"] for who, mark in which if mark in marks}
    return {"startup_prestarted": found} if found else {}
