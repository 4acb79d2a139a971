"""Builders shared by the tests of ``sdf_ray.shapes`` (no tests here, no Ray)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from sdf_ray import config as C
from sdf_ray.data.format import SCHEMA, SceneSamples, read_manifest, write_dataset
from sdf_ray.model import DeepSDFDecoder

TINY_MODEL = {"latent_size": 8, "hidden_dim": 32, "num_layers": 4, "latent_in_layers": [2], "dropout": 0.0}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: on a busy 2-core CI machine, two spinning OpenMP threads make a tiny net 20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_decoder(seed: int = 0) -> DeepSDFDecoder:
    torch.manual_seed(seed)
    return DeepSDFDecoder(C.from_dict({"model": TINY_MODEL}).model)


def sphere_scene(name: str, radius: float, num_samples: int, seed: int,
                 normalization: dict[str, Any] | None = None, num_surface: int = 2000) -> SceneSamples:
    """Samples of a sphere of ``radius`` at the origin (normalised frame), half near the surface."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(num_samples, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    r = np.concatenate([radius + rng.normal(scale=0.05, size=num_samples // 2),
                        rng.uniform(0, 1.2, size=num_samples - num_samples // 2)])
    xyz = (d * r[:, None]).astype(np.float32)
    sdf = (np.linalg.norm(xyz.astype(np.float64), axis=1) - radius).astype(np.float32)
    rows = np.concatenate([xyz, sdf[:, None]], axis=1)
    norm = normalization or {"offset": [0.0, 0.0, 0.0], "scale": 1.0}
    # ground truth in the ORIGINAL frame: normalised = (original + offset) * scale
    n = rng.normal(size=(num_surface, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    surface = n * radius / norm["scale"] - np.asarray(norm["offset"])
    return SceneSamples(name=name, pos_N4=rows[sdf > 0], neg_N4=rows[sdf <= 0], normalization=norm,
                        surface_points_M3=surface if num_surface else None,
                        surface_normals_M3=n if num_surface else None)


def sphere_dataset(path: Path, radii: list[float], num_samples: int = 1024, seed: int = 0,
                   num_surface: int = 2000) -> Path:
    scenes = [sphere_scene(f"sphere-{i}", r, num_samples, seed + i, {"offset": [0.1 * i, -0.2, 0.3], "scale": 2.0},
                           num_surface) for i, r in enumerate(radii)]
    write_dataset(path, scenes, {"type": "test-spheres"})
    return path


def inject_nan_rows(dataset: Path, scene_id: int, num_rows: int) -> None:
    """Overwrite the first ``num_rows`` x-coordinates of a scene with NaN (its file keeps its row count)."""
    manifest = read_manifest(dataset)
    entry = manifest.scenes[scene_id]
    path = dataset / entry.file
    table = pq.read_table(path)
    x = table.column("x").to_numpy().copy()
    x[entry.row_offset:entry.row_offset + num_rows] = np.nan
    table = table.set_column(1, "x", [x])
    pq.write_table(table.cast(SCHEMA), path, row_group_size=max(1, table.num_rows))


def make_run(run_dir: Path, dataset: Path, *, steps: int = 300, seed: int = 0, clamp_dist: float = 0.5) -> Path:
    """A run directory as ``sdf-ray train`` leaves it, trained in-process (an auto-decoder, full batch)."""
    from sdf_ray.data.format import load_scenes

    manifest = read_manifest(dataset)
    packed = load_scenes(dataset, list(range(manifest.num_scenes)))
    samples = torch.from_numpy(packed.samples_M4)
    scene_of_row = torch.repeat_interleave(torch.arange(manifest.num_scenes),
                                           torch.from_numpy(packed.pos_count + packed.neg_count))
    decoder = tiny_decoder(seed)
    codes = torch.nn.Parameter(torch.randn(manifest.num_scenes, TINY_MODEL["latent_size"]) * 0.1)
    opt = torch.optim.Adam([{"params": decoder.parameters(), "lr": 3e-3}, {"params": [codes], "lr": 3e-3}])
    with one_thread():
        for _ in range(steps):
            pred = decoder(codes[scene_of_row], samples[:, :3])
            loss = (pred.clamp(-clamp_dist, clamp_dist) - samples[:, 3].clamp(-clamp_dist, clamp_dist)).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    cfg = C.from_dict({"model": TINY_MODEL, "data": {"path": str(dataset), "scenes_per_step": 2,
                                                     "samples_per_scene": 64},
                       "loss": {"clamp_dist": clamp_dist}, "checkpoint": {"run_name": run_dir.name,
                                                                         "storage_path": str(run_dir.parent)}})
    ckpt = run_dir / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    text = yaml.safe_dump(C.to_dict(cfg), sort_keys=False)
    (run_dir / "config.yaml").write_text(text)
    (ckpt / "config.yaml").write_text(text)
    torch.save({"format_version": 1, "step": steps, "decoder": decoder.state_dict(),
                "latents": codes.detach().clone()}, ckpt / "state.pt")
    return run_dir


@dataclass
class ShapesData:
    train: Path
    """Spheres the run was trained on."""
    heldout: Path
    """Other spheres, with ground truth."""
    run: Path


_built: dict[Path, ShapesData] = {}


def build_shapes_data(tmp_path_factory: pytest.TempPathFactory) -> ShapesData:
    """A tiny run trained on spheres, and held-out spheres to reconstruct: built once per test session, whichever
    shapes test module asks first (each module wraps this in a fixture of its own)."""
    base = tmp_path_factory.getbasetemp()
    if base not in _built:
        root = tmp_path_factory.mktemp("shapes")
        train = sphere_dataset(root / "train", [0.3, 0.4, 0.5, 0.6], num_samples=768)
        heldout = sphere_dataset(root / "heldout", [0.35, 0.55, 0.45], num_samples=768, seed=100)
        run = make_run(root / "runs" / "spheres", train, steps=120)
        _built[base] = ShapesData(train, heldout, run)
    return _built[base]


def cli(argv: list[str]) -> int:
    """Run one of the shapes commands as the CLI would (UserErrors propagate, for the tests to match)."""
    import argparse

    from sdf_ray.shapes.commands import register

    parser = argparse.ArgumentParser(prog="sdf-ray")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


FAST = ["--set", "reconstruct.num_iterations=40", "--set", "reconstruct.samples_per_iteration=256",
        "--set", "reconstruct.mesh_resolution=32", "--set", "reconstruct.num_metric_points=2000",
        "--set", "reconstruct.shapes_per_batch=2", "--set", "reconstruct.lr=0.02",
        "--set", "reconstruct.num_workers=2", "--set", "reconstruct.cpus_per_worker=0.5",
        "--set", "reconstruct.cpus_per_mesh_task=0.5"]
"""Settings that keep a reconstruction of a few tiny shapes to seconds (2 actors on a 2-CPU Ray)."""


class MarksActor:
    """Stands in for an optimiser actor's ``startup_marks`` (tests of ``pipeline._collect_marks``)."""

    def __init__(self, marks: dict[str, float], fail: bool = False) -> None:
        self.marks, self.fail = marks, fail

    def startup_marks(self) -> dict[str, float]:
        if self.fail:
            raise RuntimeError("the actor is gone")
        return self.marks
