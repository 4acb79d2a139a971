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


def concatenated_forward(dec: DeepSDFDecoder, latent_NL: torch.Tensor, xyz_N3: torch.Tensor) -> torch.Tensor:
    """The reference formulation, written independently: concatenate the input, then plain layers."""
    inp = torch.cat([latent_NL, xyz_N3], dim=1)
    x = inp
    for i, layer in enumerate(dec.layers[:-1]):
        if i in dec.latent_in:
            x = torch.cat([x, inp], dim=1)
        x = torch.relu(layer(x))  # callers use dropout 0
    x = dec.layers[-1](x)
    return (torch.tanh(x) if dec.output_tanh else x).squeeze(1)


def test_decoder_shapes_and_skip_connection_width():
    cfg = ModelConfig()
    dec = DeepSDFDecoder(cfg)
    assert dec.layers[3].out_features == 512 - (256 + 3)
    assert dec.layers[4].in_features == 512
    dec.eval()
    out = dec(torch.randn(7, 256), torch.randn(7, 3))
    assert out.shape == (7,)
    assert out.abs().max() <= 1.0  # final tanh
    assert dec(torch.randn(256), torch.randn(5, 3)).shape == (5,)  # one code for all points
    assert dec(torch.randn(2, 1, 256), torch.randn(2, 6, 3)).shape == (2, 6)  # a code per scene
    assert dec(torch.randn(0, 256), torch.randn(0, 3)).shape == (0,)  # an empty batch
    with pytest.raises(ValueError, match=r"expected latent \[\.\.\., 256\] and xyz \[\.\.\., 3\]"):
        dec(torch.randn(7, 259), torch.randn(7, 3))


@pytest.mark.parametrize("pad", [0, 8])
def test_code_per_scene_computes_the_concatenated_network_and_its_gradients(pad):
    cfg = ModelConfig(latent_size=13, hidden_dim=40, num_layers=5, latent_in_layers=(2, 4), dropout=0.0,
                      pad_features_to=pad)
    torch.manual_seed(0)
    dec = DeepSDFDecoder(cfg).double()
    codes_BL = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    xyz_BS3 = torch.randn(3, 7, 3, dtype=torch.float64)
    out_BS = dec(codes_BL.unsqueeze(1), xyz_BS3)
    ref_N = concatenated_forward(dec, codes_BL.repeat_interleave(7, 0), xyz_BS3.reshape(-1, 3))
    torch.testing.assert_close(out_BS.reshape(-1), ref_N)
    grads = torch.autograd.grad(out_BS.square().sum(), [codes_BL, *dec.parameters()])
    ref_grads = torch.autograd.grad(ref_N.square().sum(), [codes_BL, *dec.parameters()])
    for name, g, r in zip(["codes", *(n for n, _ in dec.named_parameters())], grads, ref_grads):
        torch.testing.assert_close(g, r, msg=name)


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
    ref = ModelConfig(pad_features_to=8)
    assert DeepSDFDecoder(ref).out_pad == [0, 0, 0, 3, 0, 0, 0, 0, 0]  # 253 -> 256 before the skip
    aligned = ModelConfig(latent_size=13, hidden_dim=32, num_layers=4, latent_in_layers=(2,), pad_features_to=8)
    assert DeepSDFDecoder(aligned).out_pad[1] == 0  # 32 - 16 = 16: already a multiple of 8
    torch.manual_seed(1)
    plain_ref = DeepSDFDecoder(ModelConfig(dropout=0.0, pad_features_to=0))
    padded_ref = DeepSDFDecoder(ModelConfig(dropout=0.0, pad_features_to=8))
    padded_ref.load_state_dict(plain_ref.state_dict())
    assert num_parameters(padded_ref) == num_parameters(plain_ref)
    latent, xyz = torch.randn(20, 256), torch.randn(20, 3)
    torch.testing.assert_close(padded_ref(latent, xyz), plain_ref(latent, xyz))
    padded_ref(latent, xyz).sum().backward()
    plain_ref(latent, xyz).sum().backward()
    for (name, p), q in zip(padded_ref.named_parameters(), plain_ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_flops_per_sample_amortise_the_code_over_its_samples():
    from sdf_ray.model import flops_per_sample

    ref = ModelConfig()
    per_sample_macs = 259 * 512 + 2 * 512 * 512 + 512 * 253 + 4 * 512 * 512 + 512
    assert flops_per_sample(ref, 1) == 6 * per_sample_macs == 11_013_120  # a code per sample: the reference
    shared = 6 * (per_sample_macs - 256 * 512 - 256 * 512)
    assert flops_per_sample(ref, 16384) == pytest.approx(shared + 6 * 2 * 256 * 512 / 16384)


def test_compiled_decoder_takes_the_fused_point_term_and_matches_eager():
    # aot_eager traces like inductor (so the compile-only branch runs) without needing a C++ toolchain.
    cfg = ModelConfig(latent_size=13, hidden_dim=40, num_layers=5, latent_in_layers=(2,), dropout=0.0)
    torch.manual_seed(0)
    dec = DeepSDFDecoder(cfg)
    compiled = torch.compile(dec, backend="aot_eager", fullgraph=True)
    codes_BL = torch.randn(3, 13, requires_grad=True)
    xyz_BS3 = torch.randn(3, 7, 3)
    eager = dec(codes_BL.unsqueeze(1), xyz_BS3)
    fused = compiled(codes_BL.unsqueeze(1), xyz_BS3)
    torch.testing.assert_close(fused, eager)
    params = [codes_BL, *dec.parameters()]
    for g, r in zip(torch.autograd.grad(fused.sum(), params), torch.autograd.grad(eager.sum(), params)):
        torch.testing.assert_close(g, r)


def test_hidden_activations_stay_bf16_under_autocast(monkeypatch):
    import sdf_ray.model as model_mod

    seen: list[torch.dtype] = []
    real = model_mod.relu_dropout
    monkeypatch.setattr(model_mod, "relu_dropout",
                        lambda x, p, training, **kw: seen.append(x.dtype) or real(x, p, training, **kw))
    dec = DeepSDFDecoder(ModelConfig(latent_size=8, hidden_dim=32, num_layers=4, latent_in_layers=(2,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dec(torch.randn(2, 1, 8), torch.randn(2, 5, 3))
    assert seen == [torch.bfloat16] * 4  # the input layers too (their fp32 bias must not promote them)


def test_the_output_layer_is_fp32_under_autocast_in_both_forms(monkeypatch):
    """The compiled form (product + row sum) equals the eager fp32 GEMM on the same bf16 activations."""
    from sdf_ray import model as model_mod

    torch.manual_seed(0)
    x = torch.randn(6, 40, 32).to(torch.bfloat16)
    weight, bias = torch.randn(1, 32, requires_grad=True), torch.randn(1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model_mod._output_layer(x, weight, bias)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        fused = model_mod._output_layer(x, weight, bias)
        # model.compile_cacheable=false keeps an autocast-off context around the same ops: the same result.
        in_context = model_mod._output_layer(x, weight, bias, cacheable=False)
    assert torch.equal(in_context, fused)
    assert eager.dtype == fused.dtype == torch.float32 and fused.shape == eager.shape == (6, 40, 1)
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-6)
    for g, r in zip(torch.autograd.grad(fused.sum(), [weight, bias]), torch.autograd.grad(eager.sum(), [weight, bias])):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
