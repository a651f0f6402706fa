"""The benchmarks' inputs for the GPU-sized DiT and UNet (shared by kernels.py and runtime.py)."""

from __future__ import annotations

import torch
from torch import nn


def example_inputs(name: str, model: nn.Module, batch: int, device: str, dtype: torch.dtype) -> tuple:
    """A noisy batch for model ``name`` (a "dit..." takes times and ImageNet labels, a UNet sigmas)."""
    res, ch = model.config.resolution, model.config.in_channels
    x = torch.randn(batch, ch, res, res, device=device, dtype=dtype)
    if name.startswith("dit"):
        return x, torch.rand(batch, device=device), torch.randint(0, 1000, (batch,), device=device)
    return x, torch.rand(batch, device=device, dtype=dtype) * 10 + 0.1
