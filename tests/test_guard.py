"""The guard's decisions with the single-process collectives, and with a fake rank k of n for remote votes."""

from __future__ import annotations

import math

import pytest
import torch

from sdf_ray.config import GuardConfig, InjectConfig
from sdf_ray.dist import FakeCollectives, LocalCollectives
from sdf_ray.guard import Escalation, GuardCounters, vote_and_clip
from sdf_ray.train_loop import train_step
from tests.helpers import assert_bit_identical, fake_batch, single_process_state, state_tensors, tiny_config

NUM_SCENES = 8


def make_state(**overrides):
    return single_process_state(NUM_SCENES, **overrides)


def test_clean_step_updates_every_parameter_group():
    cfg, state = make_state()
    before = state_tensors(state)
    verdict, loss, _ = train_step(state, *fake_batch(cfg, NUM_SCENES), reg_weight=1e-4)
    assert not verdict.bad
    assert math.isfinite(loss.item())
    after = state_tensors(state)
    assert not torch.equal(before["latents"], after["latents"])
    assert not torch.equal(before["layers.0.bias"], after["layers.0.bias"])
    assert after["layers.0.bias/step"].item() == before["layers.0.bias/step"].item() + 1


def test_a_code_per_scene_steps_like_a_code_per_sample():
    cfg, shared = make_state(**{"model.dropout": 0.0})
    _, per_sample = make_state(**{"model.dropout": 0.0})
    batch = fake_batch(cfg, NUM_SCENES)
    for _ in range(3):
        _, loss, _ = train_step(shared, *batch, reg_weight=1e-4)
        _, ref_loss, _ = train_step(per_sample, *batch, reg_weight=1e-4, code_per_sample=True)
        torch.testing.assert_close(loss, ref_loss)
    after, ref = state_tensors(shared), state_tensors(per_sample)
    assert after.keys() == ref.keys()
    for name in after:
        torch.testing.assert_close(after[name], ref[name], msg=name)


@pytest.mark.parametrize("site", ["loss", "grad", "latent"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_injected_non_finite_skips_step_bit_identically(site, value):
    cfg, state = make_state()
    train_step(state, *fake_batch(cfg, NUM_SCENES, seed=1), reg_weight=0.0)  # a real step first
    before = state_tensors(state)
    inj = InjectConfig(step=1, rank=0, site=site, value=value)
    verdict, _, _ = train_step(state, *fake_batch(cfg, NUM_SCENES, seed=2), reg_weight=0.0, injections=[inj])
    assert bool(verdict.bad)
    assert_bit_identical(before, state_tensors(state))
    counters = state.counters.read()
    assert counters["skipped_steps"] == 1 and counters["consecutive_skips"] == 1 and counters["steps"] == 2
    # and training carries on afterwards
    verdict, _, _ = train_step(state, *fake_batch(cfg, NUM_SCENES, seed=3), reg_weight=0.0)
    assert not verdict.bad
    assert state.counters.read()["consecutive_skips"] == 0


def test_skipped_first_step_is_bit_identical_too():
    cfg, state = make_state()
    before = state_tensors(state)
    inj = InjectConfig(step=0, rank=0, site="latent", value="nan")
    train_step(state, *fake_batch(cfg, NUM_SCENES), reg_weight=0.0, injections=[inj])
    assert_bit_identical(before, state_tensors(state))


def test_clipping_uses_global_norm_over_decoder_and_latents():
    cfg, state = make_state(**{"guard.grad_clip": 1e-3})
    verdict, _, _ = train_step(state, *fake_batch(cfg, NUM_SCENES), reg_weight=0.0)
    norm = verdict.grad_norm.item()
    assert norm > 1e-3
    grads = [p.grad for p in state.decoder_module.parameters()] + [state.latents.codes.grad]
    clipped = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
    assert clipped == pytest.approx(1e-3, rel=1e-4)
    assert state.counters.read()["clipped_steps"] == 1


def test_grad_clip_zero_disables_clipping():
    cfg, state = make_state(**{"guard.grad_clip": 0.0})
    verdict, _, _ = train_step(state, *fake_batch(cfg, NUM_SCENES), reg_weight=0.0)
    grads = [p.grad for p in state.decoder_module.parameters()] + [state.latents.codes.grad]
    total = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
    assert total == pytest.approx(verdict.grad_norm.item(), rel=1e-5)


def test_a_remote_ranks_vote_skips_a_locally_clean_step():
    ok = torch.zeros((), dtype=torch.bool)
    # rank 0 of 2, where rank 1 saw a NaN: [latent_sq, vote] = a finite (zero) latent share and a bad flag
    rank1_votes_bad = FakeCollectives(rank=0, world_size=2, peers={1: [torch.tensor([0.0, 1.0])]})
    verdict = vote_and_clip([torch.ones(3)], [torch.ones(2)], ok, rank1_votes_bad, 1.0)
    assert bool(verdict.bad)
    decoder, latent = [torch.ones(3)], [torch.ones(2)]
    verdict = vote_and_clip(decoder, latent, ok, LocalCollectives(), 1.0)
    assert not bool(verdict.bad)
    assert verdict.grad_norm.item() == pytest.approx(math.sqrt(5))
    assert decoder[0][0].item() == pytest.approx(1 / math.sqrt(5), rel=1e-5)  # clipped to norm 1


def test_rank_1_of_2_skips_on_rank_0s_non_finite_latent_norm():
    """A NaN in rank 0's latent gradients reaches rank 1 only through the summed norm: rank 1 must skip too."""
    ok = torch.zeros((), dtype=torch.bool)
    coll = FakeCollectives(rank=1, world_size=2, peers={0: [torch.tensor([math.nan, 0.0])]})
    decoder, latent = [torch.ones(3)], [torch.ones(2)]
    verdict = vote_and_clip(decoder, latent, ok, coll, 0.0)
    assert bool(verdict.bad) and math.isnan(verdict.grad_norm.item())
    assert coll.num_all_reduces == 1  # one collective carries both the norm and the vote


def test_every_ranks_latent_share_counts_in_the_global_norm():
    ok = torch.zeros((), dtype=torch.bool)
    # both ranks hold the same clean gradients (the fake's default): 3 (decoder, once) + 2 x 2 (latents)
    verdict = vote_and_clip([torch.ones(3)], [torch.ones(2)], ok, FakeCollectives(rank=1, world_size=2), 0.0)
    assert not bool(verdict.bad)
    assert verdict.grad_norm.item() == pytest.approx(math.sqrt(7))


def test_train_step_makes_no_host_sync(monkeypatch):
    cfg, state = make_state()
    batch = fake_batch(cfg, NUM_SCENES)
    train_step(state, *batch, reg_weight=0.0)  # warm-up outside the check

    def forbidden(*_a, **_k):
        raise AssertionError("host sync in the training step")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "is_nonzero", forbidden)
    inj = InjectConfig(step=0, rank=0, site="grad", value="nan")
    train_step(state, *batch, reg_weight=1e-4, injections=[inj])
    train_step(state, *batch, reg_weight=1e-4)


def test_resetting_the_streak_keeps_the_totals():
    from sdf_ray.guard import StepVerdict

    counters = GuardCounters(torch.device("cpu"))
    for _ in range(3):
        counters.update_(StepVerdict(bad=torch.tensor(True), grad_norm=torch.tensor(0.5)), grad_clip=1.0)
    counters.reset_consecutive_()
    assert counters.read() == {"skipped_steps": 3, "consecutive_skips": 0, "steps": 3, "clipped_steps": 0,
                               "longest_skip_streak": 3}


def test_counters_track_consecutive_and_total_skips():
    counters = GuardCounters(torch.device("cpu"))
    from sdf_ray.guard import StepVerdict

    for bad in [1, 1, 0, 1, 1, 1]:
        counters.update_(StepVerdict(bad=torch.tensor(bool(bad)), grad_norm=torch.tensor(0.5)), grad_clip=1.0)
    assert counters.read() == {"skipped_steps": 5, "consecutive_skips": 3, "steps": 6, "clipped_steps": 0,
                               "longest_skip_streak": 3}


def test_a_skip_streak_ending_between_two_reads_is_still_seen():
    from sdf_ray.guard import StepVerdict

    counters = GuardCounters(torch.device("cpu"))
    for bad in [1, 1, 1, 1, 0, 0]:  # a streak of 4 that is over before the host looks
        counters.update_(StepVerdict(bad=torch.tensor(bool(bad)), grad_norm=torch.tensor(0.5)), grad_clip=1.0)
    read = counters.read()
    assert read["consecutive_skips"] == 0 and read["longest_skip_streak"] == 4
    counters.start_interval_()
    counters.update_(StepVerdict(bad=torch.tensor(False), grad_norm=torch.tensor(0.5)), grad_clip=1.0)
    assert counters.read()["longest_skip_streak"] == 0


def test_escalation_rolls_back_then_declares_divergence():
    esc = Escalation(GuardConfig(max_consecutive_skips=3, max_rollbacks=2, skip_window_steps=100))
    assert esc.observe(10, skipped_total=1, consecutive=1) == "continue"
    assert esc.observe(20, skipped_total=4, consecutive=3) == "rollback"
    assert esc.observe(30, skipped_total=8, consecutive=3) == "rollback"
    assert esc.observe(40, skipped_total=12, consecutive=4) == "diverged"
    assert "consecutive" in esc.reason


def test_escalation_on_skip_fraction_over_window():
    esc = Escalation(GuardConfig(max_consecutive_skips=1000, max_skip_fraction=0.25, skip_window_steps=20,
                                 max_rollbacks=0))
    assert esc.observe(10, 3, 0) == "continue"  # window not yet full: no fraction is judged
    assert esc.observe(20, 5, 0) == "continue"  # 5 of the first 20 steps = 25 %: at the limit, not past it
    assert esc.observe(30, 9, 0) == "diverged"  # 6 of the last 20 (steps 10-30) = 30 %
    assert "30%" in esc.reason


def test_injections_fire_on_their_step_and_rank_and_repeat_when_asked():
    from sdf_ray.train_loop import injections_at

    cfg = tiny_config(**{"debug.inject": [{"step": 2, "rank": 1, "site": "loss", "repeat": True},
                                          {"step": 0, "rank": 0, "site": "grad"}]})
    fired = {(s, r): len(injections_at(cfg, s, r)) for s in range(6) for r in range(2)}
    assert [s for (s, r), n in fired.items() if n and r == 1] == [2, 3, 4, 5]
    assert [s for (s, r), n in fired.items() if n and r == 0] == [0]
