"""Frozen-feature caching (MedSAM-style): a frozen image encoder's features, computed once per image.

In multi-epoch training with a frozen image encoder (SAM3's ViT is ~95 % of a DA-SAM3 step), the
encoder computes the same features for the same image every epoch.  `FeatureCache` keeps them, keyed
by the image's content (its bytes, shape and dtype), the encoder's weights (a hash of every parameter
and buffer, recomputed only when one of them changed in place or was replaced) and the autocast
state, so a changed image, changed weights or another precision never hit a stale entry.

Bounded: an in-memory LRU tier of `memory_bytes`, and optionally a disk tier (one safetensors file per
image in `directory`, filled until `disk_bytes`; it survives a resume).  Entries that fit neither are
simply recomputed.  Valid only when the images reach the encoder unchanged from epoch to epoch (no
augmentation before the encoder) and the encoder is deterministic (no active dropout): the trainer
refuses `cache_features` with augmentation on, and `encode` refuses an encoder with active dropout.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dasam3.io import atomic_output

GIB = 1 << 30
DEFAULT_MEMORY_GB = 4.0


class FeatureCache:
    """Per-image features of a frozen image encoder: `encode(encoder, images) == encoder(images)`.

    memory_bytes: the in-memory budget (least recently used entries go first); directory, disk_bytes:
    the optional disk tier.  `hits` and `misses` count images.
    """

    def __init__(self, memory_bytes: int = int(DEFAULT_MEMORY_GB * GIB), directory: str | os.PathLike | None = None,
                 disk_bytes: int = 0):
        if memory_bytes < 0 or disk_bytes < 0:
            raise ValueError(f"cache budgets must be >= 0 bytes, got memory {memory_bytes} and disk {disk_bytes}")
        if disk_bytes and directory is None:
            raise ValueError("a disk budget needs a directory for the cache files")
        self.memory_bytes, self.disk_bytes = memory_bytes, disk_bytes
        self.directory = Path(directory) if directory is not None else None
        self._memory: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self._memory_used = 0
        self._disk_used = self._scan_disk()
        self._weights: dict[int, tuple[tuple, str]] = {}  # id(encoder) → (state token, weights hash)
        self.hits = self.misses = 0

    @classmethod
    def from_option(cls, option: bool | dict[str, Any], directory: str | os.PathLike) -> "FeatureCache":
        """From the training option `cache_features`: true (4 GiB in memory) or {memory_gb, disk_gb}."""
        if option is True:
            return cls()
        known = {"memory_gb", "disk_gb"}
        if not isinstance(option, dict) or set(option) - known:
            raise ValueError(f"cache_features must be true, false or a mapping with keys {sorted(known)}, "
                             f"got {option!r}")
        disk = float(option.get("disk_gb", 0))
        return cls(int(float(option.get("memory_gb", DEFAULT_MEMORY_GB)) * GIB), directory if disk else None,
                   int(disk * GIB))

    # -- the cached call -------------------------------------------------------------------------------

    def encode(self, encoder: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        """encoder(images) for images [B, C, H, W] → its levels [B, c_i, h_i, w_i], without autograd.

        A batch with any image not cached runs the encoder on the whole batch (exactly the uncached
        call) and stores every image's features; a fully cached batch runs no encoder at all.
        """
        _refuse_active_dropout(encoder)
        keys = [self._key(encoder, image) for image in images]
        cached = [self._get(key) for key in keys]
        if all(entry is not None for entry in cached):
            self.hits += len(keys)
            return [_batch([entry[level] for entry in cached]).to(images.device) for level in range(len(cached[0]))]
        self.misses += sum(entry is None for entry in cached)
        with torch.no_grad():
            features = list(encoder(images))
        for index, key in enumerate(keys):
            if cached[index] is None:
                self._put(key, [level[index].detach().cpu().clone() for level in features])
        return features

    # -- keys --------------------------------------------------------------------------------------------

    def _key(self, encoder: nn.Module, image: torch.Tensor) -> str:
        digest = hashlib.blake2b(digest_size=20)
        digest.update(self._weights_hash(encoder).encode())
        device = image.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        digest.update(f"{tuple(image.shape)}|{image.dtype}|{autocast}".encode())
        digest.update(image.detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def _weights_hash(self, encoder: nn.Module) -> str:
        """A hash of the encoder's tensors, recomputed only when a tensor was replaced or changed in place
        (torch bumps a tensor's version on every in-place write, optimizer steps and load_state_dict included)."""
        tensors = [*encoder.parameters(), *encoder.buffers()]
        token = tuple((id(t), t._version) for t in tensors)
        known = self._weights.get(id(encoder))
        if known is not None and known[0] == token:
            return known[1]
        digest = hashlib.blake2b(digest_size=20)
        for name, tensor in (*encoder.named_parameters(), *encoder.named_buffers()):
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        self._weights[id(encoder)] = (token, digest.hexdigest())
        return self._weights[id(encoder)][1]

    # -- the two tiers -----------------------------------------------------------------------------------

    def _get(self, key: str) -> list[torch.Tensor] | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        from safetensors.torch import load_file

        stored = load_file(str(path))
        entry = [_as_encoded(stored[f"level{i}"], stored[f"channels_last{i}"]) for i in range(len(stored) // 2)]
        self._remember(key, entry)
        return entry

    def _put(self, key: str, entry: list[torch.Tensor]) -> None:
        self._remember(key, entry)
        path = self._path(key)
        size = _nbytes(entry)
        if path is None or path.exists() or self._disk_used + size > self.disk_bytes:
            return
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as temporary:
            tensors = {f"level{i}": t.contiguous() for i, t in enumerate(entry)}
            tensors |= {f"channels_last{i}": torch.tensor(_channels_last(t)) for i, t in enumerate(entry)}
            save_file(tensors, str(temporary))
        self._disk_used += path.stat().st_size

    def _remember(self, key: str, entry: list[torch.Tensor]) -> None:
        size = _nbytes(entry)
        if size > self.memory_bytes:
            return
        self._memory[key] = entry
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, evicted = self._memory.popitem(last=False)
            self._memory_used -= _nbytes(evicted)

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None or not self.disk_bytes else self.directory / f"{key}.safetensors"

    def _scan_disk(self) -> int:
        if self.directory is None or not self.directory.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.directory.glob("*.safetensors"))


def _channels_last(feature: torch.Tensor) -> bool:
    """Whether one image's feature map [C, H, W] is laid out channels-last (as SAM3's FPN gives it)."""
    return feature.dim() == 3 and feature.shape[0] > 1 and feature.stride(0) == 1


def _as_encoded(feature: torch.Tensor, channels_last: torch.Tensor) -> torch.Tensor:
    return feature.permute(1, 2, 0).contiguous().permute(2, 0, 1) if bool(channels_last) else feature


def _batch(features: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-image features in the memory layout the encoder gave them: the same values in another
    layout would make the next convolutions round differently, so cached training would drift from
    uncached training by float rounding."""
    batch = torch.stack(features)
    return batch.contiguous(memory_format=torch.channels_last) if _channels_last(features[0]) else batch


def _nbytes(entry: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry)


def _refuse_active_dropout(encoder: nn.Module) -> None:
    active = [name for name, m in encoder.named_modules()
              if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
    if active:
        raise ValueError(f"cannot cache the features of an encoder with active dropout (training mode, p > 0 "
                         f"in {active[:3]}): each call gives other features; put the encoder in eval mode")
