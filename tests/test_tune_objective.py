"""Tune on what matters: ranking by held-out validation metrics, and pruning collapsed decoders (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sdf_ray import config as C
from sdf_ray.errors import ConfigError
from tests.helpers import tiny_config
from tuning import outputs, search
from tuning.search import CollapseSpec, DivergenceSpec
from tuning.stopper import PRUNED_COLLAPSED, PRUNED_DIVERGED, DivergenceStopper, replay

DIVERGENCE = DivergenceSpec(loss_growth_factor=10.0, max_skip_fraction=0.5)
COLLAPSE = CollapseSpec(max_grad_norm=1e-4, max_loss_change=1e-3, patience=3)


def report(loss, norm, step, **extra):
    return {"train/loss": loss, "train/grad_norm": norm, "guard/skip_fraction": 0.0, "diverged": 0,
            "train/step": step, **extra}


def test_a_decoder_stuck_at_a_constant_is_pruned_as_collapsed_after_patience_reports():
    # The H200 observation: loss stuck at ~0.104, gradient norm ~5e-6.
    history = [report(0.30, 0.5, 10), report(0.104, 5e-6, 20), report(0.104, 5e-6, 30), report(0.104, 4e-6, 40),
               report(0.104, 5e-6, 50)]
    stopper = DivergenceStopper(DIVERGENCE, COLLAPSE)
    decisions = [stopper("t", r) for r in history]
    # Flat reports are those after the first one at the constant level: 30, 40, 50 -> pruned at the 5th report.
    assert decisions == [False, False, False, False, True]
    reason = stopper.reasons["t"]
    assert reason.status == PRUNED_COLLAPSED and "collapsed" in reason and "step 50" in reason
    assert replay(history, DIVERGENCE, COLLAPSE) == (reason, 5)


@pytest.mark.parametrize("history", [
    # Healthy training: the loss keeps falling even when the gradient is small.
    [report(0.10, 5e-5, 10), report(0.09, 5e-5, 20), report(0.08, 5e-5, 30), report(0.07, 5e-5, 40)],
    # A flat loss with a real gradient is a plateau, not a collapse.
    [report(0.104, 0.3, 10), report(0.104, 0.3, 20), report(0.104, 0.3, 30), report(0.104, 0.3, 40)],
    # A streak interrupted before `patience` flat reports.
    [report(0.104, 5e-6, 10), report(0.104, 5e-6, 20), report(0.104, 5e-6, 30), report(0.09, 5e-6, 40),
     report(0.09, 5e-6, 50)],
])
def test_healthy_or_plateaued_trials_are_not_pruned(history):
    assert replay(history, DIVERGENCE, COLLAPSE) == (None, 0)


def test_collapse_detection_can_be_disabled_and_divergence_still_wins():
    stuck = [report(0.104, 5e-6, s) for s in range(10, 100, 10)]
    assert replay(stuck, DIVERGENCE, CollapseSpec(max_grad_norm=None)) == (None, 0)
    reason, index = replay([report(0.1, 1.0, 10), report(math.inf, 1.0, 20)], DIVERGENCE, COLLAPSE)
    assert reason is not None and reason.status == PRUNED_DIVERGED and index == 2


def test_search_files_accept_validation_metrics_and_collapse_thresholds():
    cfg = tiny_config(**{"validation.path": "held-out"})
    spec = search.from_dict({"space": {"optim.decoder_lr": {"loguniform": [1e-4, 1e-2]}}, "metric": "val/sdf_l1",
                             "collapse": {"max_grad_norm": 1e-5, "patience": 5}}, cfg)
    assert spec.metric == "val/sdf_l1" and spec.collapse == CollapseSpec(max_grad_norm=1e-5, patience=5)
    assert search.from_dict(spec.to_dict(), cfg) == spec


@pytest.mark.parametrize("sets, data, fragment", [
    ({}, {"metric": "val/sdf_l1"}, "set validation.path"),
    ({"validation.path": "x"}, {"metric": "val/chamfer_l2"}, "validation.mesh_resolution"),
    ({}, {"metric": "val/sdf_l2"}, "did you mean `val/sdf_l1`"),
    ({}, {"collapse": {"patience": 0}}, "`collapse.patience`"),
])
def test_search_file_problems_with_the_objective_are_one_clear_line(sets, data, fragment):
    with pytest.raises(ConfigError) as info:
        search.from_dict({"space": {"optim.decoder_lr": {"choice": [1e-3]}}, **data}, tiny_config(**sets))
    assert fragment in str(info.value) and "\n" not in str(info.value)


class FakeResult:
    def __init__(self, history):
        import pandas as pd

        self.metrics_dataframe = pd.DataFrame(history)
        self.metrics = dict(history[-1])
        self.error = None
        self.path = "/nowhere"


def test_trials_are_ranked_by_the_held_out_metric_not_the_training_loss():
    cfg = tiny_config(**{"validation.path": "held-out", "optim.num_epochs": 2})
    spec = search.from_dict({"space": {"optim.decoder_lr": {"choice": [1e-3, 2e-3, 3e-3]}},
                             "metric": "val/sdf_l1"}, cfg)

    def history(losses, vals, collapsed=False):
        rows = []
        for i, (loss, val) in enumerate(zip(losses, vals, strict=True)):
            row = report(loss, 5e-6 if collapsed else 0.2, 2 * (i + 1), **{"training_iteration": i + 1,
                                                                         "guard/skipped_steps": 0})
            if val is not None:  # validation reports only: Tune's dataframe holds NaN in the others
                row["val/sdf_l1"] = val
            rows.append(row)
        return rows

    entries = [
        # Memorises best (lowest training loss) but generalises worst.
        ("memo", {"optim.decoder_lr": 1e-3}, FakeResult(history([0.05, 0.01], [0.04, 0.03])), "TERMINATED"),
        ("gen", {"optim.decoder_lr": 2e-3}, FakeResult(history([0.06, 0.03], [0.02, 0.01])), "TERMINATED"),
        ("flat", {"optim.decoder_lr": 3e-3},
         FakeResult(history([0.104, 0.104, 0.104, 0.104], [None, None, None, 0.2], collapsed=True)), "TERMINATED"),
    ]
    rows = outputs.trial_rows(cfg, spec, entries, {}, 8, Path("/nonexistent"))
    by_id = {r["trial_id"]: r for r in rows}
    assert by_id["memo"]["last_val/sdf_l1"] == 0.03 and by_id["gen"]["last_val/sdf_l1"] == 0.01
    assert by_id["flat"]["status"] == PRUNED_COLLAPSED and "collapsed" in by_id["flat"]["reason"]
    assert outputs.best_row(spec, rows)["trial_id"] == "gen"


def test_the_packaged_stability_search_ranks_by_held_out_shapes():
    spec = search.load(search.packaged_search("stability"), C.load(C.packaged_config("demo")))
    assert spec.metric == "val/sdf_l1" and spec.collapse.max_grad_norm is not None


def test_optuna_cannot_rank_by_a_validation_metric():
    with pytest.raises(ConfigError, match="optuna needs the metric in every report"):
        search.from_dict({"space": {"optim.decoder_lr": {"choice": [1e-3]}}, "metric": "val/sdf_l1",
                          "search_alg": "optuna"}, tiny_config(**{"validation.path": "x"}))
