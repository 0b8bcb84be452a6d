"""Synthetic volumes with known masks, for fast tests: a bright ellipsoid ("disc" in each slice) and
a darker box ("square") on a smooth noisy background. Seedable; the train and test splits draw from
disjoint seed streams.
"""

from __future__ import annotations

import numpy as np

from .base import ArrayCase, Case, SliceDataset, split_members

SYNTHETIC_CLASSES = ("disc", "square")
SYNTHETIC_SPLITS = {"train": 0, "test": 1}  # split → seed stream


def synthetic_volume(rng: np.random.Generator, depth: int = 8,
                     size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """image float32 [depth, size, size] in [0, 1] and label int64 of the same shape (0, 1, 2).

    The ellipsoid lies in the left half, the box in the right half, so they never overlap.
    """
    d, y, x = np.indices((depth, size, size), dtype=np.float32)
    label = np.zeros((depth, size, size), dtype=np.int64)
    centre = (rng.uniform(0.4, 0.6) * depth, rng.uniform(0.3, 0.7) * size, rng.uniform(0.2, 0.3) * size)
    radii = (rng.uniform(0.3, 0.5) * depth, rng.uniform(0.12, 0.2) * size, rng.uniform(0.1, 0.18) * size)
    ellipsoid = sum(((g - c) / r) ** 2 for g, c, r in zip((d, y, x), centre, radii)) <= 1.0
    label[ellipsoid] = 1
    top, left = int(rng.integers(2, size // 2)), int(rng.integers(size // 2 + 2, 3 * size // 4))
    height, width = int(rng.integers(size // 8, size // 3)), int(rng.integers(size // 8, size // 5))
    first = int(rng.integers(0, max(depth // 3, 1)))
    label[first:, top:top + height, left:left + width] = 2
    background = 0.15 + 0.1 * np.sin(x / size * rng.uniform(2, 6)) * np.cos(y / size * rng.uniform(2, 6))
    image = np.choose(label, [background, np.full_like(background, 0.8), np.full_like(background, 0.5)])
    image = image + rng.normal(0.0, 0.04, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


def synthetic_cases(split: str = "train", num_cases: int = 3, depth: int = 8, size: int = 48,
                    seed: int = 0) -> list[Case]:
    stream = split_members(SYNTHETIC_SPLITS, split, "synthetic")
    cases = []
    for number in range(num_cases):
        rng = np.random.default_rng([seed, stream, number])
        image, label = synthetic_volume(rng, depth, size)
        cases.append(ArrayCase(f"synthetic_{split}_{number:03d}", image, label, (2.0, 1.0, 1.0)))
    return cases


class SyntheticDataset(SliceDataset):
    """Slices of `num_cases` synthetic volumes, concepts "disc" and "square" (spacing 2 × 1 × 1 mm)."""

    def __init__(self, split: str = "train", *, num_cases: int = 3, depth: int = 8, size: int = 48,
                 image_size: int = 48, seed: int = 0, **options):
        super().__init__(synthetic_cases(split, num_cases, depth, size, seed), SYNTHETIC_CLASSES,
                         image_size=image_size, seed=seed, **options)
        self.record_preprocessing("synthetic", None, None, "axial")  # generated in [0, 1]: no scan modality
