"""Overlap and surface-distance metrics for binary masks, as medpy defines them.

`dice` and `hd95` equal `medpy.metric.binary.dc` and `medpy.metric.binary.hd95` (to 1e-6): the surface
of a mask is the mask minus its binary erosion (connectivity 1 by default), the surface distances of
one mask are the Euclidean distances (in mm when `spacing` is given) from each of its surface voxels to
the nearest surface voxel of the other, and hd95 is the 95th percentile (linear interpolation) of both
directions' distances pooled together. (MONAI's hd95 takes the larger of the two directed 95th
percentiles instead; the two differ on real shapes.) Computed with scipy's distance transform on the
bounding box of both masks plus a one-voxel margin, which gives the same surfaces and distances as the
whole array.

Empty masks. `dice` follows what medpy returns: two empty masks give nan (0/0, undefined), one empty
mask gives 0.0. `hd95` is not
defined when either mask is empty and raises ValueError (medpy raises RuntimeError). Per-case scoring
chooses a policy explicitly with `score_pair(rule=...)`:

- "strict" (the default of this package): gt and prediction both empty → (nan, nan), the class is
  absent and left out of means; exactly one empty → dice 0 and hd95 = the diagonal of the array's
  extent (in mm with spacing), the largest distance the image allows, so a missed or hallucinated
  organ is penalised instead of silently skipped.
- "transunet": the rule of TransUNet/SAMed's `calculate_metric_percase`, for comparison with their
  published tables: both non-empty → (dice, hd95); prediction non-empty but gt empty → (1, 0);
  otherwise (prediction empty) → (0, 0).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np

Rule = Literal["strict", "transunet"]
RULES: tuple[str, ...] = ("strict", "transunet")
# Evaluation protocol (`dasam3 evaluate --protocol`, `dasam3.evaluation`) → empty-mask rule.
PROTOCOLS: dict[str, Rule] = {"mm": "strict", "transunet": "transunet"}


def _as_bool(mask, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2-D or 3-D binary array, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _check_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    return pred, gt


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.ndim == 0:
        spacing = np.full(ndim, float(spacing))
    if spacing.shape != (ndim,) or not np.all(spacing > 0):
        raise ValueError(
            f"spacing must be one positive number or {ndim} of them, got {spacing.tolist()}"
        )
    return spacing


def dice(pred, gt) -> float:
    """Dice coefficient 2|P ∩ G| / (|P| + |G|) of two binary masks (2-D or 3-D); nan if both are empty."""
    pred, gt = _check_pair(pred, gt)
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    if total == 0:
        return math.nan
    return 2.0 * np.count_nonzero(pred & gt) / total


def _surface(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    # border_value=0: voxels on the array's edge count as surface, as in medpy.
    return mask & ~binary_erosion(mask, structure=structure, iterations=1)


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bounding box of both masks plus one voxel (clipped to the array): erosion and distances
    between surface voxels are the same there as in the whole array."""
    union = pred | gt
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(present[0] - 1, 0), present[-1] + 2))
    box = tuple(box)
    return pred[box], gt[box]


def _surfaces(pred, gt, spacing, connectivity: int):
    """Check a pair of non-empty masks once: (pred surface, gt surface, sampling), cropped to the
    union's bounding box plus one voxel."""
    from scipy.ndimage import generate_binary_structure

    pred, gt = _check_pair(pred, gt)
    sampling = _spacing(spacing, pred.ndim)
    for mask, name in ((pred, "pred"), (gt, "gt")):
        if not mask.any():
            raise ValueError(f"{name} is empty: surface distances need a non-empty mask")
    pred, gt = _crop_to_union(pred, gt)
    structure = generate_binary_structure(pred.ndim, connectivity)
    return _surface(pred, structure), _surface(gt, structure), sampling


def _distances(from_surface: np.ndarray, to_surface: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """The distance from each voxel of `from_surface` to the nearest voxel of `to_surface`."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~to_surface, sampling=sampling)[from_surface]


def surface_distances(pred, gt, spacing=None, connectivity: int = 1) -> np.ndarray:
    """Distances from every surface voxel of `pred` to the nearest surface voxel of `gt`.

    pred, gt: non-empty binary [H, W] or [D, H, W]; spacing: voxel size per axis (mm). Returns a 1-D
    array with one distance per surface voxel of pred.
    """
    pred_surface, gt_surface, sampling = _surfaces(pred, gt, spacing, connectivity)
    return _distances(pred_surface, gt_surface, sampling)


def hd95(pred, gt, spacing=None, connectivity: int = 1) -> float:
    """95th percentile of the symmetric surface distances (medpy's `hd95`), in mm with `spacing`.

    pred, gt: non-empty binary [H, W] or [D, H, W]; spacing: one number or one per axis. Raises
    ValueError when either mask is empty (see the module docstring for per-case policies).
    """
    pred_surface, gt_surface, sampling = _surfaces(pred, gt, spacing, connectivity)
    pooled = np.concatenate([
        _distances(pred_surface, gt_surface, sampling),
        _distances(gt_surface, pred_surface, sampling),
    ])
    return float(np.percentile(pooled, 95))


def extent_diagonal(shape: Sequence[int], spacing=None) -> float:
    """Length of the array's diagonal (mm with spacing): the largest distance two voxels can have."""
    sampling = _spacing(spacing, len(shape))
    return float(math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, sampling))))


def score_pair(pred, gt, spacing=None, rule: Rule = "strict") -> tuple[float, float]:
    """(dice, hd95) of one class in one case under an empty-mask rule (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    pred, gt = _check_pair(pred, gt)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if has_pred and has_gt:
        return dice(pred, gt), hd95(pred, gt, spacing)
    if rule == "transunet":
        return (1.0, 0.0) if has_pred else (0.0, 0.0)
    if not has_pred and not has_gt:
        return math.nan, math.nan
    return 0.0, extent_diagonal(pred.shape, spacing)


def calculate_metric_percase(pred, gt) -> tuple[float, float]:
    """TransUNet/SAMed's per-case rule in voxel units (their function of the same name)."""
    return score_pair(pred, gt, None, rule="transunet")
