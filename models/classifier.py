"""A small digit classifier whose penultimate layer is the feature space for Frechet distance.

Two conv stages and a 64-wide feature layer: large enough to separate the ten digits (held-out
accuracy is recorded with the checkpoint), small enough to featurise thousands of 16x16 samples
per second on a CPU.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    resolution: int = 16
    in_channels: int = 1
    channels: int = 32
    features: int = 64
    num_classes: int = 10


class DigitClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        c = config.channels
        self.conv1 = nn.Conv2d(config.in_channels, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.fc = nn.Linear(2 * c * (config.resolution // 4) ** 2, config.features)
        self.head = nn.Linear(config.features, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, features) activations after the feature layer's ReLU."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
