"""The CUDA path: no host sync, bit-identical skips, bf16 + compile, a 1-GPU NCCL run through Ray Train."""

from __future__ import annotations

import json

import pytest
import torch

from sdf_ray import config as C
from sdf_ray.config import InjectConfig
from sdf_ray.dist import LocalCollectives
from sdf_ray.train_loop import train_step
from sdf_ray.train_state import build_state
from tests.helpers import assert_bit_identical, fake_batch, state_tensors, tiny_config

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def cuda_batch(cfg, n, seed):
    return tuple(t.to(CUDA) for t in fake_batch(cfg, n, seed=seed))


@pytest.mark.parametrize("compile_", [False, True])
def test_guarded_step_makes_no_host_sync_on_cuda(compile_):
    from sdf_ray.bench import guarded_step_fn, synthetic_scenes

    cfg = C.load(C.packaged_config("deepsdf"), ["optim.precision=bf16", "data.samples_per_scene=1024",
                                                f"model.compile={str(compile_).lower()}"])
    step = guarded_step_fn(cfg, CUDA, synthetic_scenes(128, 512))
    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3, 6):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("site", ["loss", "grad", "latent"])
def test_injected_nan_skips_bit_identically_on_cuda(site):
    cfg = tiny_config(**{"scaling.num_workers": 1, "optim.precision": "bf16"})
    state = build_state(cfg, LocalCollectives(), CUDA, 8)
    train_step(state, *cuda_batch(cfg, 8, 1), reg_weight=0.0)
    before = state_tensors(state)
    verdict, _, _ = train_step(state, *cuda_batch(cfg, 8, 2), reg_weight=0.0,
                               injections=[InjectConfig(step=1, rank=0, site=site)])
    assert bool(verdict.bad)
    assert_bit_identical(before, state_tensors(state))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_bf16_compiled_step_trains(dropout):
    cfg = tiny_config(**{"scaling.num_workers": 1, "optim.precision": "bf16", "model.compile": True,
                         "model.dropout": dropout})
    state = build_state(cfg, LocalCollectives(), CUDA, 8)
    batch = cuda_batch(cfg, 8, 0)
    losses = [float(train_step(state, *batch, reg_weight=0.0)[2]) for _ in range(40)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]


def test_compiled_hashed_mask_is_bit_identical_to_eager_on_cuda():
    """The int64 hash (wrapping multiplies, shifts, masks) means the same in Triton as in eager."""
    from sdf_ray.dropout import hashed_keep_mask

    compiled = torch.compile(hashed_keep_mask)
    for seed in (0, 12345, 2**40 + 7, 2**62 - 1):
        s = torch.tensor(seed, device=CUDA)
        assert torch.equal(compiled(torch.Size([1024, 512]), s, 0.2), hashed_keep_mask(torch.Size([1024, 512]), s, 0.2))


@pytest.mark.ray
def test_one_gpu_run_through_ray_train_with_nccl(ray_session, tiny_dataset, tmp_path):
    from sdf_ray.cli import main

    code = main(["train", "--config", str(C.packaged_config("tiny")), "--set", f"data.path={tiny_dataset}",
                 "--set", f"checkpoint.storage_path={tmp_path}", "--set", "scaling.use_gpu=true",
                 "--set", "scaling.num_workers=1", "--set", "debug.inject=[{step: 3, rank: 0, site: latent}]"])
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert code == 0 and summary["status"] == "finished" and summary["skipped_steps"] == 1


@pytest.mark.ray
def test_a_packed_sweep_runs_four_quarter_gpu_trials_at_once(ray_session, tiny_dataset, tmp_path, capsys):
    """Four single-worker trials at scaling.gpus_per_worker=0.25 share one GPU and train at the same time."""
    from sdf_ray.cli import main

    search_file = tmp_path / "packed.yaml"
    search_file.write_text("space:\n  optim.decoder_lr: {grid: [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3]}\n"
                           "scheduler: fifo\nmax_concurrent_trials: 4\n")
    sets = {"data.path": tiny_dataset, "checkpoint.storage_path": tmp_path / "runs", "scaling.use_gpu": "true",
            "scaling.num_workers": 1, "scaling.gpus_per_worker": 0.25, "optim.num_epochs": 2000,
            "logging.every_n_steps": 1000, "checkpoint.every_n_epochs": 2000}
    args = ["tune", "--config", str(C.packaged_config("tiny")), "--search", str(search_file), "--name", "packed"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "up to 4 at once (1 CPU(s) and 0.25 GPU(s) each)" in out
    directory = tmp_path / "runs" / "packed"
    summary = json.loads((directory / "tune_summary.json").read_text())
    assert summary["status_counts"].get("finished") == 4 and summary["samples_per_s"] > 0
    trials = [json.loads(p.read_text()) for p in (directory / "trials").glob("*/summary.json")]
    assert len(trials) == 4 and {t["device"] for t in trials} == {torch.cuda.get_device_name()}
    # Each trial's training window (first step done -> last step done, wall clock): all four overlap.
    windows = [(t["startup_origin_unix"] + t["startup_marks"]["first_step_done"],
                t["startup_origin_unix"] + t["startup_marks"]["last_step_done"]) for t in trials]
    assert max(start for start, _ in windows) < min(end for _, end in windows), windows


@pytest.mark.parametrize("compile_", [False, True])
def test_two_batches_in_flight_on_cuda_match_one_after_the_other(tmp_path_factory, compile_):
    """The GPU default of ``reconstruct.batches_in_flight`` (2): two threads of one actor, each on a CUDA stream
    of its own, against the same batches one after the other on one thread; from a fresh actor too, whose second
    batch optimises while the first one compiles the decoding graphs."""
    import dataclasses
    import threading

    import numpy as np

    from sdf_ray.shapes.config import from_overrides
    from sdf_ray.shapes.trained_run import load_trained_run
    from sdf_ray.shapes.work import Job, ShapeWorker
    from tests.test_shapes_helpers import FAST, build_shapes_data

    data = build_shapes_data(tmp_path_factory)
    run = load_trained_run(data.run)
    cfg = dataclasses.replace(from_overrides(FAST[1::2]), precision="bf16", compile=compile_, shapes_per_batch=2)
    job = Job("reconstruct", str(tmp_path_factory.mktemp("inflight")), str(data.heldout), cfg,
              run.config.loss.clamp_dist, run.latent_size)
    worker = ShapeWorker(run.decoder_payload(), job, "cuda")
    batches = [[0, 2], [1]]
    alone = [worker.run(b) for b in batches]

    def in_two_threads(worker: ShapeWorker) -> list:
        together: list = [None, None]
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, worker.run(batches[i])))
                   for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return together

    warm = in_two_threads(worker)
    fresh = in_two_threads(ShapeWorker(run.decoder_payload(), job, "cuda"))
    for a_batch, t_batch in zip(alone + alone, warm + fresh):
        assert t_batch is not None
        for a, t in zip(a_batch, t_batch):
            assert a.status == t.status == "ok"
            np.testing.assert_array_equal(a.code, t.code)
            assert a.grid is not None and t.grid is not None
            np.testing.assert_array_equal(a.grid.block_mask, t.grid.block_mask)
            np.testing.assert_array_equal(a.grid.fine_values, t.grid.fine_values)


def test_hand_written_code_gradient_matches_autograd_on_cuda():
    """The reconstruction step on the GPU: the hand-written gradient (cuBLASLt's fused bias + ReLU epilogue) against
    autograd through the DeepSDF-size decoder in fp32, and the compiled bf16 step against the eager one."""
    from sdf_ray.model import DeepSDFDecoder
    from sdf_ray.shapes.frozen_decoder import FrozenDecoder, clamped_l1_and_code_gradient
    from sdf_ray.shapes.reconstruct import freeze

    torch.manual_seed(0)
    decoder = freeze(DeepSDFDecoder(C.TrainConfig().model).to(CUDA))
    z = torch.randn(4, 256, device=CUDA) * 0.01
    xyz = torch.rand(4, 2000, 3, device=CUDA) * 2 - 1
    sdf = (xyz.norm(dim=-1) - 0.5).clamp(-0.1, 0.1)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        z_in = z.clone().requires_grad_(True)
        pred = decoder(z_in.unsqueeze(1), xyz)
        loss = (pred.clamp(-0.1, 0.1) - sdf).abs().mean(dim=1) + 1e-4 * z_in.pow(2).mean(dim=1)
        (want,) = torch.autograd.grad(loss.sum(), z_in)
        got_loss, got = clamped_l1_and_code_gradient(FrozenDecoder(decoder, torch.float32), z, xyz, sdf, 0.1, 1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    bf16 = FrozenDecoder(decoder, torch.bfloat16)
    eager = clamped_l1_and_code_gradient(bf16, z, xyz, sdf, 0.1, 1e-4)
    compiled = torch.compile(clamped_l1_and_code_gradient, dynamic=False)(bf16, z, xyz, sdf, 0.1, 1e-4)
    torch.testing.assert_close(compiled[0], eager[0], rtol=2e-2, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(compiled[1], want, dim=1)
    assert (cos > 0.98).all(), cos


@pytest.fixture
def fused_kernel_only(monkeypatch):
    """The fused kernel, with any fallback to torch's ops an error: a test of the kernel must run the kernel."""
    from sdf_ray.shapes import fused_backward as fb

    if not fb.available(CUDA, torch.bfloat16):
        pytest.skip("the fused kernel needs Triton and an sm90+ GPU")
    monkeypatch.setattr(fb, "_failed", {})

    def no_fallback(*args):
        raise AssertionError(f"mm_relu_grad fell back to torch's ops: {fb._failed}")

    monkeypatch.setattr(fb, "_torch_ops", no_fallback)
    return fb


@pytest.mark.parametrize("rows, n, k, wide", [(4096, 512, 512, False), (4096, 512, 256, False),
                                              (4096, 256, 512, False), (1000, 512, 512, False),
                                              (1000, 256, 512, True), (1000, 200, 96, True)])
def test_the_fused_relu_backward_kernel_is_the_gemm_then_the_mask_on_cuda(fused_kernel_only, rows, n, k, wide):
    """The Triton kernel (the decoder's three backward shapes, ragged edges, an activation that is a slice of a
    wider buffer) against float64 and torch's ops."""
    fb = fused_kernel_only
    torch.manual_seed(0)
    g = torch.randn(rows, n, device=CUDA).bfloat16()
    w = (torch.randn(n, k, device=CUDA) / n ** 0.5).bfloat16()
    h = torch.randn(rows, k + (64 if wide else 0), device=CUDA).clamp(min=-0.5).bfloat16()[:, :k]
    h[::3, ::2] = 0.0  # positive, negative and exactly zero activations
    assert fb.fits(g, w, h) and h.stride(0) == k + (64 if wide else 0)
    got = fb.mm_relu_grad(g, w, h)
    want = (g.double() @ w.double()) * (h > 0)
    assert (got[h <= 0] == 0).all()
    scale = want.abs().max().item()
    # fp32 accumulation rounded once to bf16 (8 bits): the error of torch's GEMM, not more
    torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-3 * scale)
    torch.testing.assert_close(got, torch.ops.aten.threshold_backward(torch.mm(g, w), h, 0), rtol=2 ** -7,
                               atol=2e-3 * scale)


def test_the_fused_backward_code_gradient_equals_the_unfused_one_on_cuda(fused_kernel_only):
    """The reconstruction step's code gradient through the fused kernel, eager and compiled, against the same
    decoder's GEMM-then-mask backward."""
    from sdf_ray.model import DeepSDFDecoder
    from sdf_ray.shapes.frozen_decoder import FrozenDecoder, clamped_l1_and_code_gradient
    from sdf_ray.shapes.reconstruct import freeze

    torch.manual_seed(0)
    decoder = freeze(DeepSDFDecoder(C.TrainConfig().model).to(CUDA))
    fused = FrozenDecoder(decoder, torch.bfloat16)
    assert fused.fused_backward
    plain = FrozenDecoder(decoder, torch.bfloat16, fused=False)
    z = torch.randn(8, 256, device=CUDA) * 0.01
    xyz = torch.rand(8, 2048, 3, device=CUDA) * 2 - 1
    sdf = (xyz.norm(dim=-1) - 0.5).clamp(-0.1, 0.1)
    want_loss, want = clamped_l1_and_code_gradient(plain, z, xyz, sdf, 0.1, 1e-4)
    step = torch.compile(clamped_l1_and_code_gradient, dynamic=False)
    for loss, grad in (clamped_l1_and_code_gradient(fused, z, xyz, sdf, 0.1, 1e-4),
                       step(fused, z, xyz, sdf, 0.1, 1e-4)):
        torch.testing.assert_close(loss, want_loss, rtol=5e-3, atol=1e-4)
        torch.testing.assert_close(grad, want, rtol=5e-3, atol=5e-3 * want.abs().max().item())


@pytest.mark.parametrize("compile_", [False, True])
def test_grids_of_a_batch_equal_each_shape_decoded_alone_on_cuda(tmp_path_factory, compile_):
    """Grid decoding plans and decodes a batch's shapes together (shared decoder calls, a code index): on the GPU,
    in bf16, each shape's grid equals the one decoded for that shape alone (padded calls, as the actors make them:
    the same GEMM shapes either way)."""
    import dataclasses

    import numpy as np

    from sdf_ray.shapes.config import ReconstructConfig
    from sdf_ray.shapes.decode import decode_sparse_grids
    from sdf_ray.shapes.meshing import GridSpec
    from sdf_ray.shapes.reconstruct import freeze, prepare
    from sdf_ray.shapes.trained_run import build_decoder, load_trained_run
    from tests.test_shapes_helpers import build_shapes_data

    run = load_trained_run(build_shapes_data(tmp_path_factory).run)
    cfg = dataclasses.replace(ReconstructConfig(), precision="bf16")
    prepared = prepare(freeze(build_decoder(run.decoder_payload(), CUDA)), cfg, 0.1, compile=compile_)
    codes = run.latents_NL[:3].to(CUDA)
    spec = GridSpec(64, 8, 2.0)
    static = 3
    together = decode_sparse_grids(prepared.decode, codes, spec, "bf16", 4096, static)
    for b, grid in enumerate(together):
        alone = decode_sparse_grids(prepared.decode, codes[b:b + 1], spec, "bf16", 4096, static)[0]
        np.testing.assert_array_equal(grid.block_mask, alone.block_mask)
        np.testing.assert_array_equal(grid.coarse_values, alone.coarse_values)
        np.testing.assert_allclose(grid.fine_values, alone.fine_values, rtol=0, atol=1e-6)
        assert grid.num_mid == alone.num_mid and 0 < grid.fine_values.size < 64 ** 3
