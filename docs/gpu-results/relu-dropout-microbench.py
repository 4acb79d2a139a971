import time, torch, sys
torch.manual_seed(0)
dev = "cuda"
N, H = 1 << 20, 512
x0 = torch.randn(N, H, device=dev, dtype=torch.bfloat16)
g0 = torch.randn(N, H, device=dev, dtype=torch.bfloat16)

def relu(x): return torch.relu(x)
def relu_drop(x): return torch.nn.functional.dropout(torch.relu(x), 0.2, True)

M32 = 0xFFFFFFFF
def _mul32(h, c):  # int64 holding uint32 values
    return (h * c) & M32
def hash_keep(shape, seed, p):
    idx = torch.arange(shape[0] * shape[1], device=dev, dtype=torch.int64).view(shape)
    h = (idx + seed) & M32
    h = _mul32(h ^ (h >> 16), 0x85EBCA6B)
    h = _mul32(h ^ (h >> 13), 0xC2B2AE35)
    h = h ^ (h >> 16)
    return (h & 0xFFFF) >= int(round(p * 65536))
def relu_hash(x):
    seed = torch.randint(0, 2**31, (), device=dev) * 0x9E3779B1
    keep = hash_keep(x.shape, seed, 0.2)
    return torch.where(keep, torch.relu(x), 0) * (1 / 0.8)

class ReluDropOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep):
        y = torch.where(keep, torch.relu(x), 0) * 1.25
        ctx.save_for_backward(y)
        return y
    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, gy * 1.25, 0), None
def relu_hash_ysave(x):
    seed = torch.randint(0, 2**31, (), device=dev) * 0x9E3779B1
    keep = hash_keep(x.shape, seed, 0.2)
    return ReluDropOut.apply(x, keep)

def bench(fn, name):
    f = torch.compile(fn)
    x = x0.clone().requires_grad_()
    for _ in range(3):
        f(x).backward(g0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        f(x).backward(g0)
    torch.cuda.synchronize()
    fb = (time.perf_counter() - t) / 20 * 1e3
    with torch.no_grad():
        for _ in range(3): f(x)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(20): y = f(x)
        torch.cuda.synchronize(); fw = (time.perf_counter() - t) / 20 * 1e3
    kept = (f(x0) != 0).float().mean().item()
    print(f"{name:<22} fwd {fw:6.3f} ms  fwd+bwd {fb:6.3f} ms  nonzero {kept:.4f}", flush=True)

for fn, name in [(relu, "relu"), (relu_drop, "relu+dropout(philox)"), (relu_hash, "relu+hash dropout"), (relu_hash_ysave, "relu+hash, y-backward")]:
    bench(fn, name)
