"""Decoding SDF grids on a device: the torch half of coarse-to-fine meshing (the numpy half is ``meshing``).

The refinement plan (which blocks, which points, in which order) is computed on the device with the same rules
as :mod:`sdf_ray.shapes.meshing`, so a CPU can rebuild the volume from the values alone; a test checks that both
plans agree point for point. Planning on the device keeps the host out of the loop: a 256^3 point mask is
16 M elements, ~0.1 s of numpy per shape, which the per-shape budget of the reconstruction cannot afford.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from sdf_ray.shapes.meshing import GridSpec, SparseGrid, cell_blocks, coarse_points, parent_blocks
from sdf_ray.shapes.reconstruct import decoding_context


@torch.no_grad()
def decode_shared(decoder: nn.Module, codes_BL: torch.Tensor, points_P3: torch.Tensor, precision: str,
                  points_per_forward: int, pad: bool = False) -> torch.Tensor:
    """``[B, P]`` fp32: every code at every point (chunks of about ``points_per_forward`` evaluations).

    ``pad``: the last chunk is padded to a full one (for a compiled decoder: one input shape, one compilation).
    """
    B = codes_BL.shape[0]
    chunk = max(1, points_per_forward // max(B, 1))
    latent = codes_BL.unsqueeze(1)
    out = []
    for start in range(0, points_P3.shape[0], chunk):
        xyz = points_P3[start:start + chunk].contiguous()
        n = xyz.shape[0]
        if pad and n < chunk:
            xyz = torch.cat([xyz, xyz.new_zeros(chunk - n, 3)])
        with decoding_context(decoder, precision, points_P3.device):
            values = decoder(latent, xyz.unsqueeze(0)).float()[:, :n]
        # A CUDA-graphed decoder (compile mode reduce-overhead) overwrites its output on the next call.
        out.append(values.clone() if pad else values)
    if not out:
        return torch.zeros(B, 0, device=points_P3.device)
    return torch.cat(out, dim=1)


def _blocks_to_refine(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`sdf_ray.shapes.meshing.blocks_to_refine` on the device."""
    nb = v.shape[0] - 1
    any_pos = torch.zeros((nb,) * 3, dtype=torch.bool, device=v.device)
    any_neg = torch.zeros_like(any_pos)
    near = torch.zeros_like(any_pos)
    for dx, dy, dz in itertools.product((0, 1), repeat=3):
        corner = v[dx:dx + nb, dy:dy + nb, dz:dz + nb]
        any_pos |= corner > 0
        any_neg |= corner <= 0
        near |= ~(corner.abs() > threshold)
    return (any_pos & any_neg) | near


def _refine_blocks(spec: GridSpec, coarse_values: torch.Tensor) -> torch.Tensor:
    """:func:`sdf_ray.shapes.meshing.refine_blocks` on the device."""
    nc = len(spec.coarse_index())
    return _blocks_to_refine(coarse_values.reshape(nc, nc, nc), spec.margin_abs)


def _corner_points(cells: torch.Tensor) -> torch.Tensor:
    n = cells.shape[0] + 1
    points = torch.zeros((n,) * 3, dtype=torch.bool, device=cells.device)
    for dx, dy, dz in itertools.product((0, 1), repeat=3):
        points[dx:dx + n - 1, dy:dy + n - 1, dz:dz + n - 1] |= cells
    return points


def _level_points(spec: GridSpec, stride: int, mask: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """:func:`sdf_ray.shapes.meshing.level_points` on the device (same C order)."""
    a = axis[torch.as_tensor(spec.level_index(stride), device=axis.device)]
    # contiguous: CUDA's nonzero is column-major, and a compiled decoder specialises on the input's strides
    # (one recompilation per shape's point count, then the recompile limit and eager fallback: seen on an H200).
    return a[torch.nonzero(mask)].contiguous()


def _take3(blocks: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    i = torch.as_tensor(index, device=blocks.device)
    return blocks[i][:, i][:, :, i]


def _plan_levels(spec: GridSpec, coarse_values: torch.Tensor, axis: torch.Tensor,
                 decode: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """:func:`sdf_ray.shapes.meshing.plan_levels` on the device: (final refined blocks, points decoded)."""
    blocks = _refine_blocks(spec, coarse_values)
    decoded = 0
    strides = spec.block_strides
    for parent, stride in zip(strides, strides[1:]):
        candidates = _take3(blocks, parent_blocks(spec, stride, parent))
        points = _corner_points(candidates)
        coords = _level_points(spec, stride, points, axis)
        values = torch.full(points.shape, float("nan"), device=axis.device)
        if len(coords):
            values[points] = decode(coords)
        decoded += len(coords)
        blocks = candidates & _blocks_to_refine(values, spec.margin_at(stride))
    return blocks, decoded


def _fine_points(spec: GridSpec, block_mask: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """:func:`sdf_ray.shapes.meshing.fine_points` on the device (same C order)."""
    cells = _take3(block_mask, cell_blocks(spec))
    return _level_points(spec, 1, _corner_points(cells), axis)


@torch.no_grad()
def decode_sparse_grids(decoder: nn.Module, codes_BL: torch.Tensor, spec: GridSpec, precision: str,
                        points_per_forward: int, static_batch: int = 0) -> list[SparseGrid]:
    """Coarse grids of all codes in shared forwards, then each shape's refinement levels and its fine points;
    CPU numpy results.

    ``static_batch`` (a compiled decoder): the coarse pass runs on this many codes (the extra ones repeat the
    first) and every chunk is padded, so the decoder sees two input shapes in all; the per-shape passes go in
    chunks of a quarter of ``points_per_forward`` to keep the padding of each pass's last chunk small.
    """
    device = codes_BL.device
    B = codes_BL.shape[0]
    pad = static_batch > 0
    coarse_codes = codes_BL
    if B < static_batch:
        coarse_codes = torch.cat([codes_BL, codes_BL[:1].expand(static_batch - B, -1)])
    coarse_pts = torch.from_numpy(coarse_points(spec)).to(device)
    coarse = decode_shared(decoder, coarse_codes, coarse_pts, precision, points_per_forward, pad)[:B]
    if spec.dense:
        empty_blocks = np.zeros((0, 0, 0), dtype=bool)
        return [SparseGrid(spec, c.cpu().numpy(), empty_blocks, np.zeros(0, dtype=np.float32)) for c in coarse]
    axis = torch.from_numpy(spec.axis()).to(device)
    chunk = max(1024, points_per_forward // 4) if pad else points_per_forward
    grids = []
    for b in range(B):
        code = codes_BL[b:b + 1]

        def decode(points: torch.Tensor, code: torch.Tensor = code) -> torch.Tensor:
            return decode_shared(decoder, code, points, precision, chunk, pad)[0]

        blocks, num_mid = _plan_levels(spec, coarse[b], axis, decode)
        fine = decode(_fine_points(spec, blocks, axis))
        grids.append(SparseGrid(spec, coarse[b].cpu().numpy(), blocks.cpu().numpy(), fine.cpu().numpy(), num_mid))
    return grids
