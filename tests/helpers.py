"""Small builders shared by tests (no Ray)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from sdf_ray import config as C
from sdf_ray.dist import LocalCollectives
from sdf_ray.train_state import TrainState, build_state


def tiny_config(**overrides: Any) -> C.TrainConfig:
    """The packaged tiny config with dotted-key overrides applied and validated."""
    return C.apply_overrides(C.load(C.packaged_config("tiny")), overrides)


def single_process_state(num_scenes: int, **overrides: Any) -> tuple[C.TrainConfig, TrainState]:
    """The tiny config (1 worker, ``overrides`` applied) and its freshly built state on the CPU."""
    cfg = tiny_config(**{"scaling.num_workers": 1, **overrides})
    return cfg, build_state(cfg, LocalCollectives(), torch.device("cpu"), num_scenes)


def fake_batch(cfg: C.TrainConfig, num_scenes_local: int, seed: int = 0, scenes: int | None = None):
    g = torch.Generator().manual_seed(seed)
    b = scenes or cfg.data.scenes_per_step
    s = cfg.data.samples_per_scene
    scene_idx = torch.randint(0, num_scenes_local, (b,), generator=g)
    xyz = torch.rand(b * s, 3, generator=g) * 2 - 1
    sdf = (xyz.norm(dim=1) - 0.5)
    return scene_idx, xyz, sdf


def state_tensors(state) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer-state tensor, cloned, by a stable name."""
    out: dict[str, torch.Tensor] = {}
    for name, p in list(state.decoder_module.named_parameters()) + [("latents", state.latents.codes)]:
        out[name] = p.detach().clone()
        for k, v in state.optimizer.state[p].items():
            out[f"{name}/{k}"] = v.detach().clone()
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


def forget_torch_default_cache_dirs() -> None:
    """Before a test starts a Ray: an earlier test's in-process torch.compile (or import of torch._dynamo) writes
    inductor's default cache directory into os.environ (torch._inductor.runtime.cache_dir_utils.cache_dir); the Ray
    workers would inherit it as if a user had chosen it."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        if os.environ.get(name, "").startswith(os.path.join(tempfile.gettempdir(), "torchinductor_")):
            os.environ.pop(name)
