"""Validation during training: reconstruct a few held-out scenes with the current decoder, on every rank.

An auto-decoder's training loss measures memorisation (every training scene has its own code); held-out
shapes are what tells whether the decoder generalises. A validation pass is the reconstruction of
``sdf_ray.shapes`` run inside the training worker group: the held-out scenes are sharded over the ranks,
each rank optimises codes for its shard with the decoder frozen and in eval mode, and one all-reduce of a
few sums gives every rank the same ``val/*`` numbers.

What it must never do:
- change training: the decoder's parameters are frozen for the pass and restored (``requires_grad`` and
  train mode), reconstruction draws its randomness from counter-based hashes and its own generators
  (never torch's global RNG, which carries the dropout stream), so a run with validation trains
  bit-identically to one without;
- hang the ranks: every rank runs exactly one all-reduce per pass whatever happens on it (no scenes, a
  non-finite decoder, an exception inside the reconstruction), and the decision to skip is voted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sdf_ray.config import TrainConfig, ValidationConfig
from sdf_ray.data.format import read_manifest
from sdf_ray.data.sampler import shard_scene_ids
from sdf_ray.dist import Collectives
from sdf_ray.errors import first_line
from sdf_ray.shapes.config import ReconstructConfig
from sdf_ray.shapes.decode import decode_sparse_grids
from sdf_ray.shapes.ground_truth import GroundTruth, load_ground_truth
from sdf_ray.shapes.meshing import extract_mesh
from sdf_ray.shapes.reconstruct import SampleBank, prepare, reconstruct_codes, sdf_l1
from sdf_ray.shapes.samples import load_shape_samples

log = logging.getLogger("sdf_ray")

# The sums all-reduced once per pass, in this order.
_SUMS = ("sdf_l1", "sdf_l1_shapes", "chamfer_l2", "chamfer_shapes", "chamfer_expected", "failed", "bad")


def reconstruct_settings(cfg: TrainConfig) -> ReconstructConfig:
    """The reconstruction a validation pass runs: the reference's defaults, with the section's budget."""
    v = cfg.validation
    return dataclasses.replace(
        ReconstructConfig(), num_iterations=v.num_iterations, samples_per_iteration=v.samples_per_iteration,
        clamp_dist=cfg.loss.clamp_dist, seed=v.seed, shapes_per_batch=max(v.num_scenes, 1),
        precision="bf16" if cfg.optim.precision == "bf16" else "fp32",
        mesh_resolution=max(v.mesh_resolution, 8), num_metric_points=v.num_metric_points)


def validation_scene_ids(v: ValidationConfig, num_scenes_in_dataset: int) -> list[int]:
    """The held-out scenes a run validates on: the dataset's first ``num_scenes`` (a fixed set across passes)."""
    return list(range(min(v.num_scenes, num_scenes_in_dataset)))


@contextmanager
def frozen_eval(decoder: nn.Module) -> Iterator[nn.Module]:
    """The decoder in eval mode with its parameters out of autograd; both restored afterwards."""
    was_training = decoder.training
    flags = [p.requires_grad for p in decoder.parameters()]
    decoder.eval()
    for p in decoder.parameters():
        p.requires_grad_(False)
    try:
        yield decoder
    finally:
        for p, flag in zip(decoder.parameters(), flags):
            p.requires_grad_(flag)
        decoder.train(was_training)


class Validator:
    """One rank's share of the held-out scenes, loaded once, and the pass over them."""

    def __init__(self, cfg: TrainConfig, coll: Collectives, device: torch.device) -> None:
        v = cfg.validation
        self.cfg, self.coll, self.device = cfg, coll, device
        self.settings = reconstruct_settings(cfg)
        manifest = read_manifest(v.path)
        all_ids = validation_scene_ids(v, manifest.num_scenes)
        self.num_scenes = len(all_ids)
        mine = [all_ids[i] for i in shard_scene_ids(len(all_ids), coll.rank, coll.world_size)] if all_ids else []
        self.bank = SampleBank.build(load_shape_samples(v.path, mine, manifest), device)
        self.ground_truth: dict[int, GroundTruth] = {}
        if v.mesh_resolution > 0:
            for sid in mine:
                gt = load_ground_truth(v.path, sid, dict(manifest.scenes[sid].normalization))
                if gt is not None:
                    self.ground_truth[sid] = gt
        if coll.rank == 0 and v.mesh_resolution > 0 and mine and not self.ground_truth:
            log.warning("validation: %s has no ground-truth surface samples: val/chamfer_l2 stays inf", v.path)

    def line(self, metrics: dict[str, Any]) -> str:
        """The progress line of a pass."""
        if metrics["val/skipped"]:
            return "validation skipped: the decoder has non-finite parameters (or a rank failed); val/* = inf"
        chamfer = metrics.get("val/chamfer_l2")
        return (f"validation ({self.num_scenes} held-out scenes, {self.settings.num_iterations} iterations): "
                f"sdf_l1 {metrics['val/sdf_l1']:.5f}"
                + (f"  chamfer_l2 x1e3 {chamfer * 1e3:.3f}" if chamfer is not None else "")
                + (f"  failed {metrics['val/failed_shapes']}" if metrics["val/failed_shapes"] else "")
                + f"  ({metrics['perf/val_seconds']:.1f} s)")

    def run(self, decoder: nn.Module, latent_size: int) -> dict[str, Any]:
        """One validation pass: a collective, call on every rank at the same step."""
        start = time.perf_counter()
        local = dict.fromkeys(_SUMS, 0.0)
        params_finite = all(bool(torch.isfinite(p).all()) for p in decoder.parameters())
        if not params_finite:
            local["bad"] = 1.0
        elif self.bank.num_shapes:
            try:
                self._reconstruct(decoder, latent_size, local)
            except Exception as exc:  # one rank's failure must not leave the others waiting in the all-reduce
                log.warning("validation failed on rank %d: %s", self.coll.rank, first_line(exc))
                local["bad"] = 1.0
        sums_t = torch.tensor([local[k] for k in _SUMS], dtype=torch.float64, device=self.device)
        self.coll.all_reduce_sum_(sums_t)
        sums = dict(zip(_SUMS, sums_t.tolist()))
        seconds = time.perf_counter() - start
        if sums["bad"] > 0:
            return {"val/sdf_l1": math.inf, "val/chamfer_l2": math.inf, "val/failed_shapes": self.num_scenes,
                    "val/skipped": 1, "perf/val_seconds": seconds}
        metrics: dict[str, Any] = {
            "val/sdf_l1": sums["sdf_l1"] / sums["sdf_l1_shapes"] if sums["sdf_l1_shapes"] else math.inf,
            "val/failed_shapes": int(sums["failed"]), "val/skipped": 0, "perf/val_seconds": seconds}
        if self.cfg.validation.mesh_resolution > 0:
            # A shape without a mesh (empty, failed) counts as infinitely far: a collapsed decoder must not
            # look good because it produced no surface to measure.
            measured, expected = sums["chamfer_shapes"], sums["chamfer_expected"]
            metrics["val/chamfer_l2"] = (sums["chamfer_l2"] / measured if measured and measured == expected
                                         else math.inf)
        return metrics

    def _reconstruct(self, decoder: nn.Module, latent_size: int, local: dict[str, float]) -> None:
        s = self.settings
        assert s.clamp_dist is not None
        with frozen_eval(decoder):
            # As `sdf-ray reconstruct` does it (reconstruct.code_gradient), eager: the weights change every pass.
            model = prepare(decoder, s, s.clamp_dist, compile=False).model
            codes = reconstruct_codes(model, self.bank, s, s.clamp_dist, latent_size)
            ok = [c.status == "ok" for c in codes]
            codes_BL = torch.stack([c.code for c in codes]).to(self.device)
            l1 = sdf_l1(model, self.bank, codes_BL, s.clamp_dist, s.precision, s.points_per_forward)
            local["failed"] += sum(not o for o in ok)
            for good, value in zip(ok, l1):
                if good and math.isfinite(value):
                    local["sdf_l1"] += value
                    local["sdf_l1_shapes"] += 1
            if self.cfg.validation.mesh_resolution <= 0 or not self.ground_truth:
                return
            spec = s.grid_spec(self.cfg.loss.clamp_dist, self.cfg.validation.mesh_resolution)
            grids = decode_sparse_grids(model, codes_BL, spec, s.precision, s.points_per_forward)
        for sid, good, grid in zip(self.bank.scene_ids, ok, grids):
            gt = self.ground_truth.get(sid)
            if gt is None:
                continue
            local["chamfer_expected"] += 1
            if not good:
                continue
            meshed = extract_mesh(grid)
            if meshed.mesh is None:
                local["failed"] += 1
                continue
            # Here, not at the top: the metrics import scipy.spatial (~0.3 s), which every worker would pay at
            # start-up (the training function imports this module) for a feature most runs do not use.
            from sdf_ray.shapes.metrics import mesh_metrics

            m = mesh_metrics(meshed.mesh, gt.points_M3, gt.normals_M3, gt.normalization,
                             num_points=s.num_metric_points, seed=s.metric_seed)
            local["chamfer_l2"] += m.chamfer_l2
            local["chamfer_shapes"] += 1
