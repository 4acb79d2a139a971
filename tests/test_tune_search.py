"""Search-file validation, the divergence stopper and the sweep's bookkeeping: fast, no Ray instance."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sdf_ray import config as C
from sdf_ray.cli import main
from sdf_ray.errors import ClusterError, ConfigError
from sdf_ray.run_schedule import RunSchedule
from tests.helpers import tiny_config
from tuning import outputs, planning, search
from tuning.search import DivergenceSpec
from tuning.stopper import DivergenceStopper, divergence_reason, replay

INJECT = [{"step": 2, "rank": 0, "site": "loss", "value": "nan", "repeat": True}]


def base_cfg(**overrides):
    return tiny_config(**{"scaling.num_workers": 1, **overrides})


def problems_of(data, cfg=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        search.from_dict(data, cfg)
    return info.value.problems


def has(problems: list[str], *fragments: str) -> bool:
    return any(all(f in p for f in fragments) for p in problems)


# ---------------------------------------------------------------------------------------------
# Packaged search files


def test_packaged_stability_search_loads_against_the_tiny_config():
    # It ranks by held-out shapes, so the training config needs a held-out set.
    spec = search.load(search.packaged_search("stability"), base_cfg(**{"validation.path": "held-out"}))
    assert spec.num_samples == 16 and spec.scheduler.type == "asha" and spec.metric == "val/sdf_l1"
    kinds = {p.key: p.kind for p in spec.space}
    assert kinds == {"optim.decoder_lr": "loguniform", "optim.latent_lr": "loguniform", "guard.grad_clip": "choice"}
    lo, hi = spec.space[0].values
    assert lo <= 1e-5 and hi >= 1.0


def test_packaged_tiny_search_is_a_grid_of_four():
    spec = search.load(search.packaged_search("tiny"), base_cfg())
    assert spec.has_grid and spec.num_trials() == 4 and spec.max_concurrent_trials == 2


def test_defaults():
    spec = search.from_dict({"space": {"optim.decoder_lr": {"loguniform": [1e-4, 1e-2]}}})
    assert (spec.metric, spec.mode, spec.search_alg, spec.num_samples) == ("train/loss", "min", "random", 1)
    assert spec.scheduler == search.SchedulerSpec() and spec.max_concurrent_trials is None
    assert spec.divergence == DivergenceSpec(loss_growth_factor=10.0, max_skip_fraction=0.5)


# ---------------------------------------------------------------------------------------------
# Bad search input: every problem at once, each named


def test_every_problem_is_reported_at_once():
    data = {
        "space": {
            "optim.decoder_rl": {"loguniform": [1e-4, 1e-2]},       # unknown key (typo)
            "optim.latent_lr": {"uniform": [1e-3, 1e-3]},           # empty range
            "guard.grad_clip": {"uniform": [10, 1]},                # lo > hi
            "optim.eps": {"loguniform": [0, 1e-6]},                  # loguniform touching 0
            "loss.clamp_dist": {"loguniform": [-1, 1]},             # loguniform below 0
            "model.dropout": {"choice": []},                        # empty choice
            "data.seed": {"normal": [0, 1]},                        # unknown distribution
        },
        "metric": "val/loss",                                      # never reported
        "mode": "minimise",
        "num_samples": 0,
        "scheduler": {"type": "asha", "grace_period": 0, "reduction_factor": 1},
        "max_concurrent_trials": -2,
        "divergence": {"loss_growth_factor": 0.5, "max_skip_fractoin": 0.5},
        "serach_alg": "random",
    }
    problems = problems_of(data)
    expected = [
        ("`space.optim.decoder_rl`", "unknown", "did you mean `optim.decoder_lr`"),
        ("`space.optim.latent_lr`", "empty range"),
        ("`space.guard.grad_clip`", "lo > hi"),
        ("`space.optim.eps`", "must be > 0"),
        ("`space.loss.clamp_dist`", "must be > 0"),
        ("`space.model.dropout`", "empty list"),
        ("`space.data.seed`", "unknown distribution"),
        ("`metric`", "val/loss", "never reported"),
        ("`mode`",),
        ("`num_samples`", ">= 1"),
        ("`scheduler.grace_period`",),
        ("`scheduler.reduction_factor`",),
        ("`max_concurrent_trials`",),
        ("`divergence.loss_growth_factor`",),
        ("`divergence.max_skip_fractoin`", "did you mean `max_skip_fraction`"),
        ("`serach_alg`", "did you mean `search_alg`"),
    ]
    for fragments in expected:
        assert has(problems, *fragments), (fragments, problems)
    assert len(problems) == len(expected)


def test_error_message_is_one_line_listing_all_problems():
    with pytest.raises(ConfigError) as info:
        search.from_dict({"space": {"optim.nope": {"choice": [1]}}, "metric": "nope"}, source="s.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("s.yaml: 2 problems")


@pytest.mark.parametrize("data, fragments", [
    ({}, ("`space`", "required")),
    ({"space": {"optim.decoder_lr": [1e-4, 1e-2]}}, ("`space.optim.decoder_lr`", "expected one of")),
    ({"space": {"optim.decoder_lr": {"uniform": [1e-4]}}}, ("expected [lo, hi]",)),
    ({"space": {"optim.decoder_lr": {"uniform": ["a", 1]}}}, ("bounds must be numbers",)),
    ({"space": {"optim.schedule": {"uniform": [0, 1]}}}, ("not numeric; use choice or grid",)),
    ({"space": {"optim.num_epochs": {"uniform": [1.5, 10]}}}, ("integer key",)),
    ({"space": {"optim": {"choice": [1]}}}, ("`space.optim`", "unknown training-config key")),
    ({"space": {"optim.decoder_lr": {"choice": [1e-3]}}, "scheduler": "hyperband"}, ("`scheduler.type`",)),
    ({"space": {"optim.decoder_lr": {"choice": [1e-3]}}, "scheduler": {"grace_period": 5, "max_t": 2}},
     ("`scheduler.max_t`", "below")),
    ({"space": {"optim.decoder_lr": {"choice": [1e-3]}}, "search_alg": "bayes"}, ("`search_alg`",)),
    ({"space": {"optim.decoder_lr": {"grid": [1e-3]}}, "search_alg": "optuna"}, ("optuna cannot expand grid",)),
    ({"space": {"optim.decoder_lr": {"choice": [1e-3]}}, "divergence": {"max_skip_fraction": 1.5}},
     ("`divergence.max_skip_fraction`",)),
    ("space: 1", ("top level must be a mapping",)),
])
def test_bad_search_input_is_named(data, fragments):
    problems = problems_of(data)
    assert has(problems, *fragments), problems


def test_optuna_without_the_extra_is_a_clear_error():
    try:
        import optuna  # noqa: F401
    except ImportError:
        problems = problems_of({"space": {"optim.decoder_lr": {"loguniform": [1e-4, 1e-2]}}, "search_alg": "optuna"})
        assert has(problems, "optuna is not installed", "sdf-ray[optuna]")
    else:
        spec = search.from_dict({"space": {"optim.decoder_lr": {"loguniform": [1e-4, 1e-2]}}, "search_alg": "optuna"})
        assert spec.search_alg == "optuna"


def test_corners_of_the_space_are_validated_against_the_training_config():
    data = {"space": {
        "optim.decoder_lr": {"uniform": [0, 1e-2]},              # lo corner: must be > 0
        "guard.grad_clip": {"choice": [-1, 0, 1]},               # -1: must be >= 0
        "scaling.num_workers": {"grid": [1, 3]},                 # 3 does not split scenes_per_step=4
        "model.latent_in_layers": {"choice": [[2], [9]]},        # 9 >= num_layers
    }}
    problems = problems_of(data, base_cfg())
    assert has(problems, "`space.optim.decoder_lr` value 0", "`optim.decoder_lr`: must be > 0")
    assert has(problems, "`space.guard.grad_clip` value -1", "`guard.grad_clip`: must be >= 0")
    assert has(problems, "`space.scaling.num_workers` value 3", "does not split evenly")
    assert has(problems, "`space.model.latent_in_layers` value [9]", "`model.latent_in_layers[0]`")
    assert len(problems) == 4  # each distinct problem once, not once per corner


def test_combinations_of_corners_are_validated():
    data = {"space": {"scaling.num_workers": {"choice": [1, 2]}, "data.scenes_per_step": {"grid": [2, 3]}}}
    problems = problems_of(data, base_cfg())
    assert problems == ["the combination scaling.num_workers=2, data.scenes_per_step=3 gives an invalid training "
                        "config: `data.scenes_per_step`: 3 does not split evenly over scaling.num_workers=2"]


def test_corner_type_errors_are_caught():
    problems = problems_of({"space": {"guard.enabled": {"choice": [True, "yes"]}}}, base_cfg())
    assert has(problems, "`space.guard.enabled` value 'yes'", "expected bool")


def test_parse_problems_and_corner_problems_are_reported_together():
    data = {"space": {"optim.decoder_lr": {"uniform": [0, 1]}, "optim.nope": {"choice": [1]}}}
    problems = problems_of(data, base_cfg())
    assert has(problems, "`space.optim.nope`") and has(problems, "`space.optim.decoder_lr` value 0")


def test_integer_ranges_sample_integers():
    ray_tune = pytest.importorskip("ray.tune")
    spec = search.from_dict({"space": {"optim.num_epochs": {"uniform": [1, 4]},
                                       "logging.every_n_steps": {"loguniform": [1, 16]},
                                       "optim.decoder_lr": {"loguniform": [1e-4, 1e-2]},
                                       "guard.grad_clip": {"grid": [0.0, 1.0]}}}, base_cfg())
    space = search.tune_param_space(spec)
    assert isinstance(space["optim.num_epochs"], ray_tune.search.sample.Integer)
    assert isinstance(space["logging.every_n_steps"], ray_tune.search.sample.Integer)
    assert isinstance(space["optim.decoder_lr"], ray_tune.search.sample.Float)
    assert space["guard.grad_clip"] == {"grid_search": [0.0, 1.0]}
    samples = [space["optim.num_epochs"].sample() for _ in range(200)]
    assert set(samples) == {1, 2, 3, 4}


def test_search_spec_round_trips_through_to_dict():
    spec = search.load(search.packaged_search("stability"), base_cfg(**{"validation.path": "held-out"}))
    assert search.from_dict(spec.to_dict()) == spec


# ---------------------------------------------------------------------------------------------
# The divergence stopper


def report(loss, skip=0.0, diverged=0, step=10):
    return {"train/loss": loss, "guard/skip_fraction": skip, "diverged": diverged, "train/step": step}


SPEC = DivergenceSpec(loss_growth_factor=10.0, max_skip_fraction=0.5)


@pytest.mark.parametrize("result, best, why", [
    (report(math.inf), 0.1, "non-finite loss"),
    (report(math.inf), None, "non-finite loss"),
    (report(math.nan), 0.1, "non-finite loss"),
    (report(0.1, diverged=1), 0.1, "diverged=1"),
    (report(0.1, skip=0.75), 0.1, "skip fraction 0.75"),
    (report(1.5), 0.1, "loss_growth_factor=10"),
])
def test_stopper_prunes(result, best, why):
    reason = divergence_reason(result, best, SPEC)
    assert reason is not None and why in reason


@pytest.mark.parametrize("result, best", [
    (report(0.9), 0.1),             # 9x the best: within the growth factor
    (report(0.1, skip=0.5), 0.1),   # at, not above, the skip threshold
    (report(5.0), None),            # the first report sets the best
    ({"train/loss": 0.1}, 0.1),     # missing keys are not evidence
])
def test_stopper_keeps(result, best):
    assert divergence_reason(result, best, SPEC) is None


def test_disabled_thresholds_keep_only_the_hard_signals():
    spec = DivergenceSpec(loss_growth_factor=None, max_skip_fraction=None)
    assert divergence_reason(report(100.0, skip=0.99), 0.1, spec) is None
    assert divergence_reason(report(math.inf), 0.1, spec) is not None
    assert divergence_reason(report(0.1, diverged=1), 0.1, spec) is not None


def test_stopper_tracks_each_trials_best_and_records_reasons():
    stopper = DivergenceStopper(SPEC)
    assert not stopper("a", report(1.0))
    assert not stopper("b", report(0.05))
    assert not stopper("a", report(0.2))     # a's best is now 0.2
    assert not stopper("a", report(1.9))     # 9.5x
    assert not stopper("b", report(0.4))     # 8x b's best
    assert stopper("a", report(2.1, step=40))
    assert "a" in stopper.reasons and "step 40" in stopper.reasons["a"] and "b" not in stopper.reasons
    assert stopper("a", report(0.1))         # stays stopped
    assert stopper("c", report(math.inf))
    assert set(stopper.reasons) == {"a", "c"} and not stopper.stop_all()


def test_replay_reproduces_the_stopper():
    history = [report(1.0), report(0.2), report(1.9), report(2.1), report(0.1)]
    stopper = DivergenceStopper(SPEC)
    decisions = [stopper("t", r) for r in history]
    reason, index = replay(history, SPEC)
    assert decisions.index(True) + 1 == index == 4 and reason == stopper.reasons["t"]
    assert replay([report(1.0), report(0.5)], SPEC) == (None, 0)


# ---------------------------------------------------------------------------------------------
# Planning and outputs


def test_plan_sizes_concurrency_to_the_cluster():
    spec = search.from_dict({"space": {"optim.decoder_lr": {"grid": [1e-3, 2e-3, 3e-3]}}})
    cfg = base_cfg(**{"scaling.cpus_per_worker": 2.0})
    p = planning.plan(cfg, spec, num_scenes=8, cluster={"CPU": 5.0})
    assert (p.cpus_per_trial, p.max_concurrent_trials) == (2.0, 2)
    assert p.max_t == RunSchedule.of(cfg, 8).num_reports()


def test_plan_rejects_more_concurrent_trials_than_the_cluster_holds():
    spec = search.from_dict({"space": {"optim.decoder_lr": {"grid": [1e-3, 2e-3]}}, "max_concurrent_trials": 3})
    with pytest.raises(ClusterError, match=r"max_concurrent_trials=3 needs 3 x 1 CPU\(s\); the cluster has 2 CPU"):
        planning.plan(base_cfg(), spec, num_scenes=8, cluster={"CPU": 2.0})
    with pytest.raises(ClusterError, match="each trial needs 2 CPU"):
        planning.plan(base_cfg(**{"scaling.num_workers": 2}), spec, num_scenes=8, cluster={"CPU": 1.0})


def test_plan_takes_the_largest_trial_of_the_space():
    spec = search.from_dict({"space": {"scaling.num_workers": {"choice": [1, 2]}}})
    p = planning.plan(base_cfg(), spec, num_scenes=8, cluster={"CPU": 4.0})
    assert (p.cpus_per_trial, p.max_concurrent_trials) == (2.0, 1)


def test_expected_reports_follows_the_logging_and_checkpoint_cadence():
    # tiny: 8 scenes / 4 per step = 2 steps per epoch; log every 2 steps; checkpoint every epoch.
    assert RunSchedule.of(base_cfg(**{"optim.num_epochs": 10}), 8).num_reports() == 10
    cfg = base_cfg(**{"optim.num_epochs": 10, "logging.every_n_steps": 3, "checkpoint.every_n_epochs": 5})
    assert RunSchedule.of(cfg, 8).num_reports() == 8  # steps 3, 6, ..., 18 and the checkpoints at steps 10 and 20


def test_best_config_resets_debug_and_names_the_run():
    cfg = base_cfg(**{"debug.inject": INJECT})
    best = outputs.best_config(cfg, {"optim.decoder_lr": 3e-3, "debug.inject": []}, "sweep1")
    assert best.optim.decoder_lr == 3e-3 and best.checkpoint.run_name == "sweep1-best"
    assert best.debug == C.DebugConfig()
    assert C.from_dict(C.yaml_load(C.to_yaml(best))) == best


class FakeResult:
    def __init__(self, history, error=None):
        import pandas as pd

        self.metrics_dataframe = pd.DataFrame(history) if history else None
        self.metrics = dict(history[-1]) if history else {}
        self.error = error
        self.path = "/nowhere"


def rows_for(entries, spec):
    return outputs.trial_rows(base_cfg(**{"optim.num_epochs": 2}), spec, entries, {}, 8, Path("/nonexistent"))


def test_trial_statuses_and_best_trial():
    spec = search.from_dict({"space": {"optim.decoder_lr": {"choice": [1e-3, 2e-3, 3e-3, 4e-3]}}})

    def hist(losses, steps):
        return [{**report(loss, step=s), "training_iteration": i + 1, "guard/skipped_steps": 0}
                for i, (loss, s) in enumerate(zip(losses, steps, strict=True))]

    entries = [
        ("t1", {"optim.decoder_lr": 1e-3}, FakeResult(hist([0.3, 0.2], [2, 4])), "TERMINATED"),       # all 4 steps
        ("t2", {"optim.decoder_lr": 2e-3}, FakeResult(hist([0.3, math.inf], [2, 4])), "TERMINATED"),  # diverged
        ("t3", {"optim.decoder_lr": 3e-3}, FakeResult(hist([0.1], [2])), "TERMINATED"),              # ASHA stop
        ("t4", {"optim.decoder_lr": 4e-3}, FakeResult([], error=RuntimeError("boom")), "ERROR"),
        ("t5", {"optim.decoder_lr": 1e-3}, FakeResult(hist([0.01], [2])), "PENDING"),               # interrupted
    ]
    rows = rows_for(entries, spec)
    by_id = {r["trial_id"]: r for r in rows}
    assert [by_id[t]["status"] for t in ("t1", "t2", "t3", "t4", "t5")] == [
        "finished", "pruned_diverged", "pruned_asha", "error", "unfinished"]
    assert by_id["t2"]["iterations"] == 2 and "non-finite" in by_id["t2"]["reason"]
    assert by_id["t2"]["best_train/loss"] == 0.3 and by_id["t2"]["last_train/loss"] is None
    assert by_id["t4"]["reason"] == "boom"
    assert outputs.best_row(spec, rows)["trial_id"] == "t3"  # the healthy trial with the best last loss


# ---------------------------------------------------------------------------------------------
# CLI: user errors are one line, exit 2, before Ray starts


def test_cli_bad_search_file_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "s.yaml"
    bad.write_text("space:\n  optim.decoder_rl: {loguniform: [0, 1]}\nmetric: loss\n")
    code = main(["tune", "--config", str(C.packaged_config("tiny")), "--search", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "did you mean `optim.decoder_lr`" in err and "`metric`" in err


def test_cli_missing_search_file_and_bad_name(tmp_path, capsys):
    assert main(["tune", "--config", str(C.packaged_config("tiny")), "--search", str(tmp_path / "x.yaml")]) == 2
    assert "search file not found" in capsys.readouterr().err
    assert main(["tune", "--config", str(C.packaged_config("tiny")), "--search",
                 str(search.packaged_search("tiny")), "--name", "../up"]) == 2
    assert "--name" in capsys.readouterr().err
