"""The fused ReLU-backward op on machines without its kernel: torch's GEMM and mask, the same function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdf_ray import config as config_mod
from sdf_ray.model import DeepSDFDecoder
from sdf_ray.shapes import fused_backward
from sdf_ray.shapes.frozen_decoder import FrozenDecoder


def operands(rows: int = 37, n: int = 24, k: int = 16, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(rows, n, generator=gen, dtype=dtype)
    w = torch.randn(n, k, generator=gen, dtype=dtype)
    h = torch.randn(rows, k, generator=gen, dtype=dtype).clamp(min=-0.5)
    h[::3, ::2] = 0.0  # exact zeros: ReLU outputs that are off
    return g, w, h


def test_mm_relu_grad_is_the_product_where_the_activation_is_positive():
    g, w, h = operands()
    got = fused_backward.mm_relu_grad(g, w, h).numpy()
    gn, wn, hn = g.numpy(), w.numpy(), h.numpy()
    want = np.zeros_like(hn)
    for r in range(hn.shape[0]):
        for c in range(hn.shape[1]):
            if hn[r, c] > 0:
                want[r, c] = sum(gn[r, j] * wn[j, c] for j in range(gn.shape[1]))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert (got[hn <= 0] == 0).all()


def test_mm_relu_grad_is_a_well_formed_custom_op():
    torch.library.opcheck(fused_backward.mm_relu_grad, operands(dtype=torch.float32))


def test_the_kernel_is_off_without_cuda_and_the_frozen_decoder_uses_torchs_ops():
    assert not fused_backward.available(torch.device("cpu"), torch.bfloat16)
    decoder = DeepSDFDecoder(config_mod.TrainConfig().model)
    assert not FrozenDecoder(decoder, torch.bfloat16).fused_backward
    assert not FrozenDecoder(decoder, torch.float32, fused=False).fused_backward


def test_operands_tma_cannot_read_do_not_fit():
    g, w, h = operands(dtype=torch.bfloat16)  # rows of 24 and 16 bf16: 48 and 32 bytes
    assert fused_backward.fits(g, w, h)
    assert not fused_backward.fits(g, w, h.t().contiguous().t())  # columns not contiguous
    assert not fused_backward.fits(g[:, 1:], w[1:], h)  # a base off 16 bytes, rows of 46 bytes


def test_mm_relu_grad_compiles_as_one_op_and_checks_its_operands():
    g, w, h = operands(dtype=torch.float32)
    compiled = torch.compile(fused_backward.mm_relu_grad, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(g, w, h), torch.ops.aten.threshold_backward(g @ w, h, 0))
    with pytest.raises(RuntimeError, match="do not chain"):
        fused_backward.mm_relu_grad(g, w, h[:-1])
