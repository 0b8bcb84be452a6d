"""Small built-in encoders: a conv image encoder trained with the model, and a deterministic text encoder."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import nn

from .base import CachedTextEncoder, ImageEncoder


class ImageLayerNorm(nn.GroupNorm):
    """LayerNorm over a whole feature map [N, C, H, W] (its channels and pixels), per-channel affine.

    (GroupNorm with one group computes exactly this.)  Not BatchNorm: no running statistics to drift
    while the encoder is frozen but the model trains, no dependence on small batches.  Not a per-pixel
    LayerNorm over channels: that is blind to a pixel's scale and would normalise an MRI intensity away
    at the first layer.  It trains with the encoder ("pretrain"); the paper's stages keep the encoder,
    norms included, entirely frozen (only the fusion decoder's LayerNorms train in "warmup").
    """

    def __init__(self, num_channels: int):
        super().__init__(1, num_channels)


def _conv_norm_act(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            ImageLayerNorm(out_channels), nn.GELU()]


class ConvImageEncoder(ImageEncoder):
    """A compact conv net for dense prediction: level 0 at full resolution, each next level at half.

    widths: channels per level, finest first; with 4 levels a 128² image gives 128², 64², 32² and
    16² feature maps (the 16² level becomes the decoder's 256 visual tokens).
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (16, 32, 64, 96)):
        super().__init__()
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"widths must list at least two positive channel counts, got {list(widths)}")
        self.channels = list(widths)
        previous, levels = in_channels, []
        for index, width in enumerate(self.channels):
            stride = 1 if index == 0 else 2
            levels.append(nn.Sequential(*_conv_norm_act(previous, width, stride), *_conv_norm_act(width, width)))
            previous = width
        self.levels = nn.ModuleList(levels)

    def grid_size(self, image_size: int) -> tuple[int, int]:
        side = image_size
        for _ in self.channels[1:]:
            side = (side + 1) // 2  # a 3×3 conv with stride 2 and padding 1
        return side, side

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features, x = [], images
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class HashTextEncoder(CachedTextEncoder):
    """A fixed random unit vector per concept string (seeded by its SHA-256): deterministic, no weights."""

    def __init__(self, dim: int = 64):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim

    def _compute(self, concepts: list[str]) -> torch.Tensor:
        rows = []
        for concept in concepts:
            seed = int.from_bytes(hashlib.sha256(concept.encode("utf-8")).digest()[:8], "little")
            row = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
            rows.append(row / row.norm())
        return torch.stack(rows)
