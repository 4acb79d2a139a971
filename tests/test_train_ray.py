"""The production worker under TorchTrainer (2 CPU workers, gloo): NaN survived, escalation, recovery."""

from __future__ import annotations

import json
import math

import pytest

from sdf_ray.cli import main
from sdf_ray.config import packaged_config
from sdf_ray.errors import EXIT_DIVERGED
from sdf_ray.metrics_log import read_metrics

pytestmark = pytest.mark.ray

TINY = str(packaged_config("tiny"))


def train(tmp_path, dataset, name, *sets, extra=()):
    args = ["train", "--config", TINY, "--set", f"data.path={dataset}",
            "--set", f"checkpoint.storage_path={tmp_path}", "--set", f"checkpoint.run_name={name}"]
    for s in sets:
        args += ["--set", s]
    code = main(args + list(extra))
    summary_path = tmp_path / name / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return code, summary


def test_nan_on_one_rank_at_each_site_is_skipped_by_every_rank(ray_session, tiny_dataset, tmp_path):
    inject = "[{step: 1, rank: 1, site: loss}, {step: 3, rank: 0, site: grad, value: inf}, {step: 6, rank: 1, site: latent}]"
    code, summary = train(tmp_path, tiny_dataset, "nan", f"debug.inject={inject}", "logging.every_n_steps=1")
    assert code == 0
    assert summary["status"] == "finished" and summary["steps"] == 8
    assert summary["skipped_steps"] == 3 and summary["rollbacks"] == 0
    checksums = summary["replica_checksums"]
    assert len(checksums) == 2 and len(set(checksums)) == 1
    metrics = read_metrics(tmp_path / "nan")
    skipped_at = [m["train/step"] - 1 for m in metrics if m["guard/interval_skipped_steps"]]
    assert skipped_at == [1, 3, 6]
    # Skipped steps are never averaged in: an interval of only skipped steps reports inf, never NaN.
    assert all(m["train/loss"] < 1 for m in metrics if not m["guard/interval_skipped_steps"])
    assert all(m["train/loss"] == math.inf for m in metrics if m["guard/interval_skipped_steps"])
    assert (tmp_path / "nan" / "config.yaml").exists()
    # 8 reports, one per step: with Ray Train's default 2 s collection of reports (a queue of one per
    # worker), report() would hold the loop for ~14 s (0.6 s measured without); sdf-ray has the controller collect every 0.1 s.
    assert summary["elapsed_s"] < 10
    # What the worker ran with and where its time went (tests/test_startup.py checks the arithmetic).
    assert summary["precision"] == "fp32" and summary["compile"] is False and summary["device"] == "cpu"
    assert summary["compile_cache"]["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / ".compile-cache" / "inductor")
    assert summary["perf/startup_seconds"] >= summary["perf/first_step_seconds"] >= 0
    assert summary["perf/teardown_seconds"] >= 0 and summary["samples_trained"] == 8 * 4 * 64


def test_nan_every_step_escalates_to_rollback_then_diverged(ray_session, tiny_dataset, tmp_path):
    code, summary = train(tmp_path, tiny_dataset, "div", "debug.inject=[{step: 2, rank: 1, site: loss, value: inf, repeat: true}]",
                          "logging.every_n_steps=1",
                          "guard.max_consecutive_skips=2", "guard.max_rollbacks=1")
    assert code == EXIT_DIVERGED
    assert summary["status"] == "diverged"
    assert summary["rollbacks"] == 1
    assert "consecutive" in summary["message"]
    assert len(set(summary["replica_checksums"])) == 1
    metrics = read_metrics(tmp_path / "div")
    assert metrics[-1]["diverged"] == 1
    assert any(m["guard/rollbacks"] == 1 for m in metrics)


def test_a_crashed_worker_resumes_from_the_latest_checkpoint(ray_session, tiny_dataset, tmp_path):
    code, summary = train(tmp_path, tiny_dataset, "crash", "debug.crash={step: 5, rank: 1}",
                          "scaling.max_failures=1")
    assert code == 0
    assert summary["status"] == "finished"
    assert summary["steps"] == 8 and summary["restarts"] == 1
    assert len(set(summary["replica_checksums"])) == 1
    assert (tmp_path / "crash" / ".crash-injected").exists()
    metrics = read_metrics(tmp_path / "crash")
    assert metrics[-1]["train/step"] == 8 and metrics[-1]["restarts"] == 1
    # Ray commits checkpoints asynchronously, so the restart resumes from step 4's or an earlier one;
    # the replayed steps must reproduce the first attempt exactly (model, optimizer, data stream, RNG).
    first_loss: dict[int, float] = {}
    for m in metrics:
        assert first_loss.setdefault(m["train/step"], m["train/loss"]) == m["train/loss"]
    # Re-running the same command finds the finished run instead of training again.
    code, again = train(tmp_path, tiny_dataset, "crash", "debug.crash={step: 5, rank: 1}", "scaling.max_failures=1")
    assert code == 0 and again == summary


def test_resume_refuses_a_different_config_and_too_many_workers(ray_session, tiny_dataset, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("optim: {decoder_lr: 0.5}\n")
    code, _ = train(tmp_path, tiny_dataset, "run")
    assert code == 2
    assert "different config" in capsys.readouterr().err
    code, _ = train(tmp_path, tiny_dataset, "big", "scaling.num_workers=4")
    err = capsys.readouterr().err
    assert code == 2 and "needs 4 CPUs" in err and "the cluster has 1 node(s), 2 CPU(s)" in err


def test_validation_in_the_worker_group_reports_on_every_rank(ray_session, tiny_dataset, tmp_path):
    """2 workers with validation: the held-out scenes are sharded over the ranks and every rank reports the same
    number of times (Ray Train would hang otherwise); val/* arrive at the validation epochs, and the training
    trajectory is the one without validation."""
    from sdf_ray.data.synth import synth_dataset

    held_out = tmp_path / "held_out"
    synth_dataset(held_out, num_scenes=4, samples_per_scene=512, seed=9, surface_samples_per_scene=300)
    val = [f"validation.path={held_out}", "validation.every_n_epochs=2", "validation.num_scenes=3",
           "validation.num_iterations=3", "validation.samples_per_iteration=64", "validation.mesh_resolution=12",
           "validation.num_metric_points=200"]
    code, summary = train(tmp_path, tiny_dataset, "val", *val)
    assert code == 0 and summary["status"] == "finished"
    code, plain = train(tmp_path, tiny_dataset, "plain")
    assert code == 0 and plain["replica_checksums"] == summary["replica_checksums"]
    metrics = read_metrics(tmp_path / "val")
    validated = [m for m in metrics if "val/sdf_l1" in m]
    assert [m["train/epoch"] for m in validated] == [2.0, 4.0]
    assert all(m["val/skipped"] == 0 and math.isfinite(m["val/sdf_l1"]) and "val/chamfer_l2" in m
               for m in validated)
