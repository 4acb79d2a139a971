"""Run a Ray Tune sweep of Train V2 runs: one function trainable per trial, each fitting a ``TorchTrainer``.

The driver: the trial function, the Tuner (scheduler, stopper, reaper) and running or resuming the sweep.
Sizing it is ``tuning.planning``'s job; the sweep directory and the files written from the results are
``tuning.outputs``'s.

The trainable holds no resources of its own (the TorchTrainer's workers hold them): Tune gets a head bundle of
a little memory and no CPU (``planning.TRAINABLE_RESOURCES``), and ``max_concurrent_trials`` keeps the number
of in-flight Train runs to what the cluster can hold; with ``scaling.gpus_per_worker`` below 1, several trials
share a GPU.

What the trials share rather than repeat: torch.compile's caches (``<checkpoint.storage_path>/.compile-cache``,
the same directory plain runs use: the first trial compiles, the others load its kernels), Ray itself and
Ray Train's autoscaling coordinator. What each trial still pays: its own processes (trial actor, Train
controller, workers: imports, CUDA context), reading its dataset (the same files for every trial, served from the
OS page cache after the first) and tracing the model for compilation. Each trial's ``summary.json`` has its
start-up breakdown from the trial's start (``sdf_ray.startup``); ``tune_summary.json`` adds the sweep's
throughput (all trials' samples over its wall time) and the trials' mean start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from sdf_ray import config as config_mod
from sdf_ray import launch
from sdf_ray.errors import ConfigError
from sdf_ray.fsutil import write_json_atomic, write_text_atomic
from sdf_ray.run_files import SUMMARY_FILE, SWEEP_FILE, SWEEP_SUMMARY_FILE, TRIALS_SUBDIR
from sdf_ray.startup import STARTUP_KEY, TEARDOWN_KEY, StartupClock
from tuning.outputs import plain, trial_run_name, tune_dir, write_outputs
from tuning.planning import TRAINABLE_RESOURCES, Plan, plan
from tuning.reaper import LeakedPlacementGroupReaper
from tuning.search import SearchSpec, tune_param_space
from tuning.stopper import DivergenceStopper


def _trial_dirname(trial: Any) -> str:
    return f"tune-{trial.trial_id}"


def trial_config(base: config_mod.TrainConfig, params: dict[str, Any], trial_id: str,
                 trials_dir: str) -> config_mod.TrainConfig:
    cfg = config_mod.apply_overrides(base, {k: plain(v) for k, v in params.items()})
    return config_mod.apply_overrides(cfg, {"checkpoint.run_name": trial_run_name(trial_id),
                                            "checkpoint.storage_path": trials_dir})


def train_driver_fn(config: dict[str, Any], base_config: dict[str, Any], trials_dir: str,
                    param_keys: list[str], compile_cache_dir: str | None = None) -> None:
    """The Tune function trainable: apply the sampled params and fit one Train V2 run, reporting through Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    clock = StartupClock(origin=time.time(), origin_kind="trial")
    trial_id = tune.get_context().get_trial_id()
    params = {k: config[k] for k in param_keys if k in config}
    cfg = trial_config(config_mod.from_dict(base_config), params, trial_id, trials_dir)
    launch.prepare_run_dir(cfg, overwrite=False)  # a restored trial resumes from its Train checkpoints
    clock.mark("config_checked")
    clock.mark("ray_connected")  # the trial runs inside the sweep's Ray
    summary = launch.fit(cfg, callbacks=[TuneReportCallback()], startup=clock, cache_dir=compile_cache_dir)
    if summary.get("status") == "failed":
        raise RuntimeError(summary.get("message", "training failed"))


def _sweep_record(cfg: config_mod.TrainConfig, spec: SearchSpec) -> dict[str, Any]:
    return {"config": config_mod.to_dict(cfg), "search": spec.to_dict()}


def _check_same_sweep(directory: Path, record: dict[str, Any]) -> None:
    saved = directory / SWEEP_FILE
    if not saved.exists():
        return
    try:
        old = config_mod.yaml_load(saved.read_text())
    except Exception:  # an unreadable record means we cannot prove it is the same sweep
        raise ConfigError(f"{saved} is unreadable; pass --overwrite to start the sweep afresh") from None
    if old != record:
        differ = [k for k in ("config", "search") if old.get(k) != record.get(k)]
        raise ConfigError(f"{directory} holds a sweep with a different {' and '.join(differ)}; pass --overwrite to "
                          f"replace it or choose another --name")


def _make_tuner(cfg: config_mod.TrainConfig, spec: SearchSpec, name: str, sweep_plan: Plan,
                stopper: DivergenceStopper, directory: Path) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = _trainable(cfg, spec, directory)
    if spec.needs_validation:
        # val/* come only with validation passes; Tune's controller otherwise rejects every other report for
        # lacking the metric. ASHA skips reports without it and records a rung at the next one that has it
        # (AsyncHyperBandScheduler.on_trial_result), so its decisions use fresh held-out values only.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    scheduler: Any
    if spec.scheduler.type == "asha":
        assert sweep_plan.max_t is not None
        scheduler = ASHAScheduler(time_attr=spec.scheduler.time_attr, max_t=sweep_plan.max_t,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if spec.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
    return tune.Tuner(
        trainable,
        param_space=tune_param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples, scheduler=scheduler,
            search_alg=search_alg, max_concurrent_trials=sweep_plan.max_concurrent_trials,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=str(directory.parent), stop=stopper,
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1,
                                  callbacks=[LeakedPlacementGroupReaper(TRAINABLE_RESOURCES)]),
    )


def _trainable(cfg: config_mod.TrainConfig, spec: SearchSpec, directory: Path) -> Any:
    from ray import tune

    fn = tune.with_parameters(train_driver_fn, base_config=config_mod.to_dict(cfg),
                              trials_dir=str(directory / TRIALS_SUBDIR), param_keys=spec.keys,
                              compile_cache_dir=launch.compile_cache_dir(cfg.checkpoint.storage_path))
    return tune.with_resources(fn, dict(TRAINABLE_RESOURCES))


def run(cfg: config_mod.TrainConfig, spec: SearchSpec, name: str, *, num_scenes: int, overwrite: bool = False,
        log: Any = print) -> dict[str, Any]:
    """Run (or resume) the sweep; write trials.csv, best_config.yaml and tune_summary.json; return the summary.

    ``cfg`` has its paths resolved (``launch.resolve_paths``); Ray is connected.
    """
    from ray import tune

    launch.check_storage_path(cfg.checkpoint.storage_path)
    directory = tune_dir(cfg, name)
    sweep_plan = plan(cfg, spec, num_scenes)
    record = _sweep_record(cfg, spec)
    if overwrite and directory.exists():
        shutil.rmtree(directory)
    stopper = DivergenceStopper(spec.divergence, spec.collapse)
    started = time.perf_counter()
    resuming = tune.Tuner.can_restore(str(directory))
    if resuming:
        _check_same_sweep(directory, record)
        log(f"sdf-ray tune: resuming the sweep in {directory}")
        tuner = tune.Tuner.restore(str(directory), trainable=_trainable(cfg, spec, directory),
                                   resume_unfinished=True, restart_errored=False)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / SWEEP_FILE, yaml.safe_dump(record, sort_keys=False))
        log(f"sdf-ray tune: {spec.num_trials()} trial(s), up to {sweep_plan.max_concurrent_trials} at once "
            f"({sweep_plan.describe()}); sweep directory {directory}")
        tuner = _make_tuner(cfg, spec, name, sweep_plan, stopper, directory)
    results = tuner.fit()
    summary = write_outputs(cfg, spec, name, directory, results, stopper.reasons, num_scenes)
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    summary.update(throughput(directory / TRIALS_SUBDIR, None if resuming else summary["elapsed_s"]))
    write_json_atomic(directory / SWEEP_SUMMARY_FILE, summary)
    return summary


def throughput(trials_dir: Path, elapsed_s: float | None) -> dict[str, Any]:
    """The sweep's samples/s (the samples of every trial that wrote a summary.json, i.e. ran to its end, over the
    sweep's wall time; None for a resumed sweep, whose wall time does not cover its trials) and the trials' mean
    start-up and teardown."""
    summaries = []
    for path in sorted(trials_dir.glob(f"*/{SUMMARY_FILE}")):
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    samples = sum(int(s.get("samples_trained", 0)) for s in summaries)

    def mean(key: str) -> float | None:
        values = [float(s[key]) for s in summaries if isinstance(s.get(key), (int, float))]
        return round(sum(values) / len(values), 2) if values else None

    return {"samples_trained": samples, "samples_per_s": round(samples / elapsed_s, 1) if elapsed_s else None,
            "trial_startup_seconds_mean": mean(STARTUP_KEY), "trial_teardown_seconds_mean": mean(TEARDOWN_KEY)}
