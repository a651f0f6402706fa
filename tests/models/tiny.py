"""Tiny configs of the reference families: the real code paths at test-friendly sizes."""

from graphopt.models.dit import DiTConfig
from graphopt.models.unet import UNetConfig
from graphopt.models.var import VARConfig, VQConfig

UNET = UNetConfig(resolution=8, channels=8, channel_mult=(1, 2), attn_resolutions=(4,), heads=2, emb_dim=16, groups=4)
DIT = DiTConfig(resolution=8, patch=2, dim=32, depth=2, heads=2, freq_dim=32)
# the shipped tokenizer's latent size, codebook and scales, so a tiny VAR trains and samples with it
VAR = VARConfig(dim=32, depth=4, heads=2)
VAR_SCALES = VARConfig(patch_nums=(1, 2, 8), dim=32, depth=2, heads=2)
VQ = VQConfig(channels=8, latent_channels=4, codebook_size=16, patch_nums=(1, 2, 4, 8))
