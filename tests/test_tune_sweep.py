"""A real CPU sweep on an embedded Ray: diverging trials are pruned at once, the best config trains as is."""

from __future__ import annotations

import csv
import json
import time

import pytest

from sdf_ray import config as C
from sdf_ray.cli import main
from tests.helpers import forget_torch_default_cache_dirs
from tuning import search

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAME = "tiny-sweep"


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    from sdf_ray.ray_session import connect_ray

    started_here = not ray.is_initialized()
    if started_here:
        forget_torch_default_cache_dirs()
    connect_ray(None, fast_reports=False)  # as `sdf-ray tune` does
    yield ray
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from sdf_ray.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("data") / "tiny"
    synth_dataset(out, num_scenes=8, samples_per_scene=512, seed=0)
    return out


def tune_args(dataset, storage, *extra):
    sets = {
        "data.path": str(dataset), "checkpoint.storage_path": str(storage), "scaling.num_workers": 1,
        "optim.num_epochs": 10,        # 2 steps per epoch: 20 steps, a report every 2 (10 reports)
    }
    args = ["tune", "--config", str(C.packaged_config("tiny")), "--search", str(search.packaged_search("tiny")),
            "--name", NAME]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


def test_sweep_prunes_diverging_trials_and_writes_a_best_config_that_trains(ray_session, dataset, tmp_path,
                                                                              capsys):
    storage = tmp_path / "runs"
    started = time.perf_counter()
    assert main(tune_args(dataset, storage)) == 0
    sweep_s = time.perf_counter() - started
    out = capsys.readouterr().out
    print(out[-3000:])
    print(f"sweep took {sweep_s:.1f} s")

    directory = storage / NAME
    with open(directory / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    diverging = [r for r in rows if "repeat" in r["debug.inject"]]
    healthy = [r for r in rows if r["debug.inject"] == "[]"]
    assert len(diverging) == len(healthy) == 2
    for row in diverging:
        assert row["status"] == "pruned_diverged", row
        assert int(row["iterations"]) <= 2, row  # the first interval with injected steps is the last report
        assert row["reason"]
    for row in healthy:
        assert row["status"] in ("finished", "pruned_asha"), row
        assert float(row["best_train/loss"]) > 0
    assert any(r["status"] == "finished" for r in healthy)
    assert "best trial" in out and "pruned_diverged" in out

    summary = json.loads((directory / "tune_summary.json").read_text())
    assert summary["num_trials"] == 4 and summary["status_counts"]["pruned_diverged"] == 2
    assert summary["best_trial_id"] in {r["trial_id"] for r in healthy}
    assert summary["best_params"]["debug.inject"] == []

    # Throughput and start-up of the trials; every trial compiles into the one cache under the storage path.
    assert summary["samples_trained"] > 0 and summary["samples_per_s"] > 0
    assert summary["trial_startup_seconds_mean"] > 0
    finished = [json.loads(p.read_text()) for p in (directory / "trials").glob("*/summary.json")]
    assert finished and all(s["startup_origin"] == "trial" for s in finished)
    assert {s["compile_cache"]["TORCHINDUCTOR_CACHE_DIR"] for s in finished} == {
        str(storage / ".compile-cache" / "inductor")}

    best_path = directory / "best_config.yaml"
    best = C.load(best_path)
    assert best.checkpoint.run_name == f"{NAME}-best" and best.debug == C.DebugConfig()
    assert best.optim.decoder_lr == summary["best_params"]["optim.decoder_lr"]

    # Re-running the same command finds the finished sweep and rewrites the same outcome without training.
    started = time.perf_counter()
    assert main(tune_args(dataset, storage)) == 0
    assert json.loads((directory / "tune_summary.json").read_text())["best_trial_id"] == summary["best_trial_id"]
    assert "resuming" in capsys.readouterr().out
    assert time.perf_counter() - started < 30

    # The best config trains as is (same Ray session: connect_ray returns early).
    assert main(["train", "--config", str(best_path)]) == 0
    finished = json.loads((storage / f"{NAME}-best" / "summary.json").read_text())
    assert finished["status"] == "finished" and finished["steps"] == 20


def test_resuming_a_different_sweep_is_refused(ray_session, dataset, tmp_path, capsys):
    storage = tmp_path / "runs"
    directory = storage / NAME
    directory.mkdir(parents=True)
    # A sweep whose experiment state exists but whose config differs: fake the record, keep Tune's state.
    (directory / "sweep.yaml").write_text("config: {}\nsearch: {}\n")
    (directory / "tuner.pkl").write_bytes(b"")
    code = main(tune_args(dataset, storage))
    err = capsys.readouterr().err
    assert code == 2 and "different config and search" in err and "--overwrite" in err


def test_reaper_removes_empty_worker_groups_and_spares_busy_ones_and_trial_bundles(ray_session):
    """A leaked worker group (CREATED, empty) goes on the second sighting; an occupied one and a Tune
    trial's own (memory-only) bundle stay."""
    ray = ray_session
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tuning.planning import TRAINABLE_RESOURCES
    from tuning.reaper import LeakedPlacementGroupReaper

    @ray.remote(num_cpus=0.01)
    class Worker:
        def ping(self) -> int:
            return 1

    leaked = placement_group([{"CPU": 0.01}])
    busy = placement_group([{"CPU": 0.01}])
    trial = placement_group([dict(TRAINABLE_RESOURCES)])
    ray.get([leaked.ready(), busy.ready(), trial.ready()])
    worker = Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(busy)).remote()
    assert ray.get(worker.ping.remote()) == 1
    now = [0.0]
    reaper = LeakedPlacementGroupReaper(TRAINABLE_RESOURCES, interval_s=10, clock=lambda: now[0])
    try:
        assert reaper.reap() == []  # first sighting: a group may be between creation and its actors
        now[0] = 5.0
        reaper.on_step(0, [])  # too soon for another pass
        assert reaper.removed == []
        now[0] = 11.0
        reaper.on_step(1, [])
        assert leaked.id.hex() in reaper.removed
        assert busy.id.hex() not in reaper.removed and trial.id.hex() not in reaper.removed
        assert placement_group_table(leaked)["state"] == "REMOVED"
        assert placement_group_table(busy)["state"] == placement_group_table(trial)["state"] == "CREATED"
    finally:
        ray.kill(worker)
        for pg in (busy, trial):
            remove_placement_group(pg)


def test_a_sweep_ranks_trials_by_held_out_shapes(ray_session, dataset, tmp_path, capsys):
    """metric: val/sdf_l1 end to end: reports without it are accepted, ASHA and the outputs use the validation
    values, and the best trial is the one with the lowest held-out error, not the lowest training loss."""
    from sdf_ray.data.synth import synth_dataset

    held_out = tmp_path / "held_out"
    synth_dataset(held_out, num_scenes=2, samples_per_scene=512, seed=5, surface_samples_per_scene=0)
    search_file = tmp_path / "val.yaml"
    search_file.write_text("space:\n  optim.decoder_lr: {grid: [1.0e-3, 3.0e-3]}\nmetric: val/sdf_l1\n"
                           "scheduler: {type: asha, grace_period: 2, reduction_factor: 2}\n")
    storage = tmp_path / "runs"
    args = ["tune", "--config", str(C.packaged_config("tiny")), "--search", str(search_file), "--name", "val-sweep"]
    for key, value in {"data.path": dataset, "checkpoint.storage_path": storage, "scaling.num_workers": 1,
                       "optim.num_epochs": 4, "validation.path": held_out, "validation.every_n_epochs": 2,
                       "validation.num_scenes": 2, "validation.num_iterations": 3,
                       "validation.samples_per_iteration": 64}.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    with open(storage / "val-sweep" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    # ASHA may stop the worse trial at its first validated rung (grace_period 2 reports): it did, on its metric.
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"finished", "pruned_asha"}
    assert any(r["status"] == "finished" for r in rows)
    values = {r["trial_id"]: float(r["last_val/sdf_l1"]) for r in rows}
    assert all(0 < v < 1 for v in values.values())
    summary = json.loads((storage / "val-sweep" / "tune_summary.json").read_text())
    assert summary["metric"] == "val/sdf_l1" and summary["best_trial_id"] == min(values, key=values.__getitem__)
