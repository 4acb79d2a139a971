"""Figures (sdf_ray/plots.py, `sdf-ray plot`): hand-made metrics, sweeps and tiny decoders, no Ray."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdf_ray import plots
from sdf_ray.errors import UserError

PIXEL_STD_FLOOR = 10.0  # a blank or single-colour PNG has ~0; a real figure tens


def assert_png(path: Path, size: tuple[float, float]) -> None:
    """A valid PNG of the figure's size (inches x DPI) that is not blank."""
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size == (round(size[0] * plots.DPI), round(size[1] * plots.DPI))
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.std() > PIXEL_STD_FLOOR, f"{path} looks blank (pixel std {pixels.std():.1f})"


def record(step: int, *, skipped: int = 0, total: int = 0, rollbacks: int = 0, restarts: int = 0,
           diverged: int = 0, **extra: float) -> dict:
    loss = 0.1 * math.exp(-step / 10)
    return {"train/loss": math.inf if skipped else loss, "train/l1": loss * 0.9, "train/grad_norm": 3.0 / (1 + step),
            "train/epoch": step / 4, "train/step": step, "train/lr_decoder": 1e-3, "train/lr_latents": 2e-3,
            "perf/samples_per_s": 1.5e5, "guard/skipped_steps": total, "guard/interval_skipped_steps": skipped,
            "guard/rollbacks": rollbacks, "restarts": restarts, "diverged": diverged, **extra}


def eventful_run() -> list[dict]:
    """logging.every_n_steps = 1, a checkpoint every 4 steps. Steps 3, 9 and 10 are skipped; the guard rolls back
    at step 10 to the checkpoint of step 8; after step 14 a worker dies and the group resumes from step 12."""
    records, total = [], 0
    for step in range(1, 11):  # steps executed 1..10
        skipped = int(step in (3, 9, 10))
        total += skipped
        records.append(record(step, skipped=skipped, total=total, rollbacks=int(step == 10)))
    for step in range(9, 15):  # re-run from the checkpoint at 8: steps executed 11..16
        records.append(record(step, total=total, rollbacks=1))
    for step in range(13, 21):  # restarted from the checkpoint at 12: steps executed 17..24
        records.append(record(step, total=total, rollbacks=1, restarts=1))
    return records


def write_run(directory: Path, records: list[dict], grad_clip: float = 1.0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "config.yaml").write_text(f"guard:\n  enabled: true\n  grad_clip: {grad_clip}\n")
    return directory


# ---------------------------------------------------------------------------------------------
# Training


def test_events_are_marked_where_the_metrics_put_them(tmp_path):
    records = eventful_run()
    run = write_run(tmp_path / "run", records)
    (run / "summary.json").write_text(json.dumps({"status": "finished", "steps": 20, "final_loss": 0.01,
                                                  "skipped_steps": 3, "rollbacks": 1, "restarts": 1}))
    result = plots.plot_training(run)
    assert result.path == run / "plots" / "training.png"
    assert_png(result.path, (12.0, 8.4))

    timeline = plots.training_timeline(records)
    x = timeline.x
    assert list(x) == list(range(1, len(records) + 1))  # every_n_steps = 1: one step executed per report
    # Skips: the reports with guard/interval_skipped_steps > 0, at those steps executed.
    expected_skips = [x[i] for i, r in enumerate(records) if r["guard/interval_skipped_steps"] > 0]
    assert result.events.skip_steps == (3, 9, 10) == tuple(expected_skips)
    assert result.events.skip_counts == (1, 1, 1)
    assert sum(result.events.skip_counts) == records[-1]["guard/skipped_steps"]
    # The rollback: where guard/rollbacks grows (train/step then jumps back from 10 to 9).
    assert result.events.rollback_steps == (10,)
    assert records[10]["train/step"] < records[9]["train/step"]
    # The restart: where `restarts` grows, at the start of the restarted group's first interval.
    first_after = next(i for i, r in enumerate(records) if r["restarts"] == 1)
    assert result.events.restart_steps == (16,) == (x[first_after - 1],)
    assert result.events.diverged_step is None


def test_steps_executed_count_the_re_run_steps_with_coarse_logging():
    # every_n_steps = 2, checkpoints at 4 and 8; rollback reported at step 12 restores step 8; the next report
    # is step 10, two steps later. A resumed `sdf-ray train` (restarts back to 0) is no restart.
    steps = [2, 4, 6, 8, 10, 12, 10, 12, 14, 16]
    rollbacks = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    restarts = [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    records = [record(s, rollbacks=rb, restarts=rs) for s, rb, rs in zip(steps, rollbacks, restarts)]
    records[-1]["diverged"] = 1
    timeline = plots.training_timeline(records)
    assert list(timeline.x) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert timeline.events.rollback_steps == (12,)
    assert timeline.events.restart_steps == (16,)
    assert timeline.events.diverged_step == 20
    assert timeline.events.skip_steps == ()


def test_training_plot_with_validation_and_clipping_off(tmp_path):
    records = [record(s, **({"val/sdf_l1": 0.02 / s, "val/chamfer_l2": 1e-3 / s, "perf/val_seconds": 0.5}
                            if s % 5 == 0 else {})) for s in range(1, 21)]
    records[-1]["diverged"] = 1
    run = write_run(tmp_path / "run", records, grad_clip=0.0)
    result = plots.plot_training(run)
    assert_png(result.path, (12.0, 8.4))
    assert result.events.diverged_step == 20


def test_write_training_plot_warns_instead_of_raising(tmp_path, monkeypatch, caplog):
    run = write_run(tmp_path / "run", eventful_run())

    def broken(*args, **kwargs):
        raise RuntimeError("the renderer exploded")

    monkeypatch.setattr(plots, "plot_training_records", broken)
    with caplog.at_level(logging.WARNING, logger="sdf_ray"):
        assert plots.write_training_plot(run) is None
    assert "the renderer exploded" in caplog.text
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="sdf_ray"):
        assert plots.write_training_plot(tmp_path / "empty") is None
        assert plots.write_sweep_plot(tmp_path / "empty") is None


# ---------------------------------------------------------------------------------------------
# The command


def run_command(*argv: str) -> int:
    from sdf_ray import plot_command

    parser = argparse.ArgumentParser(prog="sdf-ray")
    plot_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plot", *argv])
    code: int = args.func(args)
    return code


def test_plot_command_prints_what_it_wrote_and_refuses_bad_input(tmp_path, capsys):
    run = write_run(tmp_path / "run", eventful_run())
    assert run_command(str(run)) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'plots' / 'training.png'}"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="neither a run directory"):
        run_command(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="no such directory"):
        run_command(str(tmp_path / "missing"))
    write_run(tmp_path / "no-metrics", [])
    with pytest.raises(UserError, match="no metrics yet"):
        run_command(str(tmp_path / "no-metrics"))
    with pytest.raises(UserError, match="no checkpoint"):
        run_command(str(run), "--slices")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "metrics.jsonl").write_text("{not json\n" + json.dumps(record(1)) + "\n")
    with pytest.raises(UserError, match="line 1 is not JSON"):
        run_command(str(tmp_path / "garbled"))
    # A run being written right now: its half-written last line is left out.
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"train/loss": 0.0')
    assert run_command(str(run)) == 0
    with pytest.raises(UserError, match="add --slices"):
        run_command(str(run), "--scenes", "0")


def test_the_plots_module_imports_neither_ray_nor_torch():
    code = "import sys, sdf_ray.plots, sdf_ray.plot_command; sys.exit(1 if {'ray', 'torch'} & set(sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------------------------
# Sweeps

TRIALS = [  # id, decoder_lr, grad_clip, status, last metric
    ("a0001", 3e-4, 1.0, "finished", 0.012),
    ("a0002", 1e-3, 0.1, "finished", 0.008),
    ("a0003", 3e-5, 10.0, "pruned_asha", 0.05),
    ("a0004", 0.3, 0.0, "pruned_diverged", None),
    ("a0005", 3e-3, 1.0, "pruned_collapsed", 0.104),
]


def write_sweep(directory: Path, *, metric: str = "train/loss", with_record: bool = True) -> Path:
    """The files `sdf-ray tune` writes (tuning/sweep.py write_outputs), with each trial's metrics.jsonl."""
    directory.mkdir(parents=True)
    rows = []
    for trial_id, lr, clip, status, last in TRIALS:
        rows.append({"trial_id": trial_id, "optim.decoder_lr": lr, "guard.grad_clip": clip, "status": status,
                     f"best_{metric}": last, f"last_{metric}": last, "iterations": 8, "steps": 16,
                     "skipped_steps": 8 if status == "pruned_diverged" else 0,
                     "reason": "loss is not finite" if status == "pruned_diverged" else ""})
        reports = 3 if status == "pruned_diverged" else 8 if status != "pruned_asha" else 4
        curve = []
        for i in range(1, reports + 1):
            value = math.inf if status == "pruned_diverged" and i == reports else \
                0.104 if status == "pruned_collapsed" else (last or 0.1) * (1 + 4 / i)
            curve.append(record(2 * i) | {metric: value})
        write_run(directory / "trials" / f"trial-{trial_id}", curve)
    with (directory / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (directory / "tune_summary.json").write_text(json.dumps(
        {"name": directory.name, "metric": metric, "mode": "min", "best_trial_id": "a0002"}))
    if with_record:
        (directory / "sweep.yaml").write_text(
            "config: {}\nsearch:\n  space:\n    optim.decoder_lr: {loguniform: [1.0e-5, 1.0]}\n"
            "    guard.grad_clip: {choice: [0, 0.1, 1, 10]}\n")
    return directory


def test_sweep_plot(tmp_path, capsys):
    sweep_dir = write_sweep(tmp_path / "stability")
    sweep = plots.load_sweep(sweep_dir)
    assert [p.key for p in sweep.params] == ["optim.decoder_lr", "guard.grad_clip"]
    assert sweep.params[0].kind == "loguniform" and sweep.best_trial_id == "a0002"
    assert {t.status for t in sweep.trials} == {"finished", "pruned_asha", "pruned_diverged", "pruned_collapsed"}
    assert all(t.curve_y.size for t in sweep.trials)
    assert run_command(str(sweep_dir)) == 0
    out = sweep_dir / "plots" / "sweep.png"
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert_png(out, (5.6 + 4.6, 4.6))
    with pytest.raises(UserError, match="sweep directory"):
        run_command(str(sweep_dir), "--slices")


def test_sweep_plot_without_its_record_and_with_categorical_params(tmp_path):
    sweep_dir = write_sweep(tmp_path / "s", metric="val/sdf_l1", with_record=False)
    # Like tuning/configs/tiny.yaml: a list-valued parameter (JSON in trials.csv) next to a number.
    text = (sweep_dir / "trials.csv").read_text().replace(",1.0,", ',"[{""step"": 2, ""rank"": 0}]",', 2)
    (sweep_dir / "trials.csv").write_text(text)
    sweep = plots.load_sweep(sweep_dir)
    assert sweep.metric == "val/sdf_l1"
    assert [p.key for p in sweep.params] == ["optim.decoder_lr", "guard.grad_clip"]
    assert plots.plot_sweep(sweep_dir) == sweep_dir / "plots" / "sweep.png"
    assert_png(sweep_dir / "plots" / "sweep.png", (5.6 + 4.6, 4.6))
    (tmp_path / "empty-sweep").mkdir()
    (tmp_path / "empty-sweep" / "trials.csv").write_text("")
    with pytest.raises(UserError, match="lists no trials"):
        plots.plot_sweep(tmp_path / "empty-sweep")


# ---------------------------------------------------------------------------------------------
# SDF slices


def sphere(radius: float):
    return lambda p: np.linalg.norm(p, axis=1) - radius


def test_sdf_slices_from_callables_and_arrays(tmp_path):
    arrays = plots.evaluate_planes(sphere(0.4), 32)
    assert arrays.shape == (3, 32, 32)
    scenes = [plots.SliceScene("sphere", sphere(0.5), truth=sphere(0.45)),
              plots.SliceScene("precomputed", arrays),
              plots.SliceScene("no truth", sphere(0.3))]
    out = plots.plot_sdf_slices(scenes, tmp_path / "slices.png", resolution=32)
    assert_png(out, (1.75 * 6 + 1.2, 1.75 * 3 + 0.9))
    points = plots.plane_points(5)
    assert np.all(points[0, :, :, 2] == 0) and np.all(points[1, :, :, 1] == 0) and np.all(points[2, :, :, 0] == 0)


def test_run_slices_from_a_checkpoint_with_exact_ground_truth(tmp_path):
    import torch

    from sdf_ray import config as C
    from sdf_ray.data.format import read_manifest
    from sdf_ray.data.synth import synth_dataset, synth_scene
    from sdf_ray.model import DeepSDFDecoder

    data = tmp_path / "data"
    synth_dataset(data, num_scenes=3, samples_per_scene=64, seed=5)
    manifest = read_manifest(data)
    # The exact SDF rebuilt from the manifest's source equals the stored samples' SDF.
    for i, scene in enumerate(manifest.scenes):
        truth = plots.synth_ground_truth(manifest.source, scene.name, i)
        assert truth is not None
        samples = synth_scene(i, 5, 64)
        rows = np.concatenate([samples.pos_N4, samples.neg_N4])
        np.testing.assert_allclose(truth(rows[:, :3].astype(np.float64)), rows[:, 3], atol=1e-6)
    assert plots.synth_ground_truth({"type": "deepsdf"}, "x", 0) is None

    cfg = C.apply_overrides(C.load(C.packaged_config("tiny")), {"data.path": str(data)})
    torch.manual_seed(0)
    decoder = DeepSDFDecoder(cfg.model)
    run = write_run(tmp_path / "run", eventful_run())
    (run / "config.yaml").write_text(C.to_yaml(cfg))
    checkpoint = run / "checkpoint_2025-01-01_00-00-00.000000"
    checkpoint.mkdir()
    torch.save({"decoder": decoder.state_dict(), "latents": torch.randn(3, cfg.model.latent_size) * 0.3},
               checkpoint / "state.pt")
    out = plots.plot_run_slices(run, ["1", manifest.scenes[2].name], resolution=24)
    assert out == run / "plots" / "slices.png"
    assert_png(out, (1.75 * 6 + 1.2, 1.75 * 2 + 0.9))
    with pytest.raises(UserError, match="no scene matches"):
        plots.plot_run_slices(run, ["teapot"], resolution=24)


# ---------------------------------------------------------------------------------------------
# Contact sheet


def uv_sphere(radius: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    theta, phi = np.meshgrid(np.linspace(0.0, np.pi, n), np.linspace(0.0, 2 * np.pi, 2 * n, endpoint=False),
                             indexing="ij")
    verts = radius * np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)
    idx = np.arange(n * 2 * n).reshape(n, 2 * n)
    a, b = idx[:-1], np.roll(idx, -1, axis=1)[:-1]
    c, d = idx[1:], np.roll(idx, -1, axis=1)[1:]
    faces = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    return verts.reshape(-1, 3), faces


def test_contact_sheet(tmp_path):
    verts, faces = uv_sphere(0.5, 24)
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(3000, 3))
    gt = 0.5 * gt / np.linalg.norm(gt, axis=1, keepdims=True)
    box_v = np.array([[x, y, z] for x in (-0.4, 0.4) for y in (-0.3, 0.3) for z in (-0.2, 0.2)])
    box_f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    entries = [plots.SheetEntry("synth-000000-sphere", verts, faces, gt, chamfer=4.2e-4),
               plots.SheetEntry("synth-000001-box", box_v, box_f, None, chamfer=None),
               plots.SheetEntry("synth-000002-torus", None, None, gt, status="empty")]
    out = plots.contact_sheet(entries, tmp_path / "reconstructions.png", columns=2, max_faces=300)
    assert_png(out, (3.3 * 2, 1.9 * 2))
    v, f = plots.decimate(verts, faces, 300)
    assert 0 < len(f) <= 300 and f.max() < len(v)
