"""The fidelity study: does bf16 + compile, the guard, or NaN/Inf injection cost held-out accuracy?

Every variant is a sequence of plain ``sdf-ray`` commands (printed before they run), executed in one Python
process so that one Ray instance serves them all (``connect_ray`` joins the session the first command started).
Each variant trains the reference decoder on generated shapes, reconstructs the held-out set
(``sdf-ray reconstruct``) and meshes the first training scenes from their learned codes (``sdf-ray mesh``);
both write Chamfer-L2 per shape against exact ground-truth surface samples.

    python docs/fidelity/fidelity.py --work /tmp/fid --variants fp32-s0 bf16c-s0 ...   # prints a JSON line per variant
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from sdf_ray.cli import main
from sdf_ray.config import packaged_config

TRAIN_SCENES, HELD_OUT_SCENES, SAMPLES = 256, 32, 16384
MEASURED_TRAINING_SCENES = 32
# Reference decoder and loss (sdf_ray/configs/deepsdf.yaml) on 256 shapes: 4 steps per epoch.
COMMON = ["data.scenes_per_step=64", "data.samples_per_scene=8192", "optim.num_epochs=150",
          "optim.lr_step_every_n_epochs=100", "checkpoint.every_n_epochs=150", "logging.every_n_steps=50",
          "logging.tensorboard=false"]
FAST = ["optim.precision=bf16", "model.compile=true"]
VARIANTS: dict[str, list[str]] = {
    "fp32-s0": ["optim.precision=fp32", "data.seed=0"],
    "fp32-s1": ["optim.precision=fp32", "data.seed=1"],
    "bf16c-s0": [*FAST, "data.seed=0"],
    "bf16c-s1": [*FAST, "data.seed=1"],
    "bf16c-s2": [*FAST, "data.seed=2"],
    "bf16c-guardoff-s0": [*FAST, "data.seed=0", "guard.enabled=false", "guard.grad_clip=0"],
    # 18 of 600 steps (3 %) get a NaN or an Inf on rank 0 (loss, decoder gradient or latent gradient).
    "bf16c-inject-s0": [*FAST, "data.seed=0", "debug.inject=[" + ", ".join(
        f"{{step: {s}, rank: 0, site: {site}, value: {v}}}"
        for s, site, v in zip(range(17, 600, 33), ["loss", "grad", "latent"] * 6, ["nan", "inf"] * 9)) + "]"],
}


def run(argv: list[str]) -> int:
    print("$ sdf-ray " + " ".join(shlex.quote(a) for a in argv), flush=True)
    return main(argv)


def chamfer(summary_path: Path) -> dict[str, float]:
    s = json.loads(summary_path.read_text())
    x = s.get("chamfer_l2_x1e3") or {}
    return {"mean": x.get("mean"), "median": x.get("median"), "ok": s["counts"].get("ok", 0),
            "shapes": s["num_shapes"]}


def main_(args: argparse.Namespace) -> None:
    work = Path(args.work)
    data, held_out = work / "data", work / "held-out"
    if not (data / "manifest.json").exists():
        run(["data", "synth", "--out", str(data), "--num-scenes", str(TRAIN_SCENES), "--samples-per-scene",
             str(SAMPLES), "--seed", "100"])
    if not (held_out / "manifest.json").exists():
        run(["data", "synth", "--out", str(held_out), "--num-scenes", str(HELD_OUT_SCENES), "--samples-per-scene",
             str(SAMPLES), "--seed", "200"])
    recon = [f"reconstruct.mesh_resolution={args.resolution}", f"reconstruct.precision={args.recon_precision}",
             *args.recon_set]
    for name in args.variants:
        t0 = time.time()
        sets = [f"data.path={data}", f"checkpoint.storage_path={work / 'runs'}", f"checkpoint.run_name={name}",
                *COMMON, *VARIANTS[name], *args.set]
        code = run(["train", "--config", str(packaged_config("deepsdf")), "--overwrite",
                    *[x for s in sets for x in ("--set", s)]])
        run_dir = work / "runs" / name
        train_summary = json.loads((run_dir / "summary.json").read_text())
        run(["reconstruct", "--run", str(run_dir), "--data", str(held_out), "--out", str(work / "recon" / name),
             "--overwrite", *[x for s in recon for x in ("--set", s)]])
        manifest = json.loads((data / "manifest.json").read_text())
        names = [s["name"] for s in manifest["scenes"][:MEASURED_TRAINING_SCENES]]
        run(["mesh", "--run", str(run_dir), "--out", str(work / "mesh" / name), "--overwrite", "--scenes", *names,
             *[x for s in recon if "precision" not in s for x in ("--set", s)]])
        row = {"variant": name, "exit": code, "status": train_summary.get("status"),
               "final_loss": train_summary.get("final_loss"), "skipped_steps": train_summary.get("skipped_steps"),
               "samples_per_s": train_summary.get("samples_per_s"),
               "held_out": chamfer(work / "recon" / name / "summary.json"),
               "training": chamfer(work / "mesh" / name / "summary.json"), "seconds": round(time.time() - t0, 1)}
        print("RESULT " + json.dumps(row), flush=True)
        with open(work / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--recon-precision", default="bf16")
    parser.add_argument("--set", action="append", default=[], help="extra training overrides (a CPU smoke test)")
    parser.add_argument("--recon-set", action="append", default=[], help="extra reconstruct overrides")
    main_(parser.parse_args())
    sys.exit(0)
