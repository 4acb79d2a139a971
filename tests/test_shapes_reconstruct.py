"""Batched code optimisation: equals one shape at a time, isolates a shape's NaN, retries, recovers radii."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from sdf_ray.shapes.config import ReconstructConfig, lr_at
from sdf_ray.shapes.reconstruct import SampleBank, draw_samples, freeze, reconstruct_codes, sdf_l1, shape_key
from sdf_ray.shapes.samples import ShapeSamples, split_finite
from tests.test_shapes_helpers import TINY_MODEL, one_thread, sphere_scene, tiny_decoder

L = TINY_MODEL["latent_size"]
CFG = ReconstructConfig(num_iterations=25, samples_per_iteration=128, lr=1e-2, max_retries=1)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def shapes(radii=(0.3, 0.5, 0.7), n=400) -> list[ShapeSamples]:
    out = []
    for i, r in enumerate(radii):
        s = sphere_scene(f"s{i}", r, n, seed=i)
        out.append(ShapeSamples(10 + i, s.pos_N4, s.neg_N4))
    return out


def run(decoder, shape_list, cfg=CFG):
    return reconstruct_codes(freeze(decoder), SampleBank.build(shape_list, "cpu"), cfg, 0.5, L)


def test_schedule_is_the_reference_one():
    cfg = ReconstructConfig()
    assert lr_at(cfg, 0) == lr_at(cfg, 399) == 5e-3
    assert lr_at(cfg, 400) == lr_at(cfg, 799) == pytest.approx(5e-4)


def test_samples_of_a_shape_do_not_depend_on_its_batch():
    s = shapes()
    bank, alone = SampleBank.build(s, "cpu"), SampleBank.build(s[1:2], "cpu")
    keys = torch.tensor([shape_key(0, x.scene_id, 0) for x in s])
    xyz, sdf = draw_samples(bank, torch.arange(3), keys, 7, 64)
    xyz1, sdf1 = draw_samples(alone, torch.tensor([0]), keys[1:2], 7, 64)
    assert torch.equal(xyz[1], xyz1[0]) and torch.equal(sdf[1], sdf1[0])
    assert (sdf[:, :32] > 0).all() and (sdf[:, 32:] <= 0).all()
    other, _ = draw_samples(bank, torch.arange(3), keys, 8, 64)
    assert not torch.equal(other, xyz)  # resampled every iteration


def test_batched_equals_one_at_a_time():
    decoder = tiny_decoder()
    s = shapes()
    batched = run(decoder, s)
    for b, shape in enumerate(s):
        (alone,) = run(decoder, [shape])
        assert alone.status == batched[b].status == "ok"
        torch.testing.assert_close(batched[b].code, alone.code, rtol=1e-5, atol=1e-6)
        assert batched[b].loss == pytest.approx(alone.loss, rel=1e-5)
    assert not torch.allclose(batched[0].code, batched[1].code)


def test_padding_the_batch_changes_no_shape_and_holds_the_batch_shape():
    """``pad_to`` (a compiled decoder's single batch shape) adds rows that repeat shape 0 and are dropped."""
    decoder = freeze(tiny_decoder())
    sizes: set[int] = set()

    class Recorder(nn.Module):
        def forward(self, latent, xyz):
            sizes.add(latent.shape[0])
            return decoder(latent, xyz)

    s = shapes()
    plain = run(decoder, s)
    padded = reconstruct_codes(Recorder(), SampleBank.build(s, "cpu"), CFG, 0.5, L, pad_to=5)
    assert sizes == {5} and len(padded) == 3
    for a, b in zip(padded, plain):
        assert a.status == b.status == "ok" and a.iterations == b.iterations and a.attempts == b.attempts
        torch.testing.assert_close(a.code, b.code, rtol=1e-5, atol=1e-6)


def test_auto_precision_and_compile_are_fp32_eager_on_cpu():
    from sdf_ray.device_settings import resolve_reconstruct_for_device

    cfg = ReconstructConfig()
    assert (cfg.precision, cfg.compile) == ("auto", "auto")
    resolved = resolve_reconstruct_for_device(cfg, torch.device("cpu"))
    assert (resolved.precision, resolved.compile) == ("fp32", False)
    explicit = resolve_reconstruct_for_device(dataclasses.replace(cfg, precision="bf16", compile=True),
                                              torch.device("cpu"))
    assert (explicit.precision, explicit.compile) == ("bf16", True)


class SphereFamily(nn.Module):
    """An analytic 'decoder': f(z, x) = |x| - z_0, so the optimal code's first entry is the radius."""

    def forward(self, latent: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        return xyz.norm(dim=-1) - latent[..., 0]


def test_optimisation_recovers_the_radius_and_sdf_l1_is_small():
    cfg = dataclasses.replace(CFG, num_iterations=200, lr=2e-2, code_reg_lambda=0.0)
    s = shapes()
    bank = SampleBank.build(s, "cpu")
    out = reconstruct_codes(SphereFamily(), bank, cfg, 0.5, L)
    radii = [o.code[0].item() for o in out]
    np.testing.assert_allclose(radii, [0.3, 0.5, 0.7], atol=5e-3)
    errors = sdf_l1(SphereFamily(), bank, torch.stack([o.code for o in out]), 0.5, "fp32", 4096)
    assert max(errors) < 5e-3


class Poisoned(nn.Module):
    """Wraps a decoder; at call ``at_call`` of a batch of ``batch_size`` shapes, row ``row`` turns NaN in the
    forward (``site='loss'``) or only in the backward (``site='grad'``)."""

    def __init__(self, inner: nn.Module, row: int, at_call: int, batch_size: int, site: str, every_call=False):
        super().__init__()
        self.inner, self.row, self.at_call, self.batch_size, self.site = inner, row, at_call, batch_size, site
        self.every_call = every_call
        self.calls = 0

    def forward(self, latent, xyz):
        out = self.inner(latent, xyz)
        hit = out.shape[0] == self.batch_size and (self.calls == self.at_call or
                                                   (self.every_call and self.calls >= self.at_call))
        self.calls += 1
        if not hit:
            return out
        mask = torch.zeros(out.shape[0], 1, dtype=torch.bool)
        mask[self.row] = True
        if self.site == "loss":
            return torch.where(mask, float("nan"), out)
        return _NanGrad.apply(out, mask)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, float("nan"), g), None


@pytest.mark.parametrize("site", ["loss", "grad"])
def test_a_nan_in_one_shape_leaves_the_others_bit_identical_and_is_retried(site):
    decoder = freeze(tiny_decoder())
    s = shapes()
    clean = run(decoder, s)
    poisoned = run(Poisoned(decoder, row=1, at_call=5, batch_size=3, site=site), s)
    for b in (0, 2):
        assert torch.equal(poisoned[b].code, clean[b].code)
        assert poisoned[b].attempts == 1 and poisoned[b].iterations == CFG.num_iterations
    retried = poisoned[1]
    assert retried.status == "ok" and retried.attempts == 2
    assert retried.iterations == 5 + CFG.num_iterations  # 5 good steps, then a full fresh attempt
    assert torch.isfinite(retried.code).all()


def test_a_shape_that_keeps_failing_is_marked_failed_with_the_reason():
    decoder = freeze(tiny_decoder())
    s = shapes()
    poisoned = Poisoned(decoder, row=0, at_call=0, batch_size=1, site="loss", every_call=True)
    out = reconstruct_codes(poisoned, SampleBank.build(s[:1], "cpu"), CFG, 0.5, L)
    assert out[0].status == "failed" and out[0].attempts == 2
    assert out[0].reason == "non-finite loss at iteration 0 of attempt 2"
    grad = Poisoned(decoder, row=1, at_call=3, batch_size=3, site="grad")
    (_, mid, _) = run(grad, s, dataclasses.replace(CFG, max_retries=0))
    assert mid.status == "failed" and mid.reason == "non-finite gradient at iteration 3 of attempt 1"
    assert torch.isfinite(mid.code).all()  # the last finite code, untouched by the NaN step


def test_nan_samples_are_dropped_and_counted_and_a_one_signed_shape_fails_alone():
    rows = np.array([[0, 0, 0, -0.1], [np.nan, 0, 0, 0.2], [0.5, 0, 0, 0.1], [0, 0, 0, np.inf]], dtype=np.float32)
    s = split_finite(3, rows)
    assert s.dropped_nan_rows == 2 and len(s.pos_N4) == 1 and len(s.neg_N4) == 1
    one_signed = ShapeSamples(4, s.pos_N4, s.neg_N4[:0])
    out = run(tiny_decoder(), [shapes()[0], one_signed])
    assert out[0].status == "ok"
    assert out[1].status == "failed" and "sdf <= 0" in out[1].reason


def test_pure_modules_do_not_import_ray():
    modules = ["reconstruct", "meshing", "metrics", "decode", "samples", "work", "outputs", "config",
               "trained_run", "ground_truth"]
    code = ("import sys\n" + "".join(f"import sdf_ray.shapes.{m}\n" for m in modules)
            + "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
