"""Validation during training (1 process and fake ranks, no Ray): reports at the right steps, never changes
the training trajectory, survives a non-finite decoder, and votes so that no rank is left waiting."""

from __future__ import annotations

import math

import pytest
import torch

from sdf_ray.dist import FakeCollectives, LocalCollectives
from sdf_ray.metrics_log import REPORTED_METRICS, VALIDATION_METRICS
from sdf_ray.run_schedule import RunSchedule
from sdf_ray.train_loop import run_training
from sdf_ray.validation import Validator
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory):
    from sdf_ray.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("data") / "held_out"
    synth_dataset(out, num_scenes=4, samples_per_scene=512, seed=123)
    return out


def _train(tiny_dataset, tmp_path, **overrides):
    cfg = tiny_config(**{"scaling.num_workers": 1, "data.path": str(tiny_dataset), "optim.num_epochs": 4,
                         "checkpoint.every_n_epochs": 2, **overrides})
    reports: list[dict] = []
    result = run_training(cfg, LocalCollectives(), torch.device("cpu"),
                          lambda metrics, snapshot: reports.append(metrics), tmp_path)
    return cfg, result, reports


def test_validation_reports_at_its_epochs_and_leaves_training_bit_identical(tiny_dataset, held_out, tmp_path):
    _, plain, plain_reports = _train(tiny_dataset, tmp_path / "plain")
    cfg, validated, reports = _train(tiny_dataset, tmp_path / "val", **{
        "validation.path": str(held_out), "validation.every_n_epochs": 3, "validation.num_scenes": 2,
        "validation.num_iterations": 5, "validation.samples_per_iteration": 64})
    # The same trajectory: same checksums, same losses at every shared report.
    assert validated.replica_checksums == plain.replica_checksums
    assert validated.final_loss == plain.final_loss
    plain_by_step = {m["train/step"]: m["train/loss"] for m in plain_reports}
    assert all(plain_by_step[m["train/step"]] == m["train/loss"] for m in reports if m["train/step"] in plain_by_step)
    # Validation at epoch 3 and at the end (epoch 4), in reports that carry every training metric too.
    schedule = RunSchedule.of(cfg, 8)
    val_steps = [m["train/step"] for m in reports if "val/sdf_l1" in m]
    assert val_steps == [3 * schedule.steps_per_epoch, 4 * schedule.steps_per_epoch]
    for m in reports:
        expected = set(REPORTED_METRICS) | (set(VALIDATION_METRICS) - {"val/chamfer_l2"} if "val/sdf_l1" in m
                                            else set())
        assert set(m) == expected
    assert all(0 < m["val/sdf_l1"] < 1 and m["val/skipped"] == 0 for m in reports if "val/sdf_l1" in m)
    # The validation pass does not count as training time.
    assert len(reports) == len(plain_reports)


def test_two_ranks_sharing_the_held_out_scenes_report_what_one_rank_does(tiny_dataset, held_out):
    """Rank 1 of 2 reconstructs its half and adds rank 0's sums (played by FakeCollectives): the voted
    val/sdf_l1 equals the one-rank pass over all scenes (the codes are independent, so sharding is exact)."""
    from sdf_ray.train_state import build_state
    from sdf_ray.validation import _SUMS

    cfg = tiny_config(**{"scaling.num_workers": 1, "data.path": str(tiny_dataset),
                         "validation.path": str(held_out), "validation.num_scenes": 4,
                         "validation.num_iterations": 4, "validation.samples_per_iteration": 32})
    decoder = build_state(cfg, LocalCollectives(), torch.device("cpu"), 8).decoder_module
    whole = Validator(cfg, LocalCollectives(), torch.device("cpu")).run(decoder, cfg.model.latent_size)

    rank0 = Validator(cfg, FakeCollectives(rank=0, world_size=2), torch.device("cpu"))
    local0 = dict.fromkeys(_SUMS, 0.0)
    rank0._reconstruct(decoder, cfg.model.latent_size, local0)
    rank0_sums = torch.tensor([local0[k] for k in _SUMS], dtype=torch.float64)
    rank1 = Validator(cfg, FakeCollectives(rank=1, world_size=2, peers={0: [rank0_sums]}), torch.device("cpu"))
    assert rank0.bank.scene_ids != rank1.bank.scene_ids and rank1.bank.num_shapes == 2
    voted = rank1.run(decoder, cfg.model.latent_size)
    assert voted["val/sdf_l1"] == pytest.approx(whole["val/sdf_l1"], rel=1e-6)


def test_a_non_finite_decoder_skips_validation_on_every_rank(tiny_dataset, held_out):
    from sdf_ray.train_state import build_state

    cfg = tiny_config(**{"scaling.num_workers": 1, "data.path": str(tiny_dataset),
                         "validation.path": str(held_out), "validation.num_scenes": 2,
                         "validation.num_iterations": 2, "validation.samples_per_iteration": 16})
    state = build_state(cfg, LocalCollectives(), torch.device("cpu"), 8)
    with torch.no_grad():
        next(state.decoder_module.parameters()).view(-1)[0] = math.nan
    coll = LocalCollectives()
    metrics = Validator(cfg, coll, torch.device("cpu")).run(state.decoder_module, cfg.model.latent_size)
    assert metrics["val/skipped"] == 1 and metrics["val/sdf_l1"] == math.inf

    # A healthy rank whose peer voted "bad" skips too, after exactly one all-reduce.
    with torch.no_grad():
        next(state.decoder_module.parameters()).view(-1)[0] = 0.0
    peer_bad = torch.zeros(7, dtype=torch.float64)
    peer_bad[-1] = 1.0
    fake = FakeCollectives(rank=0, world_size=2, peers={1: [peer_bad]})
    metrics = Validator(cfg, fake, torch.device("cpu")).run(state.decoder_module, cfg.model.latent_size)
    assert metrics["val/skipped"] == 1 and fake.num_all_reduces == 1
    # The decoder is back in training mode with gradients on.
    assert state.decoder_module.training and all(p.requires_grad for p in state.decoder_module.parameters())


def test_validation_with_meshes_reports_chamfer_against_ground_truth(tiny_dataset, held_out, tmp_path):
    from sdf_ray.data.format import read_manifest

    if not getattr(read_manifest(held_out).scenes[0], "num_surface", 0):
        pytest.skip("dataset without ground truth")
    _, _, reports = _train(tiny_dataset, tmp_path, **{
        "validation.path": str(held_out), "validation.every_n_epochs": 4, "validation.num_scenes": 1,
        "validation.num_iterations": 3, "validation.samples_per_iteration": 64, "validation.mesh_resolution": 16,
        "validation.num_metric_points": 500})
    validated = [m for m in reports if "val/sdf_l1" in m]
    assert len(validated) == 1
    # An untrained tiny decoder may produce no surface: then chamfer is inf, never NaN, never missing.
    assert "val/chamfer_l2" in validated[0] and not math.isnan(validated[0]["val/chamfer_l2"])
