"""Image grids of samples, written as PNG with Pillow."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from PIL import Image


def grid(images: torch.Tensor, nrow: int = 8, pad: int = 1, scale: int = 2) -> torch.Tensor:
    """Tile (N, C, H, W) images in [-1, 1] into one (C, H', W') uint8 image, each pixel ``scale`` x ``scale``."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    out = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return out.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a (1 or 3, H, W) uint8 image as gray or RGB PNG; the file appears whole or not at all."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"save_png takes a (1 or 3, H, W) image (gray or RGB), got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        raise ValueError(f"save_png takes a uint8 image, got {image.dtype}")
    pixels = image.detach().cpu().permute(1, 2, 0).contiguous().numpy()
    picture = Image.fromarray(pixels[:, :, 0] if image.shape[0] == 1 else pixels)
    path = Path(path)
    # A temp file in the same folder, so os.replace is a rename on one filesystem: readers never see half a PNG.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
