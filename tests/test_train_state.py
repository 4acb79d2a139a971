"""The training state on one process: its schedule, the checkpoint round trip, the fake collectives, the
progress line (no Ray)."""

from __future__ import annotations

import pytest
import torch

from sdf_ray import checkpoint as ckpt
from sdf_ray.device_settings import CACHEABLE_BELOW_SAMPLES
from sdf_ray.dist import FakeCollectives
from sdf_ray.metrics_log import IntervalClock, collect_metrics, progress_line
from sdf_ray.run_schedule import RunSchedule
from sdf_ray.train_loop import train_step
from tests.helpers import assert_bit_identical, fake_batch, single_process_state, state_tensors

NUM_SCENES = 8


def make_state(**overrides):
    return single_process_state(NUM_SCENES, **overrides)


def test_the_state_asks_the_run_schedule_for_its_step_counts():
    cfg, state = make_state()
    assert state.schedule == RunSchedule.of(cfg, NUM_SCENES)
    assert state.steps_per_epoch == state.schedule.steps_per_epoch
    assert state.total_steps == cfg.optim.num_epochs * state.steps_per_epoch


@pytest.mark.parametrize("setting, epochs, cacheable", [
    ("auto", 2, True),                # a short run: the graph a warm cache stores
    ("auto", 10**9, False),           # past the break-even (4e9 samples): the faster step
    (True, 10**9, True), (False, 2, False),  # explicit settings win
])
def test_the_state_resolves_the_cacheable_graph_from_the_samples_the_run_trains(setting, epochs, cacheable):
    cfg, state = make_state(**{"model.compile_cacheable": setting, "optim.num_epochs": epochs})
    samples = state.total_steps * cfg.data.scenes_per_step * cfg.data.samples_per_scene
    assert (samples < CACHEABLE_BELOW_SAMPLES) is (epochs == 2)
    assert state.decoder_module.cacheable_graph is cacheable and state.cfg.model.compile_cacheable is cacheable


def test_a_saved_checkpoint_resumes_bit_identically_and_leaves_no_temp_file(tmp_path):
    cfg, state = make_state()
    for seed in range(2):
        train_step(state, *fake_batch(cfg, NUM_SCENES, seed=seed), reg_weight=1e-4)
        state.step += 1
    state.escalation.rollbacks = 1
    path = ckpt.save(ckpt.take_snapshot(state), tmp_path / "ckpt")
    assert [p.name for p in path.parent.iterdir()] == [ckpt.STATE_FILE]

    _, fresh = make_state()
    ckpt.resume(fresh, ckpt.load(path.parent))
    assert_bit_identical(state_tensors(state), state_tensors(fresh))
    assert (fresh.step, fresh.escalation.rollbacks) == (2, 1)
    assert fresh.counters.read() == state.counters.read()
    assert ckpt.replica_checksums(fresh) == ckpt.replica_checksums(state)


def test_fake_collectives_mirror_the_local_rank_unless_a_peer_is_scripted():
    mirror = FakeCollectives(rank=2, world_size=3)
    t = torch.tensor([1.0, 2.0])
    mirror.all_reduce_sum_(t)
    assert t.tolist() == [3.0, 6.0]
    assert mirror.all_gather_object("x") == ["x", "x", "x"]
    assert len(mirror.all_gather_rows(torch.ones(2, 4))) == 3

    scripted = FakeCollectives(rank=1, world_size=2, peers={0: [torch.tensor([5.0]), None]})
    for expected in (6.0, 2.0, 2.0):  # the script, then an explicit mirror, then a script that ran out
        t = torch.tensor([1.0])
        scripted.all_reduce_sum_(t)
        assert t.item() == expected
    assert scripted.num_all_reduces == 3


def test_the_progress_line_reads_the_interval_metrics():
    cfg, state = make_state()
    clock = IntervalClock(last_counters=state.counters.read())
    train_step(state, *fake_batch(cfg, NUM_SCENES), reg_weight=1e-4)
    state.step += 1
    metrics = collect_metrics(state, clock)
    assert metrics["train/step"] == 1 and metrics["guard/skipped_steps"] == 0
    line = progress_line(state, metrics)
    assert line.startswith(f"epoch 0/{cfg.optim.num_epochs}  step 1/{state.total_steps}  loss ")
    assert "skipped 0  rollbacks 0  ETA " in line


@pytest.mark.parametrize("setting, words", [(True, "compiled for a cached start"),
                                            (False, "compiled for the fastest step")])
def test_the_start_line_says_how_the_step_was_compiled(setting, words):
    from sdf_ray.metrics_log import start_line

    _, state = make_state(**{"model.compile": True, "model.compile_cacheable": setting})
    assert words in start_line(state, resumed=False)
    _, eager = make_state(**{"model.compile": False})
    assert "compiled" not in start_line(eager, resumed=False)
