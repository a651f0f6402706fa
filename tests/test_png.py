import struct
import zlib

import torch

from graphopt.png import grid, write_png


def test_grid_png_round_trip(tmp_path):
    images = torch.linspace(-1, 1, 4 * 3 * 3).reshape(4, 1, 3, 3)
    image = grid(images, nrow=2, pad=1, scale=2)
    assert image.shape == (1, 2 * (2 * 4 + 1), 2 * (2 * 4 + 1))
    path = write_png(image, tmp_path / "g.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, color) == (18, 18, 8, 0)
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41:41 + idat_len])
    rows = [raw[i * 19 + 1:(i + 1) * 19] for i in range(18)]
    assert bytes(image[0, 2].tolist()) == rows[2]
    assert image.min() == 0 and image.max() == 255
