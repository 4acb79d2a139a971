import sys, torch
import torch._functorch.config as fc
from sdf_ray import config as C
from sdf_ray.bench import run_bench, format_table
budget = float(sys.argv[1])
fc.activation_memory_budget = budget
cfg = C.load("sdf_ray/configs/deepsdf.yaml", ["optim.precision=bf16", "model.compile=true"])
t = run_bench(cfg, torch.device("cuda"), num_scenes=1000, steps=20, warmup=5, rounds=3, reference=False, variants_too=False)
print("budget", budget)
print(format_table(t, "guarded (sdf-ray step)"), flush=True)
