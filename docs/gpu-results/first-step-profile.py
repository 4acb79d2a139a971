"""Issue 14: where a warm-cache run's first step goes, in one process without Ray (the worker's own code path).

    python docs/gpu-results/first-step-profile.py DATASET CACHE_DIR [cold|warm]

Runs ``run_training`` (deepsdf.yaml, 8 steps, bf16 + compile) with torch.compile's caches in CACHE_DIR; prints the
phase times the start-up clock sees, torch._dynamo's compile-time table, and cProfile's top functions by
cumulative time over state_build + first step. Run it once "cold" to fill the cache, then "warm" in a new process.
"""

import cProfile
import io
import pstats
import sys
import time

t_start = time.time()
dataset, cache_dir, label = sys.argv[1], sys.argv[2], sys.argv[3]

import torch  # noqa: E402

from sdf_ray import config as cfgmod  # noqa: E402
from sdf_ray.device_settings import use_compile_cache  # noqa: E402
from sdf_ray.dist import LocalCollectives  # noqa: E402
from sdf_ray.train_loop import run_training  # noqa: E402

t_imports = time.time()
use_compile_cache(cache_dir)
cfg = cfgmod.load(cfgmod.packaged_config("deepsdf"), [
    f"data.path={dataset}", "optim.precision=auto", "model.compile=auto", "optim.num_epochs=1",
    "logging.every_n_steps=8", "checkpoint.every_n_epochs=1"])
device = torch.device("cuda", 0)
torch.cuda.set_device(device)
marks: dict[str, float] = {}
prof = cProfile.Profile()


def on_phase(name: str) -> None:
    marks[name] = time.time()
    if name == "data_loaded":
        prof.enable()
    if name == "first_step_done":
        torch.cuda.synchronize()
        marks[name] = time.time()
        prof.disable()


run_training(cfg, LocalCollectives(), device, lambda metrics, snapshot: None, "/tmp/first-step-profile-run",
             on_phase=on_phase)
print(f"[{label}] imports {t_imports - t_start:.2f} s, config+cuda {marks['data_loaded'] - t_imports:.2f} s (incl. "
      f"data), state_build {marks['state_built'] - marks['data_loaded']:.2f} s, first step "
      f"{marks['first_step_done'] - marks['state_built']:.2f} s")
try:
    from torch._dynamo.utils import compile_times
    print(compile_times(repr="str", aggregate=True))
except Exception as exc:  # the table's API moves between torch versions
    print("compile_times unavailable:", exc)
out = io.StringIO()
pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(45)
print("\n".join(line[:200] for line in out.getvalue().splitlines()[:75]))
out = io.StringIO()
pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
print("\n".join(line[:200] for line in out.getvalue().splitlines()[:40]))
