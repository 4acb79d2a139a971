"""The fused ReLU + dropout: mask statistics, determinism, the output-only backward, the compiled path."""

from __future__ import annotations

import pytest
import torch

from sdf_ray.dropout import hashed_keep_mask, quantised_probability, relu_dropout


def test_hashed_mask_keeps_the_right_fraction_with_independent_neighbours():
    keep = hashed_keep_mask(torch.Size([1024, 512]), torch.tensor(12345), 0.2).float()
    p_keep = 1 - quantised_probability(0.2)
    assert keep.mean().item() == pytest.approx(p_keep, abs=2e-3)
    # Neighbours along a row and a column are kept together as often as independent draws would be.
    assert (keep[:, 1:] * keep[:, :-1]).mean().item() == pytest.approx(p_keep**2, abs=3e-3)
    assert (keep[1:] * keep[:-1]).mean().item() == pytest.approx(p_keep**2, abs=3e-3)
    # Columns (features) and rows (samples) are all near the rate: no stripes.
    assert keep.mean(0).min() > p_keep - 0.07 and keep.mean(1).min() > p_keep - 0.1


def test_hashed_mask_is_a_function_of_the_seed():
    a = hashed_keep_mask(torch.Size([256, 64]), torch.tensor(7), 0.2)
    assert torch.equal(a, hashed_keep_mask(torch.Size([256, 64]), torch.tensor(7), 0.2))
    b = hashed_keep_mask(torch.Size([256, 64]), torch.tensor(8), 0.2)
    agreement = (a == b).float().mean().item()
    assert agreement == pytest.approx(0.8**2 + 0.2**2, abs=0.02)  # as two independent masks


def test_quantised_probability_is_close_and_never_one():
    assert quantised_probability(0.2) == 13107 / 65536
    assert quantised_probability(0.0) == 0.0
    assert quantised_probability(0.999999999) < 1.0


def _compiled(p: float, cacheable: bool = True):
    # aot_eager traces like inductor (so relu_dropout takes its compiled branch) without a C++ toolchain.
    return torch.compile(lambda x: relu_dropout(x, p, True, cacheable=cacheable), backend="aot_eager",
                         fullgraph=True)


@pytest.mark.parametrize("cacheable", [True, False])
def test_compiled_relu_dropout_scales_kept_values_and_backpropagates_through_the_output_only(cacheable):
    torch.manual_seed(0)
    x = torch.randn(4096, 64, requires_grad=True)
    y = _compiled(0.2, cacheable)(x)
    scale = 1 / (1 - quantised_probability(0.2))
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.relu(x)[kept] * scale)
    assert kept.float().mean().item() == pytest.approx(0.5 * 0.8, abs=0.01)  # relu halves, dropout keeps 0.8
    assert y.mean().item() == pytest.approx(torch.relu(x).mean().item(), rel=0.03)  # unbiased
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(grad, kept.float() * scale)


def test_compiled_masks_replay_under_the_same_generator_state_and_differ_across_calls():
    fn = _compiled(0.2)
    x = torch.rand(512, 64) + 0.1  # all positive: the mask alone decides zeros
    torch.manual_seed(3)
    first, second = fn(x) != 0, fn(x) != 0
    torch.manual_seed(3)
    assert torch.equal(fn(x) != 0, first)
    assert not torch.equal(first, second)


def test_eval_and_zero_probability_are_plain_relu():
    x = torch.randn(100, 8)
    torch.testing.assert_close(relu_dropout(x, 0.2, False), torch.relu(x))
    torch.testing.assert_close(relu_dropout(x, 0.0, True), torch.relu(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cacheable_spelling_equals_the_autograd_function_bitwise(dtype):
    """``model.compile_cacheable`` picks between the two: same values and gradients, so a run may switch on resume."""
    from sdf_ray.dropout import _scale_where_kept, _ScaleWhereKept

    torch.manual_seed(1)
    x = (torch.randn(2048, 96) * 3).to(dtype).requires_grad_(True)
    x.data[0, :4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")])
    keep = hashed_keep_mask(x.shape, torch.tensor(11), 0.2)
    scale = 1 / (1 - quantised_probability(0.2))
    g = torch.randn(2048, 96).to(dtype)
    y_fn = _ScaleWhereKept.apply(x, keep, scale)
    (g_fn,) = torch.autograd.grad(y_fn, x, g)
    y_plain = _scale_where_kept(x, keep, scale)
    (g_plain,) = torch.autograd.grad(y_plain, x, g)
    assert torch.equal(y_plain, y_fn) and torch.equal(g_plain, g_fn)
