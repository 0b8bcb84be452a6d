"""Training augmentation: flips, rotation, scaling and an intensity shift, reproducible with a seed.

One random affine transform moves the image (bilinear) and the label map (nearest) together, so every
concept mask derived from the label map stays aligned with the image. Draws come from a NumPy
generator the caller seeds (the datasets seed it from (seed, epoch, index), so a sample's
augmentation does not depend on the DataLoader's worker count or order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """Random geometric and intensity changes of one 2-D sample.

    horizontal_flip / vertical_flip: probability of mirroring left↔right / top↔bottom. A left-right
    flip swaps the sides of the body, so datasets with lateral classes ("left kidney") leave it off
    (see `SliceDataset.default_augmentation`).
    rotation_degrees: the angle is uniform in ±rotation_degrees. scale: zoom factor range (> 1 zooms in).
    intensity_shift: a uniform offset in ±intensity_shift is added, then the image is clipped to [0, 1].
    """

    horizontal_flip: float = 0.5
    vertical_flip: float = 0.0
    rotation_degrees: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    intensity_shift: float = 0.1

    def __post_init__(self):
        for name in ("horizontal_flip", "vertical_flip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")

    def __call__(self, image: torch.Tensor, label: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """image: float [C, H, W] in [0, 1]; label: int64 [H, W]. Returns both transformed."""
        flip_x = -1.0 if rng.random() < self.horizontal_flip else 1.0
        flip_y = -1.0 if rng.random() < self.vertical_flip else 1.0
        angle = math.radians(rng.uniform(-self.rotation_degrees, self.rotation_degrees))
        zoom = rng.uniform(*self.scale)
        shift = rng.uniform(-self.intensity_shift, self.intensity_shift)

        # affine_grid maps output coordinates to input coordinates in [-1, 1]: rotate, then
        # divide by the zoom (zoom > 1 samples a smaller region = enlarges), then mirror.
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        theta = torch.tensor([[flip_x * cos, -flip_x * sin, 0.0],
                              [flip_y * sin, flip_y * cos, 0.0]], dtype=torch.float32)
        grid = F.affine_grid(theta[None], [1, 1, *image.shape[-2:]], align_corners=False)
        warped = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)[0]
        warped_label = F.grid_sample(label[None, None].float(), grid, mode="nearest",
                                     padding_mode="zeros", align_corners=False)[0, 0]
        return (warped + shift).clamp_(0.0, 1.0).to(image.dtype), warped_label.to(label.dtype)
