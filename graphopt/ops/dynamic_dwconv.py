"""``graphopt::dynamic_dwconv``: ATConv's depthwise convolution with one kernel per (sample, channel).

v: (B, C, H, W), kernels: (B, C, k, k), k odd, zero padding k // 2, no bias::

    Y[b, c, y, x] = sum_{i, j < k} K[b, c, i, j] V[b, c, y + i - k//2, x + j - k//2]

On CUDA the op runs :func:`graphopt.autotune.kernels.dynamic_dwconv`; in ONNX it is
:func:`dynamic_dwconv_onnx`. ONNX's Conv takes ``group`` as an attribute, so the reference's B*C
groups would freeze the batch; the translation uses the sum above directly instead, one shifted slice
of the zero-padded V per kernel tap::

    Y = sum_{i, j < k} K[:, :, i:i+1, j:j+1] * pad(V)[:, :, i:i+H, j:j+W]

which keeps the batch axis dynamic (k is static: the kernels' last axis).
"""

from __future__ import annotations

from typing import Any

import torch

_INT64_MAX = 2**63 - 1  # ONNX Slice's "to the end"


def dynamic_dwconv_reference(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """ATConv's own formulation, a conv2d with B*C groups, in fp32, cast back to ``v.dtype``."""
    batch, channels, height, width = v.shape
    k = kernels.shape[-1]
    y = torch.nn.functional.conv2d(v.float().reshape(1, batch * channels, height, width),
                                   kernels.float().reshape(batch * channels, 1, k, k), padding=k // 2,
                                   groups=batch * channels)
    return y.reshape(batch, channels, height, width).to(v.dtype)


def dynamic_dwconv_onnx(v: Any, kernels: Any) -> Any:
    """The module docstring's shifted-slice sum in standard ONNX ops, for torch.onnx's ``custom_translation_table``.

    Traced by the exporter, so the ops land inline in the graph (no custom-domain node): Pad, then per
    tap a Slice of V, a Slice of the kernels (a (B, C, 1, 1) entry broadcast over the image) and a Mul,
    and one Sum. Like the reference it computes in fp32 and casts back to ``v``'s dtype.
    """
    from onnx import TensorProto
    from onnxscript import opset18 as op  # onnxscript loads only when a graph is exported

    k = kernels.shape[-1]
    if not isinstance(k, int):
        raise ValueError(f"dynamic_dwconv's kernel size must be static for ONNX, got {k}")
    pad = k // 2
    padded = op.Pad(op.Cast(v, to=TensorProto.FLOAT), op.Constant(value_ints=[0, 0, pad, pad, 0, 0, pad, pad]))
    weights = op.Cast(kernels, to=TensorProto.FLOAT)
    axes = op.Constant(value_ints=[2, 3])
    taps = []
    for i in range(k):
        for j in range(k):
            # a negative end counts from the padded edge, so the image size may be symbolic too
            ends = [i - (k - 1) if i < k - 1 else _INT64_MAX, j - (k - 1) if j < k - 1 else _INT64_MAX]
            window = op.Slice(padded, op.Constant(value_ints=[i, j]), op.Constant(value_ints=ends), axes)
            tap = op.Slice(weights, op.Constant(value_ints=[i, j]), op.Constant(value_ints=[i + 1, j + 1]), axes)
            taps.append(op.Mul(tap, window))
    return op.CastLike(op.Sum(*taps), v)


@torch.library.custom_op("graphopt::dynamic_dwconv", mutates_args=())
def dynamic_dwconv(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample depthwise k x k convolution; see the module docstring."""
    return dynamic_dwconv_reference(v, kernels)


@dynamic_dwconv.register_fake
def _(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    return v.new_empty(v.shape)


@dynamic_dwconv.register_kernel("cuda")
def _(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    try:
        from graphopt.autotune.kernels import dynamic_dwconv as kernel
    except ImportError:  # no Triton: the reference is correct everywhere, only slower
        return dynamic_dwconv_reference(v, kernels)
    return kernel(v, kernels)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients through the reference (distillation trains the kernel generator around the op)."""
    v, kernels = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (v, kernels)]
        out = dynamic_dwconv_reference(*leaves)
        grads = torch.autograd.grad(out, leaves, grad)
    return grads[0], grads[1]


dynamic_dwconv.register_autograd(_backward, setup_context=_setup_context)
