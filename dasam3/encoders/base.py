"""What the DA-SAM3 model needs from its encoders."""

from __future__ import annotations

import torch
from torch import nn


class ImageEncoder(nn.Module):
    """f_v: `forward(images [B, C, H, W] in [0, 1]) -> list of [B, channels[i], h_i, w_i]`, finest first.

    The last (coarsest) level gives the fusion decoder's visual tokens; the finer ones feed the mask
    head.  pretrained_source: where the weights come from when they are not the model's own (a local
    directory), or None when they are trained with the model and saved in its checkpoint.
    """

    channels: list[int]
    pretrained_source: str | None = None

    def grid_size(self, image_size: int) -> tuple[int, int]:
        """(h, w) of the coarsest level for a square input of side `image_size`."""
        raise NotImplementedError


class TextEncoder(nn.Module):
    """f_t: `forward(concepts: list[str], device) -> [K, dim]`, one embedding per concept string."""

    dim: int
    pretrained_source: str | None = None


class CachedTextEncoder(TextEncoder):
    """A frozen text encoder whose embeddings are computed once per concept string (and kept on the CPU)."""

    def __init__(self):
        super().__init__()
        self._cache: dict[str, torch.Tensor] = {}

    def _compute(self, concepts: list[str]) -> torch.Tensor:
        """[len(concepts), dim] on the CPU."""
        raise NotImplementedError

    def forward(self, concepts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        missing = list(dict.fromkeys(c for c in concepts if c not in self._cache))
        if missing:
            with torch.no_grad():
                self._cache.update(zip(missing, self._compute(missing).float().cpu()))
        return torch.stack([self._cache[c] for c in concepts]).to(device)
