import numpy as np
import pytest
import torch
from PIL import Image

from graphopt.images import grid, save_png


def test_grid_tiles_scales_and_maps_to_uint8():
    images = torch.linspace(-1, 1, 4 * 3 * 3).reshape(4, 1, 3, 3)
    image = grid(images, nrow=2, pad=1, scale=2)
    assert image.dtype == torch.uint8
    assert image.shape == (1, 2 * (2 * 4 + 1), 2 * (2 * 4 + 1))
    assert image.min() == 0 and image.max() == 255
    assert image[0, 0, 0] == 0  # padding
    assert image[0, 2, 2] == 0 and image[0, 3, 3] == 0  # first pixel of the first image (-1), 2 x 2


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_png_round_trips_through_pillow(tmp_path, channels, mode):
    image = torch.randint(0, 256, (channels, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = save_png(image, tmp_path / "g.png")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == mode and picture.size == (7, 5)
        pixels = torch.from_numpy(np.array(picture))
    assert torch.equal(pixels.reshape(5, 7, channels).permute(2, 0, 1), image)
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_save_png_of_a_grid_keeps_its_pixels(tmp_path):
    image = grid(torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4), nrow=2)
    with Image.open(save_png(image, tmp_path / "g.png")) as picture:
        assert picture.size == (image.shape[2], image.shape[1])
        assert picture.getpixel((4, 3)) == tuple(image[:, 3, 4].tolist())


def test_save_png_rejects_two_channels_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="1 or 3"):
        save_png(torch.zeros(2, 4, 4, dtype=torch.uint8), tmp_path / "g.png")
    assert list(tmp_path.iterdir()) == []


def test_save_png_failing_midway_leaves_no_file(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_png(torch.zeros(3, 4, 4, dtype=torch.uint8), tmp_path / "g.png")
    assert list(tmp_path.iterdir()) == []
