"""The GPU benchmarks' denoisers and inputs (shared by kernels.py, runtime.py and gpu.py).

``denoiser(key, scale)``: DiT-S/2, DiT-B/2, DiT-XL/2 (SiT blocks, 32x32x4 latents, patch 2, 1000
classes), the EDM UNet 128ch (1,2,2)x2 at 32x32x4, and two third-party ones (need diffusers):
diffusers' ``UNet2DModel`` with channels 128/256/256 and attention at the two lower levels
(``diffusers-unet``) and its ``DiTTransformer2DModel`` at DiT-S/2's size (``diffusers-dit``: adaLN-Zero
with an embedding per block, separate q, k and v projections, as third-party DiTs are written), with
random weights (normal, std 0.02: speed does not depend on them). ``scale="full"`` is the real size;
``"cpu"`` keeps the depth at a CPU-friendly width on 8x8 latents (host-overhead measurements, where the
number of sites is what counts); ``"smoke"`` is tiny, to check a script under Triton's interpreter.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

DITS = {"dit-s": (384, 12, 6, "DiT-S/2"), "dit-b": (768, 12, 12, "DiT-B/2"), "dit-xl": (1152, 28, 16, "DiT-XL/2")}
"""key: (width, depth, heads, label), DiT's sizes."""

DENOISERS = (*DITS, "unet", "diffusers-unet", "diffusers-dit")
SCALES = ("full", "cpu", "smoke")


def denoiser(key: str, scale: str = "full") -> tuple[nn.Module, str]:
    """(model in eval mode with random weights, label) for ``key`` in :data:`DENOISERS` at ``scale``."""
    from graphopt.models.dit import DiTConfig, SiT
    from graphopt.models.unet import EDMUNet, UNetConfig

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    full = scale == "full"
    if key in DITS:
        width, depth, heads, label = DITS[key]
        if not full:
            width, depth, heads = (64, depth, 2) if scale == "cpu" else (32, 2, 2)
            label += f" (depth {depth}, width {width}, 8x8)"
        model = SiT(DiTConfig(resolution=32 if full else 8, patch=2, in_channels=4, dim=width, depth=depth,
                              heads=heads, freq_dim=256 if full else 32, num_classes=1000))
    elif key == "unet":
        channels = {"full": 128, "cpu": 16, "smoke": 8}[scale]
        model = EDMUNet(UNetConfig(resolution=32 if full else 8, in_channels=4, channels=channels,
                                   channel_mult=(1, 2, 2), blocks_per_level=1 if scale == "smoke" else 2,
                                   attn_resolutions=(16, 8) if full else (4,), heads=4 if full else 2,
                                   emb_dim=512 if full else {"cpu": 32, "smoke": 16}[scale],
                                   groups=32 if full else 4))
        label = f"EDM UNet {channels}ch (1,2,2)x{model.config.blocks_per_level}" + ("" if full else ", 8x8")
    elif key == "diffusers-unet":
        model, label = _diffusers_unet(full)
    elif key == "diffusers-dit":
        model, label = _diffusers_dit(scale)
    else:
        raise ValueError(f"unknown denoiser {key!r}; choose from {', '.join(DENOISERS)}")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval(), label


class DiffusersUNet(nn.Module):
    """diffusers' ``UNet2DModel`` called as ``(x, timestep) -> tensor``, with the ``config`` fields the
    benchmarks read (``resolution``, ``in_channels``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.config = type("Config", (), {"resolution": unet.config.sample_size,
                                          "in_channels": unet.config.in_channels})()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, return_dict=False)[0]


class DiffusersDiT(nn.Module):
    """diffusers' ``DiTTransformer2DModel`` called as ``(x, t, labels) -> tensor``, with the ``config``
    fields the benchmarks read."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit
        self.config = type("Config", (), {"resolution": dit.config.sample_size,
                                          "in_channels": dit.config.in_channels})()

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.dit(x, timestep=t, class_labels=labels, return_dict=False)[0]


def _diffusers(key: str) -> object:
    try:
        import diffusers
    except ImportError:
        raise SystemExit(f"{key} needs diffusers (pip install 'graphopt[test]')") from None
    return diffusers


def _diffusers_dit(scale: str) -> tuple[nn.Module, str]:
    heads, head_dim, depth, res = {"full": (6, 64, 12, 32), "cpu": (2, 32, 12, 8), "smoke": (2, 16, 2, 8)}[scale]
    dit = _diffusers("diffusers-dit").DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, num_layers=depth,
        sample_size=res, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    return DiffusersDiT(dit), f"diffusers DiTTransformer2DModel, depth {depth}, width {heads * head_dim}, {res}x{res}"


def _diffusers_unet(full: bool) -> tuple[nn.Module, str]:
    UNet2DModel = _diffusers("diffusers-unet").UNet2DModel
    channels = (128, 256, 256) if full else (8, 16, 16)
    unet = UNet2DModel(sample_size=32 if full else 8, in_channels=4, out_channels=4, layers_per_block=2,
                       block_out_channels=channels, norm_num_groups=32 if full else 4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    size = "32x32" if full else "8x8"
    return DiffusersUNet(unet), f"diffusers UNet2DModel {'/'.join(map(str, channels))}, {size}"


def example_inputs(name: str, model: nn.Module, batch: int, device: str, dtype: torch.dtype) -> tuple:
    """A noisy batch for model ``name`` (a "dit..." takes times and ImageNet labels, a UNet sigmas)."""
    res, ch = model.config.resolution, model.config.in_channels
    x = torch.randn(batch, ch, res, res, device=device, dtype=dtype)
    if name.startswith("dit") or name == "diffusers-dit":  # times in x's dtype, as the samplers pass them
        return x, torch.rand(batch, device=device, dtype=dtype), torch.randint(0, 1000, (batch,), device=device)
    if name == "diffusers-unet":  # a DDPM time step
        return x, torch.randint(0, 1000, (batch,), device=device).to(dtype)
    return x, torch.rand(batch, device=device, dtype=dtype) * 10 + 0.1


def cpu_model(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """(model, example inputs at batch 2) for a CPU benchmark: a reference generator's denoiser with its
    checkpoint, or a denoiser of :data:`DENOISERS` at its ``"cpu"`` scale with random weights of seed 0."""
    if name in DENOISERS:
        torch.manual_seed(0)
        model = denoiser(name, "cpu")[0]
        return model, example_inputs(name, model, 2, "cpu", torch.float32)
    from graphopt.models import load

    ref = load(name)
    return ref.model, tuple(ref.example_inputs)


def tiled(examples: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """The example inputs repeated to ``batch`` (labels and times too)."""
    reps = -(-batch // examples[0].shape[0])
    return tuple(torch.cat([t] * reps)[:batch] for t in examples)


def first_tensor(out: object) -> torch.Tensor:
    """A model's first output tensor (through tuples and lists)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out  # type: ignore[return-value]


def model_keys(models: str) -> list[str]:
    """The keys of a comma-separated ``--models``; exits 2 for an unknown one, with the reason on stderr."""
    keys = [k.strip() for k in models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in DENOISERS]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(DENOISERS)}", file=sys.stderr)
        raise SystemExit(2)
    return keys


def selection(script: str, models: str, batches: str, smoke: bool) -> tuple[list[str], list[int]]:
    """A GPU benchmark's ``--models`` and ``--batches`` (batch 2 in a smoke run); exits 1 without a GPU
    (unless ``smoke``) and 2 for an unknown model, with the reason on stderr."""
    if not smoke and not torch.cuda.is_available():
        print(f"bench/{script} measures on a CUDA GPU and torch sees none; --smoke checks the script on a CPU",
              file=sys.stderr)
        raise SystemExit(1)
    return model_keys(models), [2] if smoke else [int(b) for b in batches.split(",")]
