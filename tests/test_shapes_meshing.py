"""Coarse-to-fine decoding gives exactly the dense mesh; empty and non-finite grids; frames; PLY."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sdf_ray.data.format import to_normalized, to_original
from sdf_ray.data.synth import synth_shape
from sdf_ray.shapes.decode import _follow_surface, _plan_levels, _refine_blocks, decode_sparse_grids
from sdf_ray.shapes.meshing import (
    GridSpec,
    assemble,
    coarse_points,
    decode_grid,
    extract_mesh,
    fine_points,
    follow_surface,
    plan_levels,
    read_mesh,
    refine_blocks,
    write_ply,
)


def sphere(p: np.ndarray, r: float = 0.5) -> np.ndarray:
    return np.linalg.norm(p, axis=1) - r


def torus(p: np.ndarray) -> np.ndarray:
    q = np.stack([np.hypot(p[:, 0], p[:, 2]) - 0.55, p[:, 1]], axis=1)
    return np.linalg.norm(q, axis=1) - 0.2


SHAPES = {"sphere": sphere, "torus": torus, "synth-1": synth_shape(1, 0).sdf, "synth-4": synth_shape(4, 0).sdf,
          "synth-union": synth_shape(5, 3).sdf}


def same_mesh(fn, spec: GridSpec) -> tuple[bool, int]:
    """(whether ``spec``'s coarse-to-fine mesh of ``fn`` is the dense mesh, face for face and vertex for vertex,
    the points it decoded)."""
    dense = extract_mesh(decode_grid(fn, GridSpec(spec.resolution)))
    grid = decode_grid(fn, spec)
    sparse = extract_mesh(grid)
    assert dense.status == "ok" and dense.mesh is not None
    same = (sparse.mesh is not None and sparse.mesh.faces_F3.shape == dense.mesh.faces_F3.shape
            and np.array_equal(sparse.mesh.faces_F3, dense.mesh.faces_F3)
            and np.array_equal(sparse.mesh.verts_V3, dense.mesh.verts_V3))
    return same, grid.num_decoded


@pytest.mark.parametrize("follow", [True, False])
@pytest.mark.parametrize("stride", [4, 5, 8])
@pytest.mark.parametrize("name", list(SHAPES))
def test_coarse_to_fine_mesh_equals_the_dense_mesh(name, stride, follow):
    n = 64  # 63 cells: every level leaves a partial last block (levels 4 -> 2, 5, and 8 -> 4 -> 2)
    same, decoded = same_mesh(SHAPES[name], GridSpec(n, stride, refine_margin=1.0, follow_surface=follow))
    assert same and decoded < n ** 3


def steep(fn, k: float):
    return lambda p: k * fn(p)


def test_following_the_surface_keeps_the_dense_mesh_where_the_field_is_steeper_than_the_margin():
    """A field 6x steeper than a distance breaks the margin's assumption: with the margin alone, blocks the surface
    crosses between their corners are left out and the mesh has holes; following the surface across block faces
    finds them again (any field: it needs no slope bound, only a block whose corners change sign)."""
    fn = steep(SHAPES["synth-1"], 6.0)
    margin_only, _ = same_mesh(fn, GridSpec(64, 8, refine_margin=1.0, follow_surface=False))
    followed, _ = same_mesh(fn, GridSpec(64, 8, refine_margin=1.0, follow_surface=True))
    assert not margin_only and followed


def test_following_the_surface_decodes_the_same_points_however_flat_the_field():
    """A flat field (a quarter of a distance's slope, like an under-trained decoder) widens the margin's bands; the
    final level then decodes only the blocks the surface crosses, as many as for the distance itself, and the mesh
    stays the dense one."""
    counts = {}
    for follow in (True, False):
        for k in (1.0, 0.25):
            spec = GridSpec(96, 8, 2.0, follow_surface=follow)
            same, _ = same_mesh(steep(SHAPES["torus"], k), spec)
            assert same
            counts[follow, k] = follow_surface(spec, *final_blocks(steep(SHAPES["torus"], k), spec))[1].size
    assert counts[True, 1.0] == counts[True, 0.25]
    assert counts[False, 0.25] > 2.5 * counts[True, 0.25] and counts[False, 1.0] > 1.5 * counts[True, 1.0]


def test_values_beyond_the_training_clamp_read_as_far():
    """A decoder trained on targets clamped at 0.1 returns ~0.1 anywhere farther (here 0.1-0.105). A margin above
    0.1 would refine every block out there; GridSpec.far (the run's clamp) reads those values as far: fewer points,
    the dense mesh."""
    def clamped_torus(p: np.ndarray) -> np.ndarray:
        d = torus(p)
        return np.where(d > 0.1, 0.1 + 0.005 * np.abs(np.sin(40 * p[:, 0])), d)

    spec = GridSpec(64, 8, 2.0)
    assert spec.threshold_at(8) > 0.1
    plain, plain_points = same_mesh(clamped_torus, spec)
    capped, capped_points = same_mesh(clamped_torus, GridSpec(64, 8, 2.0, far=0.1))
    assert plain and capped and capped_points < 0.75 * plain_points


def final_blocks(fn, spec: GridSpec) -> tuple[np.ndarray, object]:
    """(the final level's planned blocks, ``fn``): :func:`follow_surface`'s arguments."""
    return plan_levels(spec, fn(coarse_points(spec)).astype(np.float32), fn)[0], fn


def test_coarse_to_fine_decodes_a_small_fraction_at_high_resolution():
    grid = decode_grid(sphere, GridSpec(160, 4, 2.0))
    assert grid.num_decoded < 0.2 * 160 ** 3
    assert GridSpec(256, 8).block_strides == (8, 4, 2) and GridSpec(256, 5).block_strides == (5,)
    # Halving the blocks level by level decodes fewer points than one level of the same coarse stride would:
    # the last level's band is 2-cell blocks within the margin, not 8-cell ones (a single level: stride 7).
    levels = decode_grid(sphere, GridSpec(160, 8, 2.0)).num_decoded
    single = decode_grid(sphere, GridSpec(160, 7, 2.0)).num_decoded
    assert levels < 0.6 * single


@pytest.mark.parametrize("follow", [True, False])
@pytest.mark.parametrize("stride", [5, 8])
def test_the_device_plan_of_several_shapes_matches_the_cpu_plan_of_each(stride, follow):
    """The device plans the levels of a group of shapes at once (one decoder call per level for all of them) and
    follows their surfaces together: each shape's blocks, points, values and order equal its own CPU plan (a steep
    shape among them, whose surface is followed over several rounds)."""
    spec = GridSpec(48, stride, 2.0, follow_surface=follow)
    fns = [SHAPES["torus"], SHAPES["sphere"], SHAPES["synth-4"], steep(SHAPES["synth-1"], 20.0)]
    coarse = np.stack([fn(coarse_points(spec)).astype(np.float32) for fn in fns])
    for b in range(len(fns)):
        np.testing.assert_array_equal(_refine_blocks(spec, torch.from_numpy(coarse))[b].numpy(),
                                      refine_blocks(spec, coarse[b]))

    def decode(index: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        out = np.empty(len(p), dtype=np.float32)
        for b, fn in enumerate(fns):
            mine = (index == b).numpy()
            out[mine] = fn(p.numpy()[mine])
        return torch.from_numpy(out)

    axis = torch.from_numpy(spec.axis())
    blocks_t, decoded_t = _plan_levels(spec, torch.from_numpy(coarse), axis, decode)
    planned = blocks_t.clone()
    blocks_t, values_t, counts_t = _follow_surface(spec, blocks_t, axis, decode)
    starts = np.cumsum(counts_t.numpy()) - counts_t.numpy()
    grown = 0
    for b, fn in enumerate(fns):
        blocks, decoded = plan_levels(spec, coarse[b], fn)
        np.testing.assert_array_equal(planned[b].numpy(), blocks)
        assert decoded_t[b].item() == decoded and (decoded > 0) == (stride == 8)
        blocks, values = follow_surface(spec, blocks, fn)
        np.testing.assert_array_equal(blocks_t[b].numpy(), blocks)
        assert counts_t[b].item() == len(values) == len(fine_points(spec, blocks))
        np.testing.assert_array_equal(values_t[starts[b]:starts[b] + counts_t[b]].numpy(), values)
        grown += int((blocks & ~planned[b].numpy()).sum())
    assert (grown > 0) == follow


class SphereCodes(nn.Module):
    def forward(self, latent: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        return xyz.norm(dim=-1) - latent[..., 0]


def test_device_decoding_of_several_codes_equals_cpu_decoding():
    spec = GridSpec(40, 4, 2.0)
    codes = torch.tensor([[0.3, 0.0], [0.6, 0.0]])
    grids = decode_sparse_grids(SphereCodes(), codes, spec, "fp32", points_per_forward=5000)
    for grid, r in zip(grids, (0.3, 0.6)):
        ref = decode_grid(lambda p, r=r: np.linalg.norm(p, axis=1) - r, spec)
        np.testing.assert_array_equal(grid.block_mask, ref.block_mask)
        np.testing.assert_allclose(grid.fine_values, ref.fine_values, atol=1e-6)
        a, b = extract_mesh(grid).mesh, extract_mesh(ref).mesh
        assert a is not None and b is not None and a.faces_F3.shape == b.faces_F3.shape


class ShapeRecorder(SphereCodes):
    """SphereCodes that records the input shapes it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()

    def forward(self, latent: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        self.seen.add((tuple(latent.shape), tuple(xyz.shape)))
        return super().forward(latent, xyz)


@pytest.mark.parametrize("per_shape", [True, False])
def test_static_batch_decoding_pads_to_two_input_shapes_and_changes_no_value(per_shape):
    """What a compiled decoder gets (static_batch): padded codes and chunks, the same grids as unpadded; shape by
    shape (CPUs) or the shapes of a group together (GPUs)."""
    spec = GridSpec(40, 4, 2.0)
    recorder = ShapeRecorder()
    for codes in (torch.tensor([[0.3, 0.0], [0.6, 0.0]]), torch.tensor([[0.45, 0.0]])):  # two batch sizes
        padded = decode_sparse_grids(recorder, codes, spec, "fp32", points_per_forward=5000, static_batch=4,
                                     per_shape=per_shape)
        plain = decode_sparse_grids(SphereCodes(), codes, spec, "fp32", points_per_forward=5000)
        assert len(padded) == len(plain) == len(codes)
        for a, b in zip(padded, plain):
            np.testing.assert_array_equal(a.block_mask, b.block_mask)
            np.testing.assert_allclose(a.coarse_values, b.coarse_values, atol=1e-6)
            np.testing.assert_allclose(a.fine_values, b.fine_values, atol=1e-6)  # chunking: rounding only
    # the coarse pass on 4 codes x 1,250-point chunks; then one code x 1,250-point chunks (5000 // 4) per shape, or
    # the points of all shapes in 5,000-point chunks, a code per point (SphereCodes takes no code index)
    levels = ((1, 1, 2), (1, 1250, 3)) if per_shape else ((5000, 2), (5000, 3))
    assert recorder.seen == {((4, 1, 2), (1, 1250, 3)), levels}


@pytest.mark.parametrize("static_batch", [0, 6])
def test_grids_decoded_group_by_group_equal_each_shape_decoded_alone(static_batch, monkeypatch):
    """The GPU path (``per_shape=False``) over several groups (GROUP_POINTS of two shapes here), a shape whose SDF
    never crosses zero among them: each grid equals the CPU decoding of that shape alone."""
    from sdf_ray.shapes import decode

    spec = GridSpec(40, 8, 2.0)
    monkeypatch.setattr(decode, "GROUP_POINTS", 2 * spec.resolution ** 3)
    radii = [0.3, 0.6, 5.0, 0.45, 0.5]  # 5.0: no surface inside the grid
    codes = torch.tensor([[r, 0.0] for r in radii])
    grids = decode_sparse_grids(SphereCodes(), codes, spec, "fp32", points_per_forward=3000,
                                static_batch=static_batch, per_shape=False)
    for grid, r in zip(grids, radii):
        ref = decode_grid(lambda p, r=r: np.linalg.norm(p, axis=1) - r, spec)
        np.testing.assert_array_equal(grid.block_mask, ref.block_mask)
        np.testing.assert_allclose(grid.coarse_values, ref.coarse_values, atol=1e-6)
        np.testing.assert_allclose(grid.fine_values, ref.fine_values, atol=1e-6)
        assert grid.num_mid == ref.num_mid
    assert grids[2].fine_values.size == 0 and grids[1].fine_values.size > 0


@pytest.mark.parametrize("value", [0.3, -0.3])
def test_an_sdf_that_never_crosses_zero_is_empty(value):
    for stride in (1, 4):
        result = extract_mesh(decode_grid(lambda p: np.full(len(p), value), GridSpec(24, stride)))
        assert result.status == "empty" and result.mesh is None


def test_a_sphere_too_small_for_the_grid_is_empty_not_an_error():
    result = extract_mesh(decode_grid(lambda p: sphere(p, 0.01), GridSpec(16, 4)))
    assert result.status == "empty"


def test_non_finite_values_fail_the_shape():
    def nan_near_origin(p: np.ndarray) -> np.ndarray:
        v = sphere(p)
        v[np.linalg.norm(p, axis=1) < 0.45] = np.nan
        return v

    result = extract_mesh(decode_grid(nan_near_origin, GridSpec(24, 4)))
    assert result.status == "failed" and "non-finite" in result.reason


def test_sphere_mesh_is_outward_facing_in_place_and_round_trips(tmp_path):
    result = extract_mesh(decode_grid(sphere, GridSpec(48, 4)))
    mesh = result.mesh
    assert mesh is not None
    r = np.linalg.norm(mesh.verts_V3, axis=1)
    assert np.abs(r - 0.5).max() < 0.01
    tri = mesh.verts_V3[mesh.faces_F3]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert (np.einsum("fd,fd->f", normals, tri.mean(axis=1)) > 0).mean() > 0.99
    write_ply(tmp_path / "a" / "s.ply", mesh.verts_V3, mesh.faces_F3)
    assert (tmp_path / "a" / "s.ply").read_bytes().startswith(b"ply\nformat binary_little_endian")
    back = read_mesh(tmp_path / "a" / "s.ply")
    np.testing.assert_array_equal(back.faces_F3, mesh.faces_F3)
    np.testing.assert_array_equal(back.verts_V3.astype(np.float32), mesh.verts_V3)


def test_frames_are_inverse_of_the_deepsdf_normalisation():
    norm = {"offset": [0.5, -1.0, 2.0], "scale": 0.25}
    p = np.random.default_rng(0).normal(size=(10, 3))
    np.testing.assert_allclose(to_normalized(p, norm), (p + norm["offset"]) * 0.25)
    np.testing.assert_allclose(to_original(to_normalized(p, norm), norm), p)


def test_assemble_marks_cells_where_marching_cubes_reads_them():
    spec = GridSpec(20, 4)
    grid = decode_grid(sphere, spec)
    volume, mask = assemble(grid)
    assert mask is not None and not mask[0].any() and mask.any()
    dense = sphere(coarse_points(GridSpec(20))).reshape(20, 20, 20)
    # every point marching cubes reads (corners of masked cells) holds the true value
    i, j, k = np.nonzero(mask)
    for di in (0, -1):
        for dj in (0, -1):
            for dk in (0, -1):
                np.testing.assert_allclose(volume[i + di, j + dj, k + dk], dense[i + di, j + dj, k + dk], atol=1e-6)


def test_a_compiled_decoder_compiles_once_per_pass_whatever_the_shapes_and_batches():
    """static_batch keeps every input shape and stride fixed: the coarse, mid-level and fine passes of any number
    of shapes, in batches of any size, cost three compilations (beyond that dynamo would recompile per shape
    and, past its limit, fall back to eager)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(SphereCodes(), backend=counter, dynamic=False)
    spec = GridSpec(40, 8, 2.0)
    for codes in (torch.tensor([[0.3, 0.0], [0.6, 0.0], [0.5, 0.0]]), torch.tensor([[0.45, 0.0]])):
        grids = decode_sparse_grids(compiled, codes, spec, "fp32", points_per_forward=4000, static_batch=3)
        for grid, r in zip(grids, codes[:, 0].tolist()):
            ref = decode_grid(lambda p, r=r: np.linalg.norm(p, axis=1) - r, spec)
            np.testing.assert_array_equal(grid.block_mask, ref.block_mask)
            np.testing.assert_allclose(grid.fine_values, ref.fine_values, atol=1e-6)
    assert counter.frame_count <= 2  # [3 codes x coarse chunk] and [a code per point x chunk]
    torch._dynamo.reset()


@pytest.mark.parametrize(("n", "stride"), [(8, 8), (9, 8), (10, 16)])
def test_a_coarse_stride_at_or_above_the_resolution_is_one_block_and_still_exact(n, stride):
    """reconstruct.mesh_resolution can go down to 8 with the default stride of 8: the top level is one block."""
    from sdf_ray.shapes.config import from_overrides

    from_overrides([f"reconstruct.mesh_resolution={n}", f"reconstruct.mesh_coarse_stride={stride}"])
    dense = extract_mesh(decode_grid(sphere, GridSpec(n)))
    sparse = extract_mesh(decode_grid(sphere, GridSpec(n, stride, refine_margin=1.0)))
    assert dense.mesh is not None and sparse.mesh is not None
    np.testing.assert_array_equal(sparse.mesh.faces_F3, dense.mesh.faces_F3)
    np.testing.assert_allclose(sparse.mesh.verts_V3, dense.mesh.verts_V3)
