"""The hand-written code gradient (``sdf_ray.shapes.frozen_decoder``) against autograd through the decoder module.

The truth is autograd through :class:`DeepSDFDecoder` in float64, an implementation the frozen decoder shares no
arithmetic with (weight norm, the concatenated skip layer's split and padding, clamp, abs and tanh derivatives).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sdf_ray import config as config_mod
from sdf_ray.model import DeepSDFDecoder
from sdf_ray.shapes.config import ReconstructConfig
from sdf_ray.shapes.frozen_decoder import FrozenDecoder, clamped_l1_and_code_gradient, compute_dtype
from sdf_ray.shapes.reconstruct import SampleBank, freeze, prepare, reconstruct_codes
from sdf_ray.shapes.samples import ShapeSamples

L = 16


def _decoder(**model: object) -> DeepSDFDecoder:
    torch.manual_seed(0)
    fields: dict[str, object] = {"latent_size": L, "hidden_dim": 48, "num_layers": 5, "latent_in_layers": (2,)}
    # 48 - 19 = 29 outputs before the skip: padded to 32 by default
    cfg = dataclasses.replace(config_mod.TrainConfig().model, **{**fields, **model})
    return freeze(DeepSDFDecoder(cfg)).double()  # type: ignore[return-value]


def _autograd(decoder: DeepSDFDecoder, z: torch.Tensor, xyz: torch.Tensor, sdf: torch.Tensor, clamp: float,
              lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    z_in = z.clone().requires_grad_(True)
    pred = decoder(z_in.unsqueeze(1), xyz)
    loss = (pred.clamp(-clamp, clamp) - sdf.clamp(-clamp, clamp)).abs().mean(dim=1) + lam * z_in.pow(2).mean(dim=1)
    (grad,) = torch.autograd.grad(loss.sum(), z_in)
    return loss.detach(), grad


@pytest.mark.parametrize("model", [{}, {"output_tanh": False}, {"pad_features_to": 0}, {"latent_in_layers": ()},
                                   {"weight_norm": False, "latent_in_layers": (2, 3)}])
def test_loss_and_code_gradient_equal_autograd_through_the_decoder(model):
    decoder = _decoder(**model)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, L, generator=g, dtype=torch.float64) * 0.3
    xyz = torch.rand(3, 70, 3, generator=g, dtype=torch.float64) * 2 - 1
    sdf = torch.randn(3, 70, generator=g, dtype=torch.float64) * 0.05
    frozen = FrozenDecoder(decoder, torch.float64)
    with torch.no_grad():  # a clamp distance with half the predictions inside the band: both derivative branches
        clamp = float(decoder(z.unsqueeze(1), xyz).abs().median())
    for lam in (0.0, 1e-2):
        want_loss, want_grad = _autograd(decoder, z, xyz, sdf, clamp, lam)
        loss, grad = clamped_l1_and_code_gradient(frozen, z, xyz, sdf, clamp, lam)
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)
        if lam == 0:  # the case exercises the decoder's part of the gradient, not only the regulariser's
            assert want_grad.abs().max() > 1e-4


def test_forward_has_the_decoders_broadcasting_and_values():
    decoder = _decoder()
    frozen = FrozenDecoder(decoder, torch.float64)
    g = torch.Generator().manual_seed(2)
    codes = torch.randn(4, L, generator=g, dtype=torch.float64)
    shared = torch.rand(1, 33, 3, generator=g, dtype=torch.float64)  # decoding: every code at the same points
    points = torch.rand(50, 3, generator=g, dtype=torch.float64)  # sdf_l1: one code against its points
    with torch.no_grad():
        for latent, xyz in ((codes.unsqueeze(1), shared), (codes[0], points)):
            want = decoder(latent, xyz)
            got = frozen(latent, xyz)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_bf16_frozen_decoder_stays_close_to_the_module_under_autocast():
    decoder = _decoder().float()
    frozen = FrozenDecoder(decoder, compute_dtype("bf16", decoder))
    xyz = torch.rand(2, 200, 3) * 2 - 1
    codes = torch.randn(2, 1, L) * 0.3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = decoder(codes, xyz).float()
        got = frozen(codes, xyz)  # autocast is switched off inside: its dtypes are the precision
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 2e-2 * want.abs().max() + 1e-3


def _bank() -> SampleBank:
    rng = np.random.default_rng(0)
    shapes = []
    for i in range(3):
        rows = rng.uniform(-1, 1, size=(400, 4)).astype(np.float32)
        rows[:, 3] = np.linalg.norm(rows[:, :3], axis=1) - 0.3 - 0.1 * i  # spheres: both signs
        shapes.append(ShapeSamples(i, rows[rows[:, 3] > 0], rows[rows[:, 3] <= 0]))
    return SampleBank.build(shapes, "cpu")


def test_reconstruction_through_the_hand_written_gradient_equals_autograd():
    """The whole optimisation (sampling, masked Adam, 25 iterations) in fp32: the same codes either way, to
    rounding."""
    decoder = _decoder().float()
    bank = _bank()
    cfg = dataclasses.replace(ReconstructConfig(), num_iterations=25, samples_per_iteration=64, precision="fp32")
    want = reconstruct_codes(decoder, bank, cfg, 0.1, L)
    got = reconstruct_codes(FrozenDecoder(decoder, torch.float32), bank, cfg, 0.1, L)
    for w, o in zip(want, got):
        assert (o.status, o.iterations) == (w.status, w.iterations) == ("ok", 25)
        torch.testing.assert_close(o.code, w.code, rtol=1e-4, atol=1e-5)
    start = reconstruct_codes(decoder, bank, dataclasses.replace(cfg, num_iterations=1), 0.1, L)
    assert min((w.code - s.code).abs().max() for w, s in zip(want, start)) > 1e-3  # the codes travelled


def test_the_compiled_step_and_decoder_equal_the_eager_ones():
    """``prepare(compile=True)``: the compiled path (three multiply-adds for the point term, one graph for the step)
    against eager, fp32 on the CPU."""
    decoder = _decoder().float()
    cfg = dataclasses.replace(ReconstructConfig(), precision="fp32")
    compiled, eager = prepare(decoder, cfg, 0.1, compile=True), prepare(decoder, cfg, 0.1, compile=False)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, L, generator=g) * 0.3
    xyz = torch.rand(2, 64, 3, generator=g) * 2 - 1
    sdf = torch.randn(2, 64, generator=g) * 0.05
    for got, want in zip(compiled.step(z, xyz, sdf), eager.step(z, xyz, sdf)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    index = torch.tensor([1, 0] * 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled.decode(z.unsqueeze(1), xyz[:1]), eager.decode(z.unsqueeze(1), xyz[:1]),
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(compiled.decode(z, xyz[0], code_index=index),
                                   eager.decode(z, xyz[0], code_index=index), rtol=1e-5, atol=1e-7)


def test_decoding_many_shapes_by_code_index_equals_decoding_each_shape_alone():
    """``code_index`` (the grid decoding's shared calls): point p with code ``codes[index[p]]``, in both decoders,
    equal to decoding each shape's points with its own code (and the frozen decoder equal to the module)."""
    from sdf_ray.shapes.decode import decode_indexed

    decoder = _decoder()
    frozen = FrozenDecoder(decoder, torch.float64)
    g = torch.Generator().manual_seed(5)
    codes = torch.randn(4, L, generator=g, dtype=torch.float64) * 0.3
    xyz = torch.rand(50, 3, generator=g, dtype=torch.float64) * 2 - 1
    index = torch.tensor([3, 0, 0, 2] * 12 + [1, 3])
    with torch.no_grad():
        alone = torch.stack([decoder(codes[i], xyz[p]) for p, i in enumerate(index.tolist())])
        for module in (decoder, frozen):
            torch.testing.assert_close(module(codes, xyz, code_index=index), alone, rtol=1e-12, atol=1e-14)
            # in chunks of 16 points, the last one padded
            torch.testing.assert_close(decode_indexed(module, codes, index, xyz, "fp32", 16, pad=True).double(),
                                       alone.float().double(), rtol=1e-6, atol=1e-7)
            # an index that does not name one code per point is refused, not broadcast
            for bad_codes, bad_index in ((codes, index[:1]), (codes.unsqueeze(1), index)):
                with pytest.raises(ValueError, match="code_index"):
                    module(bad_codes, xyz, code_index=bad_index)


@pytest.mark.parametrize("code_gradient", ["hand-written", "autograd"])
def test_prepare_picks_the_module_the_config_names(code_gradient):
    decoder = _decoder().float()
    cfg = dataclasses.replace(ReconstructConfig(), code_gradient=code_gradient, precision="fp32")
    prepared = prepare(decoder, cfg, 0.1, compile=False)
    assert isinstance(prepared.model, FrozenDecoder) == (code_gradient == "hand-written")
    out = reconstruct_codes(prepared.step, _bank(), dataclasses.replace(cfg, num_iterations=3,
                                                                       samples_per_iteration=32), 0.1, L)
    assert [o.status for o in out] == ["ok"] * 3


def test_an_unknown_code_gradient_is_a_config_error():
    from sdf_ray.errors import ConfigError
    from sdf_ray.shapes.config import from_overrides

    with pytest.raises(ConfigError, match="code_gradient"):
        from_overrides(["reconstruct.code_gradient=fused"])
