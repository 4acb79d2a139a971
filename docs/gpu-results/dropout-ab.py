"""Session 9 A/B: the training step with the dropout and output layer as they were (a custom autograd.Function, an
autocast context in the graph: AOTAutograd's cache refuses the graph) against as they are (cacheable).

    python docs/gpu-results/dropout-ab.py {old|new|relu} [sdf-ray bench arguments]
"""

import sys

import torch

from sdf_ray import dropout, model
from sdf_ray.cli import main


class _ScaleWhereKept(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale):  # type: ignore[no-untyped-def]
        y = torch.where(keep, torch.relu(x), 0) * scale
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[no-untyped-def]
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, grad_y * ctx.scale, 0), None, None


def _old_output_layer(x, weight, bias):  # type: ignore[no-untyped-def]
    with torch.autocast(device_type=x.device.type, enabled=False):
        if torch.compiler.is_compiling():
            return (x.to(weight.dtype).unsqueeze(-2) * weight).sum(-1) + bias
        return model.linear(x.to(weight.dtype), weight, bias)


def _relu_form(x, keep, scale):  # type: ignore[no-untyped-def]
    """relu(where(keep, x, 0) * scale): relu's own backward reads its output, as the old Function's did."""
    return torch.relu(torch.where(keep, x, 0) * scale)


if sys.argv[1] == "relu":
    dropout._scale_where_kept = _relu_form
if sys.argv[1] == "old":
    dropout._scale_where_kept = _ScaleWhereKept.apply
    model._output_layer = _old_output_layer
print(f"variant {sys.argv[1]}", flush=True)
sys.exit(main(["bench", *sys.argv[2:]]))
