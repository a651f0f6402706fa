"""Reference generators (installed as ``graphopt.models``): inputs to graphopt like any user model.

``load(name)`` returns a trained reference model with its sampler and example inputs::

    model, sampler, example_inputs = graphopt.models.load("dit-digits")
    images = sampler.sample(model, sampler.noise(16, seed=0), sampler.labels(16, seed=0))

Checkpoints are safetensors files under ``models/checkpoints`` (weights + config + training
record, nothing pickled); ``python -m graphopt.models.train NAME`` reproduces each.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from graphopt.errors import LoadError, UsageError

from .checkpoint import build, load_weights, read_checkpoint
from .classifier import ClassifierConfig, DigitClassifier
from .dit import DiTConfig, SiT
from .samplers import Sampler, edm_sigmas, flow_times
from .unet import EDMUNet, UNetConfig
from .var import VAR, MultiScaleVQ, VARConfig, VARSampler, VQConfig

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"

# name -> family; the checkpoint file is CHECKPOINT_DIR / f"{name}.safetensors"
REFERENCES: dict[str, str] = {"unet-digits": "unet", "dit-digits": "dit", "var-digits": "var",
                              "classifier-digits": "classifier", "var-digits-vq": "vq"}
FAMILIES: dict[str, tuple[type, type]] = {
    "unet": (UNetConfig, EDMUNet), "dit": (DiTConfig, SiT), "var": (VARConfig, VAR),
    "classifier": (ClassifierConfig, DigitClassifier), "vq": (VQConfig, MultiScaleVQ)}
GENERATOR_FAMILIES = ("unet", "dit", "var")


def generators() -> list[str]:
    """The reference models that generate images (the others are the classifier and var's tokenizer)."""
    return [n for n, f in REFERENCES.items() if f in GENERATOR_FAMILIES]


@dataclasses.dataclass(frozen=True)
class Reference:
    """A loaded reference model; unpacks as ``model, sampler, example_inputs``."""

    name: str
    model: nn.Module
    sampler: Sampler | None
    example_inputs: tuple[torch.Tensor, ...]
    config: Any
    record: dict[str, Any]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.sampler, self.example_inputs))


def names() -> list[str]:
    return list(REFERENCES)


def build_model(family: str, config: Any = None) -> nn.Module:
    """A freshly initialised model of ``family`` ("unet", "dit", "classifier")."""
    if family not in FAMILIES:
        raise UsageError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    config_cls, model_cls = FAMILIES[family]
    return model_cls(config if config is not None else config_cls())


def default_sampler(family: str, config: Any, steps: int = 16, method: str = "heun") -> Sampler | None:
    """The sampler a family is evaluated with by default (Heun, 16 steps; VAR's own per-scale sampler)."""
    if family not in ("unet", "dit"):
        return None
    shape = (config.in_channels, config.resolution, config.resolution)
    if family == "unet":
        return Sampler("edm", method, edm_sigmas(steps), shape)
    if family == "dit":
        return Sampler("flow", method, flow_times(steps), shape, null_class=config.num_classes)
    return None


def example_inputs(family: str, config: Any, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs with which to capture a family's model (a noisy batch at mid-range noise levels)."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, config.in_channels, config.resolution, config.resolution)
    x = torch.randn(shape, generator=g)
    if family == "unet":
        return (x, torch.linspace(2.0, 0.2, batch))
    if family == "dit":
        return (x, torch.linspace(0.8, 0.2, batch), torch.arange(batch) % (config.num_classes + 1))
    return (x.clamp(-1, 1),)


def load(name_or_path: str | os.PathLike) -> Reference:
    """Load a reference model by name (``dit-digits``) or from a checkpoint path, in eval mode."""
    key = str(name_or_path)
    if key in REFERENCES:
        path = CHECKPOINT_DIR / f"{key}.safetensors"
        if not path.is_file():
            raise LoadError(f"the {key} checkpoint is missing ({path}); reproduce it with "
                            f"python -m graphopt.models.train {REFERENCES[key]}")
    else:
        path = Path(key)
        if not path.is_file():
            raise UsageError(f"unknown model {key!r}: not a reference ({', '.join(REFERENCES)}) nor a checkpoint file")
    family, fields, state, record = read_checkpoint(path)
    if family not in FAMILIES:
        raise LoadError(f"checkpoint {path} has unknown family {family!r}")
    config = build(FAMILIES[family][0], fields)
    model = load_weights(build_model(family, config), state, path).eval()
    sampler: Any = default_sampler(family, config)
    examples = example_inputs(family, config) if family != "var" else model.example_inputs()
    if family == "var":  # decodes with the tokenizer it was trained on
        sampler = VARSampler.for_model(model, load(record.get("tokenizer", "var-digits-vq")).model)
    return Reference(key if key in REFERENCES else path.stem, model, sampler, examples, config, record)
