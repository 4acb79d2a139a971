"""The compiled graphs of training and reconstruction are ones AOTAutograd's cache accepts.

A warm compile cache only skips tracing, pattern-matching and partitioning the joint graph when AOTAutograd's cache
takes the graph; it refuses graphs that hold an autograd.Function or an autocast context (measured on an H200: a
warm first training step 6.8 s with the refusal, docs/performance.md). The truth here is torch's own check
(``check_cacheable``, what the cache runs on the graph dynamo hands it), applied to the graphs dynamo captures from
sdf-ray's code; the controls show it refuses what the faster step (``model.compile_cacheable: false``) holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

from sdf_ray import config as config_mod
from sdf_ray.dropout import _ScaleWhereKept
from sdf_ray.model import DeepSDFDecoder
from sdf_ray.shapes.frozen_decoder import FrozenDecoder, clamped_l1_and_code_gradient
from sdf_ray.shapes.reconstruct import decoding_context

cache = pytest.importorskip("torch._functorch._aot_autograd.autograd_cache")
L = 16


def _refusals(fn: Callable[..., Any], *args: Any) -> list[str]:
    """Why AOTAutograd's cache would refuse each graph dynamo captures from ``fn(*args)`` (empty: all accepted)."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    assert graphs, "dynamo captured no graph"
    refusals = []
    for gm in graphs:
        try:
            cache.check_cacheable(gm)
        except cache.BypassAOTAutogradCache as exc:
            refusals.append(str(exc))
    return refusals


def _decoder() -> DeepSDFDecoder:
    torch.manual_seed(0)
    cfg = dataclasses.replace(config_mod.TrainConfig().model, latent_size=L, hidden_dim=48, num_layers=5,
                              latent_in_layers=(2,), dropout=0.2)
    return DeepSDFDecoder(cfg)


def _inputs(batch: int = 4, samples: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 1, L), torch.rand(batch, samples, 3) * 2 - 1


@pytest.mark.parametrize("cacheable", [True, False])
def test_the_training_forward_with_dropout_under_bf16_autocast_is_cacheable_when_asked(cacheable):
    """``model.compile_cacheable``: the cacheable spelling is accepted; the faster one is refused (the trade-off)."""
    decoder = _decoder().train()
    decoder.cacheable_graph = cacheable
    codes, xyz = _inputs()

    def forward(codes: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        return decoder(codes, xyz)

    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        refusals = _refusals(forward, codes.requires_grad_(True), xyz)
    assert (refusals == []) is cacheable, refusals


def test_the_reconstruction_step_and_decoding_are_cacheable():
    frozen = FrozenDecoder(_decoder().eval(), torch.bfloat16)
    codes, xyz = _inputs()
    sdf = torch.randn(4, 64) * 0.05

    def step(z: torch.Tensor, xyz: torch.Tensor, sdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return clamped_l1_and_code_gradient(frozen, z, xyz, sdf, 0.1, 1e-4)

    assert _refusals(step, codes[:, 0], xyz, sdf) == []

    def decode(latent: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        with decoding_context(frozen, "bf16", xyz.device):
            return frozen(latent, xyz)

    assert _refusals(decode, codes, xyz) == []


def test_the_frozen_decoder_under_autocast_still_computes_in_its_own_dtypes():
    """Called under bf16 autocast anyway (a user's code may), it switches autocast off inside: same values."""
    frozen = FrozenDecoder(_decoder().eval(), torch.float32)
    codes, xyz = _inputs()
    plain = frozen(codes, xyz)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = frozen(codes, xyz)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)


@pytest.mark.parametrize("construct", ["autograd.Function", "autocast context"])
def test_the_check_refuses_the_faster_steps_constructs(construct):
    """The controls: the dropout's autograd.Function and an autocast context (model.compile_cacheable=false)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        if construct == "autograd.Function":
            return _ScaleWhereKept.apply(x, torch.ones_like(x, dtype=torch.bool), 1.0) * 2
        with torch.autocast(device_type="cpu", enabled=False):
            return torch.relu(x) * 2

    assert _refusals(fn, torch.randn(8, 4, requires_grad=True)) != []
