"""``graphopt::dynamic_dwconv``: ATConv's depthwise convolution with one kernel per (sample, channel).

v: (B, C, H, W), kernels: (B, C, k, k), k odd, zero padding k // 2, no bias::

    Y[b, c, y, x] = sum_{i, j < k} K[b, c, i, j] V[b, c, y + i - k//2, x + j - k//2]

On CUDA the op runs :func:`graphopt.autotune.kernels.dynamic_dwconv`.
"""

from __future__ import annotations

import torch


def dynamic_dwconv_reference(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """ATConv's own formulation, a conv2d with B*C groups, in fp32, cast back to ``v.dtype``."""
    batch, channels, height, width = v.shape
    k = kernels.shape[-1]
    y = torch.nn.functional.conv2d(v.float().reshape(1, batch * channels, height, width),
                                   kernels.float().reshape(batch * channels, 1, k, k), padding=k // 2,
                                   groups=batch * channels)
    return y.reshape(batch, channels, height, width).to(v.dtype)


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
