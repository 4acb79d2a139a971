"""Escalation inside the real loop (1 process): rollbacks never replay the bad data window."""

from __future__ import annotations

import torch

from sdf_ray.data.sampler import SceneSampler
from sdf_ray.dist import LocalCollectives
from sdf_ray.train_loop import run_training
from tests.helpers import tiny_config


def test_rollbacks_resume_the_data_stream_past_every_bad_window(tiny_dataset, tmp_path, monkeypatch):
    positions: list[int] = []
    original = SceneSampler.batch

    def recording(self, stream_step):
        positions.append(stream_step)
        return original(self, stream_step)

    monkeypatch.setattr(SceneSampler, "batch", recording)
    cfg = tiny_config(**{"scaling.num_workers": 1, "data.path": str(tiny_dataset), "logging.every_n_steps": 1,
                         "guard.max_consecutive_skips": 2, "guard.max_rollbacks": 2,
                         "debug.inject": [{"step": 2, "rank": 0, "site": "loss", "value": "inf", "repeat": True}]})
    reports: list[dict] = []
    result = run_training(cfg, LocalCollectives(), torch.device("cpu"),
                          lambda metrics, snapshot: reports.append(metrics), tmp_path)
    assert result.status == "diverged" and result.rollbacks == 2
    assert len(positions) > 6
    assert positions == sorted(positions) and len(set(positions)) == len(positions), positions
    assert [m["guard/rollbacks"] for m in reports].count(2) >= 1 and reports[-1]["diverged"] == 1


def test_every_report_carries_exactly_the_documented_metrics(tiny_dataset, tmp_path):
    """Tune validates search metrics against REPORTED_METRICS: the loop must report exactly those keys."""
    from sdf_ray.metrics_log import REPORTED_METRICS, read_metrics

    cfg = tiny_config(**{"scaling.num_workers": 1, "data.path": str(tiny_dataset), "optim.num_epochs": 2})
    reports: list[dict] = []
    result = run_training(cfg, LocalCollectives(), torch.device("cpu"),
                          lambda metrics, snapshot: reports.append(metrics), tmp_path)
    assert result.status == "finished" and reports
    assert all(set(m) == set(REPORTED_METRICS) for m in reports)
    assert read_metrics(tmp_path) == reports
