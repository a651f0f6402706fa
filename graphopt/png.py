"""Write image grids as PNG with the standard library only (zlib + struct)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import torch


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


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


def write_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a (1 or 3, H, W) uint8 image; the file appears whole or not at all."""
    c, h, w = image.shape
    if c not in (1, 3):
        raise ValueError("PNG writer takes 1 (gray) or 3 (RGB) channels")
    rows = image.permute(1, 2, 0).reshape(h, w * c).numpy()
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
