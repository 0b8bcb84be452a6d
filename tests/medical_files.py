"""Helpers that write small medical files in their real formats for the data and command tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

nib = __import__("pytest").importorskip("nibabel")


def oblique_affine(spacing=(0.8, 1.5, 3.0), angle=0.3, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """An affine with permuted, flipped axes, a rotation and anisotropic voxels (closest axcodes I, L, A)."""
    permute = np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], dtype=float)
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permute @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None,
                slope_inter: tuple[float, float] | None = None) -> Path:
    """Save data as NIfTI-1 (qform and sform both set, code 1 = scanner), optionally int16 + scaling."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header["descrip"] = b"dasam3 test volume"
    if slope_inter is not None:
        image.header.set_slope_inter(*slope_inter)
    nib.save(image, str(path))
    return path


def world_coordinates(shape, affine) -> np.ndarray:
    """World (RAS mm) coordinates of every voxel centre: [3, *shape]."""
    voxels = np.indices(shape).reshape(3, -1)
    world = affine[:3, :3] @ voxels + affine[:3, 3:4]
    return world.reshape(3, *shape)
