"""The DeepSDF decoder (Park et al. 2019), matching the reference architecture and defaults."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from sdf_ray.config import ModelConfig
from sdf_ray.dropout import relu_dropout

linear = nn.functional.linear


class DeepSDFDecoder(nn.Module):
    """f(z, xyz) -> sdf, the reference network: layer 0 reads ``[z | xyz]``; each layer in ``latent_in_layers``
    reads ``[previous output | z | xyz]`` (the previous layer is narrowed by L + 3 to keep the width).

    ``forward(latent, xyz)`` takes the code and the points apart, with broadcasting over leading dims: one
    code per scene ``[B, 1, L]`` against its points ``[B, S, 3]``, or a code per point ``[N, L]`` against
    ``[N, 3]``, or one code ``[L]`` against ``[N, 3]``. A layer that reads the input splits its weight by
    columns, ``W [h | z | xyz] = W_h h + W_z z + W_xyz xyz``, and computes ``W_z z`` once per code. This
    is the reference layer on the concatenation, to rounding, but a training batch of 64 scenes x 16,384
    points does the 256-wide code GEMM on 64 rows instead of 1 M, and never builds the ``[N, 259]`` input
    or the ``[N, 512]`` skip concatenation (forward or backward).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.latent_size = cfg.latent_size
        self.latent_in = set(cfg.latent_in_layers)
        in_dim = cfg.latent_size + 3
        dims = [in_dim] + [cfg.hidden_dim] * cfg.num_layers + [1]
        self.layers = nn.ModuleList()
        self.out_features: list[int] = []
        for i in range(cfg.num_layers + 1):
            out_dim = dims[i + 1]
            if i + 1 in self.latent_in:
                out_dim -= in_dim
            layer = nn.Linear(dims[i], out_dim)
            self.out_features.append(out_dim)
            if cfg.weight_norm and i < cfg.num_layers:
                layer = weight_norm(layer)
            self.layers.append(layer)
        self.num_hidden = cfg.num_layers
        # Feature padding (``model.pad_features_to``): a width such as 253 (512 - 259, the layer before a
        # skip) makes bf16 rows that are not 16-byte aligned, which keeps cuBLAS off its fastest kernels.
        # Zero rows/columns are added in forward only: parameters, their count and the function are unchanged.
        multiple = cfg.pad_features_to
        self.out_pad = [(-width) % multiple if multiple and i + 1 in self.latent_in else 0
                        for i, width in enumerate(self.out_features)]
        self.dropout = cfg.dropout
        self.output_tanh = cfg.output_tanh
        # Compiled, the graph AOTAutograd's cache stores, or the faster step it refuses (model.compile_cacheable;
        # training resolves it per run in train_state.build_state).
        self.cacheable_graph = True

    def _reads_input(self, i: int) -> bool:
        return i == 0 or i in self.latent_in

    def _split_weight(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Layer i as (W_h or None, W_[z|xyz] or None, bias), with the zero padding of the activations."""
        layer = self.layers[i]
        assert isinstance(layer, nn.Linear)
        weight: torch.Tensor = layer.weight  # weight norm recomputes it on access: read it once per forward
        bias: torch.Tensor = layer.bias
        prev = 0 if i == 0 else self.out_features[i - 1]
        w_h = None if i == 0 else weight[:, :prev]
        w_in = weight[:, prev:] if self._reads_input(i) else None
        pad = nn.functional.pad
        if w_h is not None and i > 0 and self.out_pad[i - 1]:
            w_h = pad(w_h, (0, self.out_pad[i - 1]))
        if self.out_pad[i]:
            rows = (0, 0, 0, self.out_pad[i])
            w_h = None if w_h is None else pad(w_h, rows)
            w_in = None if w_in is None else pad(w_in, rows)
            bias = pad(bias, (0, self.out_pad[i]))
        return w_h, w_in, bias

    def _input_term(self, w_in: torch.Tensor, bias: torch.Tensor, latent: torch.Tensor,
                    xyz: torch.Tensor, code_index: torch.Tensor | None = None) -> torch.Tensor:
        """``W_z z + b`` once per code, broadcast against ``W_xyz xyz`` per point (or gathered per point by
        ``code_index``)."""
        codes = latent.reshape(-1, self.latent_size)
        # One small GEMM probes the layer with each code (at xyz = 0) and each unit axis (at z = 0). Its
        # output rows are contiguous, so the per-point sum below reads the axis responses coalesced (a
        # column slice of the weight, read once per element, made the fused kernel 3-4x slower).
        unit_axes = torch.eye(3, dtype=codes.dtype, device=codes.device)
        probes = torch.cat([nn.functional.pad(codes, (0, 3)), nn.functional.pad(unit_axes, (self.latent_size, 0))])
        rows = linear(probes, w_in)
        # The bias is an fp32 parameter: keep the sum in the GEMM's dtype (bf16 under autocast).
        per_code = (rows[:-3] + bias).to(rows.dtype).view(*latent.shape[:-1], w_in.shape[0])
        if code_index is not None:
            per_code = per_code[code_index]
        return (per_code + point_term(xyz, rows[-3:])).to(per_code.dtype)

    def forward(self, latent: torch.Tensor, xyz: torch.Tensor,
                code_index: torch.Tensor | None = None) -> torch.Tensor:
        """``code_index`` (decoding many shapes' points at once): codes ``[B, L]``, points ``[P, 3]``, point p
        decoded with code ``code_index[p]``, values ``[P]``."""
        check_inputs(self.latent_size, latent, xyz, code_index)
        x = xyz  # replaced by layer 0's output
        for i in range(self.num_hidden):
            w_h, w_in, bias = self._split_weight(i)
            if w_in is None:
                assert w_h is not None
                x = linear(x, w_h, bias)
            elif w_h is None:
                x = self._input_term(w_in, bias, latent, xyz, code_index)
            else:
                x = linear(x, w_h) + self._input_term(w_in, bias, latent, xyz, code_index)
            x = relu_dropout(x, self.dropout, self.training, cacheable=self.cacheable_graph)
        out = self.layers[-1]
        assert isinstance(out, nn.Linear)
        x = _output_layer(x, out.weight, out.bias, cacheable=self.cacheable_graph)
        if self.output_tanh:
            x = torch.tanh(x)
        return x.squeeze(-1)


def check_inputs(latent_size: int, latent: torch.Tensor, xyz: torch.Tensor, code_index: torch.Tensor | None) -> None:
    """The decoder's input shapes (:class:`DeepSDFDecoder` and the frozen one): a ValueError naming what came."""
    if latent.shape[-1] != latent_size or xyz.shape[-1] != 3:
        raise ValueError(f"expected latent [..., {latent_size}] and xyz [..., 3], "
                         f"got {tuple(latent.shape)} and {tuple(xyz.shape)}")
    if code_index is not None and (latent.dim() != 2 or code_index.shape != xyz.shape[:-1] or xyz.dim() != 2):
        raise ValueError(f"code_index: expected codes [B, {latent_size}], points [P, 3] and an index [P], "
                         f"got {tuple(latent.shape)}, {tuple(xyz.shape)} and {tuple(code_index.shape)}")


def point_term(xyz: torch.Tensor, axes_3W: torch.Tensor) -> torch.Tensor:
    """``W_xyz xyz`` of an input layer for points ``[..., 3]``, from the layer's responses to the unit axes."""
    if torch.compiler.is_compiling():
        # K = 3: three multiply-adds that compile fuses into the layer's elementwise kernel (in fp32); a GEMM
        # would write and re-read an extra [N, width] tensor (measured: as long as a 512-wide bf16 layer).
        return xyz[..., 0:1] * axes_3W[0] + xyz[..., 1:2] * axes_3W[1] + xyz[..., 2:3] * axes_3W[2]
    return torch.matmul(xyz.to(axes_3W.dtype), axes_3W)


def _output_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cacheable: bool = True) -> torch.Tensor:
    """The 512 -> 1 output layer in fp32, also under bf16 autocast (0.03 % of the FLOPs): with bf16 inputs its
    rounding error (~1e-2) exceeds the surface-band L1 the model is fitting (~5e-3).

    Compiled, it is written as a product and a row sum, which inductor fuses into one reduction that reads the
    bf16 activations once (and, in backward, into the next layer's elementwise kernel); a GEMM needs them cast
    to an fp32 copy first, and its backward writes an fp32 ``[N, 512]`` gradient: about 3 GB of extra memory
    traffic per 512k-sample step. Same products and fp32 accumulation; only the summation order differs.

    ``cacheable``: no autocast context inside a compiled graph (autocast leaves mul, sum and add of fp32 tensors in
    fp32 anyway), since AOTAutograd's cache refuses one (an ``_enter_autocast`` node). The step measured 30.5 ms
    with the context and the dropout's autograd.Function, 31.4 ms without both (model.compile_cacheable).
    """
    compiling = torch.compiler.is_compiling()
    with (contextlib.nullcontext() if compiling and cacheable
          else torch.autocast(device_type=x.device.type, enabled=False)):
        if compiling:
            return (x.to(weight.dtype).unsqueeze(-2) * weight).sum(-1) + bias
        return linear(x.to(weight.dtype), weight, bias)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_sample(cfg: ModelConfig, samples_per_code: int) -> float:
    """Forward+backward FLOPs per SDF sample (6 x multiply-adds) as the decoder executes them when
    ``samples_per_code`` points share a code: the code's share of an input layer is amortised over them."""
    decoder = DeepSDFDecoder(cfg)
    per_sample = per_code = 0
    for i, width in enumerate(decoder.out_features):
        layer = decoder.layers[i]
        assert isinstance(layer, nn.Linear)
        in_features = layer.in_features
        if i < decoder.num_hidden and decoder._reads_input(i):
            per_code += cfg.latent_size * width
            per_sample += (in_features - cfg.latent_size) * width
        else:
            per_sample += in_features * width
    return 6 * (per_sample + per_code / samples_per_code)
