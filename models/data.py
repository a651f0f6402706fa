"""The digits data every reference generator trains on: scikit-learn's bundled 8x8 handwritten digits.

1,797 images ship inside scikit-learn, so nothing is downloaded. They are scaled from [0, 16] to
[-1, 1] and upsampled bilinearly to ``resolution`` (16 by default); a fixed permutation (seed 0)
holds out 30% for evaluation. Resolution is a parameter, the split is not: every figure compares
against the same held-out digits.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F

HELDOUT_FRACTION = 0.3
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Digits:
    """Train and held-out images (N, 1, R, R) in [-1, 1] with their labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor

    @property
    def resolution(self) -> int:
        return int(self.train_images.shape[-1])


@functools.lru_cache(maxsize=4)
def load_digits(resolution: int = 16) -> Digits:
    """The digits at ``resolution`` with the fixed train / held-out split."""
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    images = torch.from_numpy(raw.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(raw.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(labels)))
    n_heldout = int(round(HELDOUT_FRACTION * len(labels)))
    held, train = order[:n_heldout], order[n_heldout:]
    return Digits(images[train].clamp(-1, 1), labels[train], images[held].clamp(-1, 1), labels[held])
