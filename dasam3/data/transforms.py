"""Intensity normalisation and resizing shared by the loaders, evaluation and `dasam3 predict`.

One function per step, used everywhere, so that a model sees at prediction time exactly the inputs it
was trained on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..io import CT_WINDOW, MODALITIES, Modality  # noqa: F401 (re-exported; defined without torch)

MRI_PERCENTILES: tuple[float, float] = (0.5, 99.5)
# BTCV: MONAI's UNETR / Swin-UNETR BTCV recipe (ScaleIntensityRanged a_min=-175, a_max=250).
BTCV_CT_WINDOW: tuple[float, float] = (-175.0, 250.0)
# Cardiac CT (MM-WHS): contrast-filled blood lies above 275 HU, where the abdominal window saturates.
# xmed-lab/GenericSSL's MM-WHS preprocessing clips to [0, the 98th percentile] and rescales (there the
# percentile of a crop around the labelled heart; here of the whole volume, as prediction has no labels).
CARDIAC_CT_WINDOW: tuple[float, str] = (0.0, "p98")


def window_bound(volume: np.ndarray, bound: float | str) -> float:
    """A window bound in HU: a number, or "pNN", the volume's NN-th percentile."""
    if isinstance(bound, str):
        try:
            percentile = float(bound[1:]) if bound.startswith("p") else None
        except ValueError:
            percentile = None
        if percentile is None or not 0 <= percentile <= 100:
            raise ValueError(f"a CT window bound is a number or 'pNN' (a percentile), got {bound!r}")
        return float(np.percentile(volume, percentile))
    return float(bound)


def normalize_ct(volume: np.ndarray, window: Sequence[float | str] = CT_WINDOW) -> np.ndarray:
    """Clip Hounsfield units to `window` (numbers, or "pNN" percentiles of the volume) and scale it to
    [0, 1] (float32, same shape)."""
    volume = np.asarray(volume, dtype=np.float32)
    low, high = window_bound(volume, window[0]), window_bound(volume, window[1])
    if not high > low:
        raise ValueError(f"CT window must be (low, high) with high > low, got {tuple(window)} = ({low}, {high})")
    volume = np.clip(volume, low, high)
    return (volume - low) / (high - low)


def normalize_mri(volume: np.ndarray, percentiles: Sequence[float] = MRI_PERCENTILES) -> np.ndarray:
    """Robust scaling: the volume's `percentiles` (over all voxels) map to 0 and 1, then clip.

    A constant volume maps to zeros.
    """
    volume = np.asarray(volume, dtype=np.float32)
    low, high = (np.float32(p) for p in np.percentile(volume, percentiles))
    if high <= low:
        return np.zeros_like(volume)
    return np.clip((volume - low) / (high - low), 0.0, 1.0, dtype=np.float32)


def normalize(volume: np.ndarray, modality: Modality, ct_window: Sequence[float | str] = CT_WINDOW) -> np.ndarray:
    """`normalize_ct` or `normalize_mri` by name."""
    if modality == "ct":
        return normalize_ct(volume, ct_window)
    if modality == "mri":
        return normalize_mri(volume)
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


def resize_images(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) of images [B, C, h, w] → [B, C, *size]."""
    size = tuple(int(n) for n in size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize (pixel centres, no new label values) of labels [B, h, w] → [B, *size]."""
    size = tuple(int(n) for n in size)
    if tuple(labels.shape[-2:]) == size:
        return labels
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")
    return resized[:, 0].to(labels.dtype)
