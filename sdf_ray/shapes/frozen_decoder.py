"""The decoder as reconstruction uses it: frozen, its weights materialised once, a forward for points and a
hand-written backward to the codes alone.

Reconstruction differentiates only with respect to the codes, through a decoder that never changes. Through
autograd, a compiled step spends 44 % of its time (H200 profile) on activation traffic around the GEMMs: each
hidden layer is a GEMM, then an elementwise kernel (ReLU) that reads its output and writes it again, and in
backward another that applies the ReLU's mask. Here a plain hidden layer is one cuBLASLt GEMM with the bias and the
ReLU in its epilogue (``torch._addmm_activation``): the activation is written once and read by the next GEMM. The
backward is the chain rule written out: ``g_pre = g_h * (h > 0)``, ``g_h_prev = g_pre @ W_h``, and for a layer that
reads the input, the code's gradient ``(sum over the code's points of g_pre) @ W_z``. Measured on an H200
(docs/performance.md): the compiled step takes 0.87 of the time of autograd through the compiled decoder, and
decoding 0.79. On GPUs that run :mod:`sdf_ray.shapes.fused_backward`'s kernel (Triton, sm90+, bf16), each
``g_pre @ W_h`` and the previous layer's mask are one kernel: 0.95 of the step's time again.

The function is :class:`sdf_ray.model.DeepSDFDecoder`'s in eval mode (no dropout), computed as it is under the
same precision or more precisely: GEMMs in the compute dtype (bf16, or fp32 for fp32/tf32) with fp32
accumulation, but an input layer's code term ``W_z z + b`` (once per code), its ``W_xyz xyz`` term and the skip
layer's sum in fp32 where the module under bf16 autocast rounds them to bf16; the output layer in fp32 as there.
``tests/test_frozen_decoder.py`` checks values and code gradients against autograd through ``DeepSDFDecoder`` in
float64.

Non-finite values: cuBLASLt's ReLU epilogue is a max, which may map NaN to 0, so a NaN weight need not surface as
a NaN loss. Codes, points and targets are finite by construction (NaN rows are dropped at load; a shape whose loss
or gradient turns non-finite is frozen), and ``trained_run.load_trained_run`` refuses non-finite decoder weights.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from sdf_ray.model import DeepSDFDecoder, check_inputs, point_term
from sdf_ray.shapes import fused_backward


def autocast_off(device_type: str) -> Any:
    """Autocast switched off where it is on, else no context at all: a compiled graph then holds no autocast node,
    which AOTAutograd's cache refuses (a warm-cache start would trace and partition again)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(precision: str, decoder: nn.Module) -> torch.dtype:
    """bf16 for ``precision == 'bf16'``, else the decoder's own dtype (fp32; tf32 is a GEMM setting)."""
    return torch.bfloat16 if precision == "bf16" else next(decoder.parameters()).dtype


class FrozenDecoder(nn.Module):
    """A frozen :class:`DeepSDFDecoder`'s function in one compute dtype. ``forward(latent, xyz)`` has the
    decoder's interface (decoding); :meth:`trace` and :meth:`code_gradient` serve the optimisation."""

    def __init__(self, decoder: DeepSDFDecoder, dtype: torch.dtype, fused: bool = True) -> None:
        super().__init__()
        self.dtype = dtype
        self.acc = torch.promote_types(dtype, torch.float32)  # fp32, or float64 for a float64 decoder (tests)
        self.latent_size = decoder.latent_size
        self.output_tanh = decoder.output_tanh
        self.num_hidden = decoder.num_hidden
        self.reads_input: list[bool] = []
        with torch.no_grad():
            for i in range(decoder.num_hidden):
                w_h, w_in, bias = decoder._split_weight(i)
                if w_h is not None:
                    self.register_buffer(f"w_h{i}", w_h.detach().to(dtype).contiguous())
                if w_in is not None:
                    self.register_buffer(f"w_z{i}", w_in[:, :self.latent_size].detach().to(self.acc).contiguous())
                    self.register_buffer(f"w_xyz_T{i}", w_in[:, self.latent_size:].detach().to(self.acc).t().contiguous())
                self.register_buffer(f"bias{i}", bias.detach().to(self.acc if w_in is not None else dtype).contiguous())
                self.reads_input.append(w_in is not None)
            out = decoder.layers[-1]
            assert isinstance(out, nn.Linear)
            self.register_buffer("w_out", out.weight.detach().to(self.acc).reshape(-1).contiguous())
            self.register_buffer("b_out", out.bias.detach().to(self.acc).contiguous())
        self.requires_grad_(False)
        # The backward's GEMMs with the ReLU masks in their epilogues, where that kernel runs (fused_backward).
        self.fused_backward = fused and fused_backward.available(self._t("w_out").device, dtype)

    def _t(self, name: str) -> torch.Tensor:
        t: torch.Tensor = getattr(self, name)
        return t

    def _input_term(self, i: int, latent: torch.Tensor, xyz: torch.Tensor,
                    code_index: torch.Tensor | None) -> torch.Tensor:
        """``W_z z + b`` per code plus ``W_xyz xyz`` per point, in fp32, broadcast like the decoder's inputs (or
        the code term gathered per point by ``code_index``)."""
        w_z, a = self._t(f"w_z{i}"), self._t(f"w_xyz_T{i}")
        codes = latent.reshape(-1, self.latent_size).to(self.acc)
        per_code = torch.addmm(self._t(f"bias{i}"), codes, w_z.t()).view(*latent.shape[:-1], w_z.shape[0])
        if code_index is not None:
            per_code = per_code[code_index]
        return per_code + point_term(xyz.to(self.acc), a)

    def trace(self, latent: torch.Tensor, xyz: torch.Tensor, keep: bool = True,
              code_index: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(values in fp32, shaped like the broadcast of ``latent[..., 0]`` and ``xyz[..., 0]``, or like
        ``code_index`` (codes ``[B, L]``, points ``[P, 3]``, point p decoded with code ``code_index[p]``); the
        hidden activations ``[rows, width]`` that :meth:`code_gradient` needs, if ``keep``)."""
        check_inputs(self.latent_size, latent, xyz, code_index)
        hs: list[torch.Tensor] = []
        h: torch.Tensor | None = None
        shape: tuple[int, ...] = ()
        with autocast_off(xyz.device.type):  # the dtypes here are the precision
            for i in range(self.num_hidden):
                if not self.reads_input[i]:
                    assert h is not None
                    # cuBLASLt: GEMM, bias and ReLU in one kernel (the activation written once).
                    h = torch._addmm_activation(self._t(f"bias{i}"), h, self._t(f"w_h{i}").t())
                else:
                    pre = self._input_term(i, latent, xyz, code_index)
                    shape = tuple(pre.shape[:-1])
                    pre = pre.reshape(-1, pre.shape[-1])
                    if h is not None:
                        pre = pre + torch.mm(h, self._t(f"w_h{i}").t())
                    h = torch.relu(pre).to(self.dtype)
                if keep:
                    hs.append(h)
            assert h is not None
            y = torch.mv(h.to(self.acc), self._t("w_out")) + self._t("b_out")
            if self.output_tanh:
                y = torch.tanh(y)
        return y.view(shape), hs

    def forward(self, latent: torch.Tensor, xyz: torch.Tensor,
                code_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.trace(latent, xyz, keep=False, code_index=code_index)[0]

    def output_gradient(self, pred_BS: torch.Tensor, g_out_BS: torch.Tensor) -> torch.Tensor:
        """The gradient at the last linear layer's output from the gradient at the decoder's output."""
        return g_out_BS * (1 - pred_BS * pred_BS) if self.output_tanh else g_out_BS

    def code_gradient(self, hs: list[torch.Tensor], g_lin_BS: torch.Tensor) -> torch.Tensor:
        """``[B, L]``: the gradient to the codes of ``sum(g_lin * y)``, ``y`` the last linear layer's output (before
        the tanh: see :meth:`output_gradient`), where ``hs`` came from :meth:`trace` with codes ``[B, 1, L]``
        against points ``[B, S, 3]``."""
        B, S = g_lin_BS.shape
        fused = self.fused_backward
        with autocast_off(g_lin_BS.device.type):
            g_h = (g_lin_BS.reshape(B * S, 1).to(self.acc) * self._t("w_out")).to(self.dtype)
            g_pre = torch.ops.aten.threshold_backward(g_h, hs[-1], 0)  # g_h where h > 0, else 0: ReLU's
            grad = torch.zeros(B, self.latent_size, dtype=self.acc, device=g_lin_BS.device)
            for i in range(self.num_hidden - 1, -1, -1):
                if self.reads_input[i]:
                    per_code = g_pre.view(B, S, -1).sum(dim=1, dtype=self.acc)
                    grad = grad + per_code @ self._t(f"w_z{i}")
                if i > 0:
                    w_h = self._t(f"w_h{i}")
                    if fused:  # the GEMM and the previous layer's ReLU mask in one kernel
                        g_pre = fused_backward.mm_relu_grad(g_pre, w_h, hs[i - 1])
                    else:
                        g_pre = torch.ops.aten.threshold_backward(torch.mm(g_pre, w_h), hs[i - 1], 0)
        return grad


def clamped_l1_and_code_gradient(frozen: FrozenDecoder, codes_BL: torch.Tensor, xyz_BS3: torch.Tensor,
                                 sdf_BS: torch.Tensor, clamp_dist: float,
                                 code_reg_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per shape, ``mean_s |clamp(f(z, x)) - clamp(s)| + lambda * mean(z^2)`` and its gradient to ``z``:
    autograd's values (``torch.clamp`` passes the gradient where ``-c <= f <= c``; ``abs``'s is ``sign``)."""
    pred, hs = frozen.trace(codes_BL.unsqueeze(1), xyz_BS3)
    S = pred.shape[1]
    diff = pred.clamp(-clamp_dist, clamp_dist) - sdf_BS.to(pred.dtype).clamp(-clamp_dist, clamp_dist)
    loss = diff.abs().mean(dim=1)
    inside = (pred >= -clamp_dist) & (pred <= clamp_dist)
    g_pred = torch.where(inside, torch.sign(diff), 0.0) / S
    grad = frozen.code_gradient(hs, frozen.output_gradient(pred, g_pred))
    z = codes_BL.to(pred.dtype)
    if code_reg_lambda:
        loss = loss + code_reg_lambda * z.pow(2).mean(dim=1)
        grad = grad + (2 * code_reg_lambda / z.shape[1]) * z
    return loss, grad
