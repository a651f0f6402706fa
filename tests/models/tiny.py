"""Tiny configs of the reference families: the real code paths at test-friendly sizes."""

from graphopt.models.dit import DiTConfig
from graphopt.models.unet import UNetConfig

UNET = UNetConfig(resolution=8, channels=8, channel_mult=(1, 2), attn_resolutions=(4,), heads=2, emb_dim=16, groups=4)
DIT = DiTConfig(resolution=8, patch=2, dim=32, depth=2, heads=2, freq_dim=32)
