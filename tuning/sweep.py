"""Run a Ray Tune sweep of Train V2 runs: one function trainable per trial, each fitting a ``TorchTrainer``.

The driver: the trial function, the Tuner (scheduler, stopper, reaper) and running or resuming the sweep.
Sizing it is ``tuning.planning``'s job; the sweep directory and the files written from the results are
``tuning.outputs``'s.

The trainable holds no resources of its own (the TorchTrainer's workers hold them): Tune gets a head bundle of
a little memory and no CPU (``planning.TRAINABLE_RESOURCES``), and ``max_concurrent_trials`` keeps the number
of in-flight Train runs to what the cluster can hold.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from sdf_ray import config as config_mod
from sdf_ray import launch
from sdf_ray.errors import ConfigError
from sdf_ray.fsutil import write_json_atomic, write_text_atomic
from tuning.outputs import SUMMARY_JSON, TRIALS_SUBDIR, plain, trial_run_name, tune_dir, write_outputs
from tuning.planning import TRAINABLE_RESOURCES, Plan, plan
from tuning.reaper import LeakedPlacementGroupReaper
from tuning.search import SearchSpec, tune_param_space
from tuning.stopper import DivergenceStopper

SWEEP_FILE = "sweep.yaml"


def _trial_dirname(trial: Any) -> str:
    return f"tune-{trial.trial_id}"


def trial_config(base: config_mod.TrainConfig, params: dict[str, Any], trial_id: str,
                 trials_dir: str) -> config_mod.TrainConfig:
    cfg = config_mod.apply_overrides(base, {k: plain(v) for k, v in params.items()})
    return config_mod.apply_overrides(cfg, {"checkpoint.run_name": trial_run_name(trial_id),
                                            "checkpoint.storage_path": trials_dir})


def train_driver_fn(config: dict[str, Any], base_config: dict[str, Any], trials_dir: str,
                    param_keys: list[str]) -> None:
    """The Tune function trainable: apply the sampled params and fit one Train V2 run, reporting through Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    params = {k: config[k] for k in param_keys if k in config}
    cfg = trial_config(config_mod.from_dict(base_config), params, trial_id, trials_dir)
    launch.prepare_run_dir(cfg, overwrite=False)  # a restored trial resumes from its Train checkpoints
    summary = launch.fit(cfg, callbacks=[TuneReportCallback()])
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
                              trials_dir=str(directory / TRIALS_SUBDIR), param_keys=spec.keys)
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
    if tune.Tuner.can_restore(str(directory)):
        _check_same_sweep(directory, record)
        log(f"sdf-ray tune: resuming the sweep in {directory}")
        tuner = tune.Tuner.restore(str(directory), trainable=_trainable(cfg, spec, directory),
                                   resume_unfinished=True, restart_errored=False)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / SWEEP_FILE, yaml.safe_dump(record, sort_keys=False))
        log(f"sdf-ray tune: {spec.num_trials()} trial(s), up to {sweep_plan.max_concurrent_trials} at once "
            f"({sweep_plan.cpus_per_trial:g} CPU(s) each); sweep directory {directory}")
        tuner = _make_tuner(cfg, spec, name, sweep_plan, stopper, directory)
    results = tuner.fit()
    summary = write_outputs(cfg, spec, name, directory, results, stopper.reasons, num_scenes)
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(directory / SUMMARY_JSON, summary)
    return summary
