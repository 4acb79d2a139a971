"""An experiment, not adopted (docs/performance.md, session 8): ReLU layers whose backward needs no mask kernel,
through cuBLASLt's ReLU bit-mask epilogues, called through ctypes. On an H200 (cuBLAS of CUDA 13, bf16, 512,000 x
512 x 512) the DRELU backward ran as the GEMM plus a separate ``cublasLt::epilogue::impl::globalKernel`` (1.18 ms),
2.2x the time of torch's GEMM and mask kernel, and the RELU_AUX_BIAS forward 1.2x torch's fused GEMM + bias + ReLU:
the reconstruction step went from 9.21 to 13.78 ms. Kept here with its benchmark (relu-epilogues-bench.py) so
the measurement can be repeated on another GPU or cuBLAS version.

The hand-written code gradient (:mod:`sdf_ray.shapes.frozen_decoder`) applies each ReLU's mask in backward as its
own kernel, ``threshold_backward(g @ W, h)``: it reads the GEMM's output and the activation and writes the result,
about 1.5 GB of traffic per 512-wide layer of a 512k-sample step (0.36 ms on an H200, as long as the GEMM). cuBLASLt
can do it inside the GEMMs: the forward's ``RELU_AUX_BIAS`` epilogue writes, beside the activation, a bit-mask of
its positive entries (1 bit per element, 1/16 of the activation), and the backward's ``DRELU`` epilogue multiplies
the GEMM's output by that mask before storing it. torch exposes neither epilogue (``torch._addmm_activation`` is
the ReLU without the mask), hence this small binding to the ``libcublasLt`` that torch already loaded.

Two torch custom ops (so a compiled step calls them as opaque kernels):

- ``sdf_ray::linear_relu_mask(x [M, K], w [N, K], b [N]) -> (relu(x @ w.T + b) [M, N], mask [M, ceil(N/128)*16] uint8)``
- ``sdf_ray::mm_relu_grad(g [M, N], w [N, K], mask of an [M, K] activation) -> (g @ w) * (activation > 0)``

bf16 on CUDA only. :func:`available` probes a device once (both ops against torch on small random matrices) and
says no where the library, the epilogues or the probe fail; the callers then keep the separate mask kernel.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch

_CUDA_R_16BF = 14
_CUBLAS_COMPUTE_32F = 68
_CUDA_R_32F = 0
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
_EPILOGUE_RELU_AUX_BIAS = 2 | 128 | 4
_EPILOGUE_DRELU = 8 | 128
_PREF_MAX_WORKSPACE_BYTES = 1
_WORKSPACE_BYTES = 32 << 20


def mask_bits(width: int) -> int:
    """The bit-mask's leading dimension for an activation ``width`` wide: cuBLASLt wants a multiple of 128 bits."""
    return -(-width // 128) * 128


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CublasLtError(RuntimeError):
    pass


@functools.cache
def _library() -> Any:
    """torch's own ``libcublasLt`` (already loaded by ``import torch``; dlopen by soname finds that copy)."""
    for name in ("libcublasLt.so.13", "libcublasLt.so.12"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        with open("/proc/self/maps") as maps:
            paths = [line.split()[-1] for line in maps if "libcublasLt.so" in line]
        if not paths:
            raise CublasLtError("libcublasLt is not loaded in this process")
        lib = ctypes.CDLL(paths[0])
    p, i32, u64, i64, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
    signatures = {
        "cublasLtCreate": [ctypes.POINTER(p)],
        "cublasLtMatmulDescCreate": [ctypes.POINTER(p), i32, i32],
        "cublasLtMatmulDescSetAttribute": [p, i32, p, size],
        "cublasLtMatrixLayoutCreate": [ctypes.POINTER(p), i32, u64, u64, i64],
        "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(p)],
        "cublasLtMatmulPreferenceSetAttribute": [p, i32, p, size],
        "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i32, p, ctypes.POINTER(i32)],
        "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, p, p, size, p],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, i32
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasLtError(f"{what} failed with cuBLAS status {status}")


@functools.cache
def _handle(device_index: int) -> ctypes.c_void_p:
    handle = ctypes.c_void_p()
    with torch.cuda.device(device_index):
        _check(_library().cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
    return handle


_workspaces: dict[tuple[int, int], torch.Tensor] = {}
_workspaces_lock = threading.Lock()


def _workspace(device: torch.device, stream: int) -> torch.Tensor:
    """One workspace per stream: the reconstruction's threads run GEMMs on their own streams at once."""
    key = (device.index or 0, stream)
    with _workspaces_lock:
        if key not in _workspaces:
            _workspaces[key] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        return _workspaces[key]


@dataclass
class _Plan:
    """A described GEMM (layouts, epilogue, chosen algorithm) for one problem size; pointers are set per call."""

    desc: ctypes.c_void_p
    a: ctypes.c_void_p
    b: ctypes.c_void_p
    d: ctypes.c_void_p
    algo: _HeuristicResult
    lock: threading.Lock


def _set(desc: ctypes.c_void_p, attr: int, value: Any) -> None:
    _check(_library().cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(value), ctypes.sizeof(value)),
           f"cublasLtMatmulDescSetAttribute({attr})")


def _layout(rows: int, cols: int, ld: int) -> ctypes.c_void_p:
    layout = ctypes.c_void_p()
    _check(_library().cublasLtMatrixLayoutCreate(ctypes.byref(layout), _CUDA_R_16BF, rows, cols, ld),
           "cublasLtMatrixLayoutCreate")
    return layout


@functools.lru_cache(maxsize=256)
def _plan(device_index: int, epilogue: int, m: int, n: int, k: int) -> _Plan:
    """Column-major cuBLASLt view of row-major ``D[m, n] = X[m, k] @ op(W)``: ``D^T[n, m] = op(W)^T X^T``, so
    cuBLASLt's A is the weight, its B the activations and its rows the features (the bias and mask run along
    them). Forward (RELU_AUX_BIAS): W is ``[n, k]``, used transposed. Backward (DRELU): W is ``[k, n]``."""
    lib = _library()
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _CUBLAS_COMPUTE_32F, _CUDA_R_32F),
           "cublasLtMatmulDescCreate")
    forward = epilogue == _EPILOGUE_RELU_AUX_BIAS
    _set(desc, _DESC_TRANSA, ctypes.c_int32(_OP_T if forward else _OP_N))
    _set(desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
    _set(desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
    _set(desc, _DESC_AUX_LD, ctypes.c_int64(mask_bits(n)))
    a = _layout(k, n, k) if forward else _layout(n, k, n)
    b, d = _layout(k, m, k), _layout(n, m, n)
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
    ws = ctypes.c_uint64(_WORKSPACE_BYTES)
    _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8),
           "cublasLtMatmulPreferenceSetAttribute")
    # The heuristic reads the pointers' alignment: give it 256-byte aligned stand-ins (torch's allocations are).
    _set(desc, _DESC_AUX_POINTER, ctypes.c_void_p(256))
    if forward:
        _set(desc, _DESC_BIAS_POINTER, ctypes.c_void_p(256))
    result = _HeuristicResult()
    found = ctypes.c_int(0)
    _check(lib.cublasLtMatmulAlgoGetHeuristic(_handle(device_index), desc, a, b, d, d, pref, 1,
                                              ctypes.byref(result), ctypes.byref(found)),
           "cublasLtMatmulAlgoGetHeuristic")
    if found.value < 1:
        raise CublasLtError(f"no cuBLASLt algorithm for epilogue {epilogue} at m={m} n={n} k={k}")
    return _Plan(desc, a, b, d, result, threading.Lock())


_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def _run(plan: _Plan, device: torch.device, w: torch.Tensor, x: torch.Tensor, out: torch.Tensor,
         aux: torch.Tensor, bias: torch.Tensor | None) -> None:
    stream = torch.cuda.current_stream(device).cuda_stream
    workspace = _workspace(device, stream)
    with plan.lock:  # the pointers live in the shared descriptor until the launch has read them
        _set(plan.desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
        if bias is not None:
            _set(plan.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        _check(_library().cublasLtMatmul(
            _handle(device.index or 0), plan.desc, ctypes.byref(_ONE), ctypes.c_void_p(w.data_ptr()), plan.a,
            ctypes.c_void_p(x.data_ptr()), plan.b, ctypes.byref(_ZERO), ctypes.c_void_p(out.data_ptr()), plan.d,
            ctypes.c_void_p(out.data_ptr()), plan.d, ctypes.byref(plan.algo.algo),
            ctypes.c_void_p(workspace.data_ptr()), _WORKSPACE_BYTES, ctypes.c_void_p(stream)), "cublasLtMatmul")


def _operands(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Row-major bf16 CUDA operands (a compiled graph may hand over other strides: copied then)."""
    for t in tensors:
        if t.dtype != torch.bfloat16 or not t.is_cuda:
            raise ValueError(f"expected bf16 CUDA tensors, got {t.dtype} on {t.device}")
    return [t.contiguous() for t in tensors]


@torch.library.custom_op("sdf_ray::linear_relu_mask", mutates_args=())
def linear_relu_mask(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(x @ weight.T + bias), its bit-mask)`` for bf16 ``x [M, K]``, ``weight [N, K]``, ``bias [N]``."""
    x, weight, bias = _operands(x, weight, bias)
    (m, k), n = x.shape, weight.shape[0]
    out = x.new_empty(m, n)
    mask = x.new_empty(m, mask_bits(n) // 8, dtype=torch.uint8)
    _run(_plan(x.device.index or 0, _EPILOGUE_RELU_AUX_BIAS, m, n, k), x.device, weight, x, out, mask, bias)
    return out, mask


@linear_relu_mask.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = x.shape[0], weight.shape[0]
    return x.new_empty(m, n), x.new_empty(m, mask_bits(n) // 8, dtype=torch.uint8)


@torch.library.custom_op("sdf_ray::mm_relu_grad", mutates_args=())
def mm_relu_grad(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(grad @ weight) * (h > 0)`` for bf16 ``grad [M, N]``, ``weight [N, K]`` and the bit-mask of an
    ``h [M, K]`` from :func:`linear_relu_mask`: the gradient before that ReLU."""
    grad, weight = _operands(grad, weight)
    mask = mask.contiguous()
    m, (n, k) = grad.shape[0], weight.shape
    if mask.dtype != torch.uint8 or tuple(mask.shape) != (m, mask_bits(k) // 8):
        raise ValueError(f"mask {tuple(mask.shape)} {mask.dtype} does not fit an activation [{m}, {k}]")
    out = grad.new_empty(m, k)
    _run(_plan(grad.device.index or 0, _EPILOGUE_DRELU, m, k, n), grad.device, weight, grad, out, mask, None)
    return out


@mm_relu_grad.register_fake
def _(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(grad.shape[0], weight.shape[1])


@functools.cache
def _probe(device_index: int) -> str:
    """'' if both ops agree with torch on this device, else why not."""
    try:
        device = torch.device("cuda", device_index)
        g = torch.Generator(device).manual_seed(0)
        x = torch.randn(1000, 256, device=device, generator=g).to(torch.bfloat16)
        w1 = (torch.randn(200, 256, device=device, generator=g) / 16).to(torch.bfloat16)
        b1 = torch.randn(200, device=device, generator=g).to(torch.bfloat16)
        w2 = (torch.randn(256, 200, device=device, generator=g) / 16).to(torch.bfloat16)
        h, mask = linear_relu_mask(x, w1, b1)
        want_h = torch._addmm_activation(b1, x, w1.t())
        y = torch.randn(1000, 256, device=device, generator=g).to(torch.bfloat16)
        got_g = mm_relu_grad(y, w2, mask)
        want_g = torch.ops.aten.threshold_backward(torch.mm(y, w2), want_h, 0)
        if not torch.allclose(h.float(), want_h.float(), atol=2e-2, rtol=2e-2):
            return "the forward epilogue disagrees with torch"
        if not torch.allclose(got_g.float(), want_g.float(), atol=2e-2, rtol=2e-2):
            return "the backward epilogue disagrees with torch"
        return ""
    except (CublasLtError, OSError, AttributeError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str:
    """'' where the ops serve ``dtype`` on ``device``, else why not (a CPU, fp32, no library, a failed probe)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if dtype != torch.bfloat16:
        return f"{dtype} (the epilogues are used for bf16 only)"
    return _probe(device.index if device.index is not None else torch.cuda.current_device())


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return not unavailable_reason(device, dtype)
