"""Model shapes and parameter count, loss against hand-computed values, schedules, latents."""

from __future__ import annotations

import math

import pytest
import torch

from sdf_ray.config import LossConfig, ModelConfig, OptimConfig
from sdf_ray.latents import LatentTable, init_latents
from sdf_ray.loss import code_reg_weight, sdf_loss
from sdf_ray.model import DeepSDFDecoder, num_parameters
from sdf_ray.schedules import group_lrs, lr_factor


def test_reference_decoder_has_1843195_parameters():
    assert num_parameters(DeepSDFDecoder(ModelConfig())) == 1_843_195


def test_decoder_shapes_and_skip_connection_width():
    cfg = ModelConfig()
    dec = DeepSDFDecoder(cfg)
    assert dec.layers[3].out_features == 512 - (256 + 3)
    assert dec.layers[4].in_features == 512
    dec.eval()
    out = dec(torch.randn(7, 259))
    assert out.shape == (7,)
    assert out.abs().max() <= 1.0  # final tanh


def test_decoder_without_weight_norm_or_tanh():
    cfg = ModelConfig(latent_size=4, hidden_dim=16, num_layers=3, latent_in_layers=(2,), dropout=0.0,
                      weight_norm=False, output_tanh=False)
    dec = DeepSDFDecoder(cfg)
    assert num_parameters(dec) == (7 * 16 + 16) + (16 * 9 + 9) + (16 * 16 + 16) + (16 + 1)


def test_loss_matches_hand_computation():
    cfg = LossConfig(clamp_dist=0.1, code_reg_lambda=1e-4, code_reg_ramp_epochs=100)
    pred = torch.tensor([0.05, 0.3, -0.5, 0.0])
    sdf = torch.tensor([0.0, 0.2, -0.05, 0.02])
    latents = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    # clamped: pred -> [0.05, 0.1, -0.1, 0], sdf -> [0, 0.1, -0.05, 0.02]; |diff| = [0.05, 0, 0.05, 0.02]
    l1_expected = (0.05 + 0 + 0.05 + 0.02) / 4
    reg = code_reg_weight(cfg, epoch=50)
    assert reg == pytest.approx(0.5e-4)
    total, l1 = sdf_loss(pred, sdf, latents, cfg, reg)
    assert l1.item() == pytest.approx(l1_expected, rel=1e-6)
    assert total.item() == pytest.approx(l1_expected + 0.5e-4 * (5.0 + 1.0) / 2, rel=1e-6)
    assert code_reg_weight(cfg, 1000) == pytest.approx(1e-4)
    assert code_reg_weight(cfg, 0) == 0.0


def test_step_schedule_halves_every_500_epochs():
    cfg = OptimConfig()
    assert group_lrs(cfg, 0) == {"decoder": 5e-4, "latents": 1e-3}
    assert group_lrs(cfg, 499)["decoder"] == 5e-4
    assert group_lrs(cfg, 500) == {"decoder": 2.5e-4, "latents": 5e-4}
    assert group_lrs(cfg, 1999)["latents"] == pytest.approx(1e-3 / 8)


def test_warmup_and_constant_schedules():
    warm = OptimConfig(schedule="warmup", warmup_epochs=4, lr_step_every_n_epochs=10)
    assert [lr_factor(warm, e) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(warm, 10) == 0.5
    const = OptimConfig(schedule="constant")
    assert lr_factor(const, 10_000) == 1.0


def test_latent_init_and_projection():
    codes = init_latents(20_000, 256, torch.Generator().manual_seed(0))
    assert codes.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.02)
    table = LatentTable(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
    table.project_(torch.tensor(True))
    assert torch.equal(table.codes.data, torch.tensor([[3.0, 4.0], [0.3, 0.4]]))  # skipped
    table.project_(torch.tensor(False))
    assert torch.linalg.vector_norm(table.codes.data, dim=1).tolist() == pytest.approx([1.0, 0.5])
    assert torch.equal(table.codes.data[1], torch.tensor([0.3, 0.4]))  # inside the ball: untouched


def test_feature_padding_computes_the_same_function_with_the_same_parameters():
    cfg = ModelConfig(latent_size=13, hidden_dim=32, num_layers=4, latent_in_layers=(2,), dropout=0.0)
    padded_cfg = ModelConfig(**{**cfg.__dict__, "pad_features_to": 8})
    torch.manual_seed(0)
    plain = DeepSDFDecoder(cfg)
    padded = DeepSDFDecoder(padded_cfg)
    padded.load_state_dict(plain.state_dict())
    assert num_parameters(padded) == num_parameters(plain)
    assert padded.in_pad == 0 and padded.out_pad[1] == (-(32 - 16)) % 8  # 16 + 16 = 32: already aligned
    x = torch.randn(50, 16, requires_grad=True)
    torch.testing.assert_close(padded(x), plain(x))
    ref = ModelConfig(pad_features_to=8)
    dec = DeepSDFDecoder(ref)
    assert (dec.in_pad, dec.out_pad[3]) == (5, 3)  # 259 -> 264, 253 -> 256
    torch.manual_seed(1)
    plain_ref = DeepSDFDecoder(ModelConfig(dropout=0.0))
    padded_ref = DeepSDFDecoder(ModelConfig(dropout=0.0, pad_features_to=8))
    padded_ref.load_state_dict(plain_ref.state_dict())
    x = torch.randn(20, 259)
    torch.testing.assert_close(padded_ref(x), plain_ref(x))
    loss_p, loss_q = padded_ref(x).sum(), plain_ref(x).sum()
    loss_p.backward()
    loss_q.backward()
    for (name, p), q in zip(padded_ref.named_parameters(), plain_ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
