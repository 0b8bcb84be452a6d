"""Synapse multi-organ CT (the TransUNet / SAMed protocol): 8 organs, 18 training / 12 test cases, 224².

Sources (`source=`):

- "npz": TransUNet's preprocessed training slices `train_npz/caseXXXX_sliceNNN.npz` (arrays `image`,
  CT already clipped to [-125, 275] and scaled to [0, 1], and `label`, values 0..8).
- "h5": TransUNet's preprocessed test volumes `test_vol_h5/caseXXXX.npy.h5` (datasets `image`
  [D, H, W] in [0, 1] and `label` [D, H, W], values 0..8).
- "raw": the challenge's NIfTI files (see `dasam3.data.btcv` for the layouts) with the 13 labels
  mapped to the 8 organs: spleen 1, right kidney 2, left kidney 3, gallbladder 4, liver 6 → 5,
  stomach 7 → 6, aorta 8 → 7, pancreas 11 → 8, every other organ → background.
- "auto" (default): npz for the training split and h5 for the test split where those folders exist,
  otherwise raw.

The preprocessed files carry no voxel spacing: their volumes report spacing (1, 1, 1) (voxel units,
as the TransUNet protocol scores them), and their slices keep the orientation TransUNet stored, which
need not match the raw files' slice layout; do not mix the two sources in one model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import DataError, require_file
from .base import Case, LabelRemap, SliceDataset, Volume, split_members
from .btcv import abdomen_ct_cases
from .transforms import CT_WINDOW

SYNAPSE_CLASSES = ("spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach",
                   "aorta", "pancreas")
SYNAPSE_TEST_CASES = ("0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032",
                      "0035", "0036", "0038")
SYNAPSE_TRAIN_CASES = ("0005", "0006", "0007", "0009", "0010", "0021", "0023", "0024", "0026",
                       "0027", "0028", "0030", "0031", "0033", "0034", "0037", "0039", "0040")
SYNAPSE_SPLITS = {"train": SYNAPSE_TRAIN_CASES, "test": SYNAPSE_TEST_CASES}
SYNAPSE_IMAGE_SIZE = 224
# Raw BTCV label (1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver,
# 7 stomach, 8 aorta, 9 IVC, 10 portal/splenic veins, 11 pancreas, 12/13 adrenal glands) → Synapse.
SYNAPSE_RAW_REMAP = LabelRemap({0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 0, 6: 5, 7: 6, 8: 7, 9: 0, 10: 0,
                                11: 8, 12: 0, 13: 0})
SYNAPSE_PREPROCESSED_REMAP = LabelRemap.identity(len(SYNAPSE_CLASSES))
SOURCES = ("auto", "npz", "h5", "raw")
_SLICE_FILE = re.compile(r"case(\d{4})_slice(\d+)\.npz$")


def _check_intensities(image: np.ndarray, path: Path) -> np.ndarray:
    if image.size and (image.min() < -1e-3 or image.max() > 1 + 1e-3):
        raise DataError(
            f"{path}: preprocessed image intensities must lie in [0, 1], got "
            f"[{image.min():.4g}, {image.max():.4g}] (raw HU? use source='raw')"
        )
    return image.astype(np.float32)


def _preprocessed_volume(case_id: str, image: np.ndarray, label: np.ndarray, path: Path) -> Volume:
    if image.shape != label.shape:
        raise DataError(f"{path}: image shape {image.shape} does not match label shape {label.shape}")
    return Volume(_check_intensities(image, path), SYNAPSE_PREPROCESSED_REMAP(label, path),
                  (1.0, 1.0, 1.0), case_id)


class NpzSliceCase(Case):
    """One training case as TransUNet's per-slice npz files (sorted by slice number)."""

    def __init__(self, case_id: str, files: Sequence[Path]):
        self.case_id, self.files = case_id, list(files)

    def num_slices(self) -> int:
        return len(self.files)

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            with np.load(path) as data:
                missing = [key for key in ("image", "label") if key not in data.files]
                if missing:
                    raise DataError(f"{path}: npz file lacks the arrays {missing} (has {data.files})")
                image, label = data["image"], data["label"]
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"{path}: cannot read as npz ({error})") from error
        if image.ndim != 2 or image.shape != label.shape:
            raise DataError(
                f"{path}: expected a 2-D image and label of one shape, got {image.shape} and "
                f"{label.shape}")
        return _check_intensities(image, path), SYNAPSE_PREPROCESSED_REMAP(label, path)

    def load(self) -> Volume:
        slices = [self._read(path) for path in self.files]
        shapes = {image.shape for image, _ in slices}
        if len(shapes) > 1:
            raise DataError(f"case {self.case_id}: slices of different shapes {sorted(shapes)} in "
                            f"{self.files[0].parent}")
        image = np.stack([image for image, _ in slices])
        label = np.stack([label for _, label in slices])
        return Volume(image, label, (1.0, 1.0, 1.0), self.case_id)


class H5VolumeCase(Case):
    """One test case as TransUNet's `caseXXXX.npy.h5` volume."""

    def __init__(self, case_id: str, path: Path):
        self.case_id, self.path = case_id, path

    def _open(self):
        try:
            import h5py
        except ImportError as error:  # pragma: no cover - only without the extra
            raise ImportError("reading .h5 volumes needs h5py: pip install 'dasam3[medical]'") from error
        require_file(self.path, "h5 volume")
        try:
            return h5py.File(self.path, "r")
        except Exception as error:
            raise DataError(f"{self.path}: cannot read as HDF5 ({error})") from error

    def _dataset(self, file, name: str):
        if name not in file:
            raise DataError(f"{self.path}: HDF5 file lacks the dataset '{name}'")
        dataset = file[name]
        if dataset.ndim != 3:
            raise DataError(f"{self.path}: '{name}' must be 3-D [D, H, W], got shape {dataset.shape}")
        return dataset

    def num_slices(self) -> int:
        with self._open() as file:
            return self._dataset(file, "image").shape[0]

    def load(self) -> Volume:
        with self._open() as file:
            image = self._dataset(file, "image")[()]
            label = self._dataset(file, "label")[()]
        return _preprocessed_volume(self.case_id, image, label, self.path)


def _npz_cases(root: Path, case_ids: Sequence[str]) -> list[Case]:
    folder = root / "train_npz"
    by_case: dict[str, list[tuple[int, Path]]] = {}
    for path in folder.glob("case*_slice*.npz"):
        match = _SLICE_FILE.search(path.name)
        if match:
            by_case.setdefault(match.group(1), []).append((int(match.group(2)), path))
    cases = []
    for case_id in case_ids:
        if case_id not in by_case:
            raise FileNotFoundError(f"no slices of case {case_id} in {folder} "
                                    f"(expected case{case_id}_sliceNNN.npz)")
        cases.append(NpzSliceCase(case_id, [path for _, path in sorted(by_case[case_id])]))
    return cases


def _h5_cases(root: Path, case_ids: Sequence[str]) -> list[Case]:
    paths = [require_file(root / "test_vol_h5" / f"case{c}.npy.h5", f"volume of case {c}")
             for c in case_ids]
    return [H5VolumeCase(c, path) for c, path in zip(case_ids, paths)]


def synapse_cases(root: str | os.PathLike, split: str = "train", source: str = "auto",
                  window: Sequence[float] = CT_WINDOW) -> list[Case]:
    """The cases of a split from the chosen source (see the module docstring)."""
    if source not in SOURCES:
        raise ValueError(f"Synapse source must be one of {SOURCES}, got {source!r}")
    root, case_ids = Path(root), split_members(SYNAPSE_SPLITS, split, "Synapse")
    if source == "auto":
        preprocessed = "npz" if split == "train" else "h5"
        folder = "train_npz" if split == "train" else "test_vol_h5"
        source = preprocessed if (root / folder).is_dir() else "raw"
    if source == "npz":
        return _npz_cases(root, case_ids)
    if source == "h5":
        return _h5_cases(root, case_ids)
    return abdomen_ct_cases(root, case_ids, SYNAPSE_RAW_REMAP, window)


class SynapseDataset(SliceDataset):
    """Synapse slices with the 8 organ concepts (see the module docstring for sources and split)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *, source: str = "auto",
                 image_size: int = SYNAPSE_IMAGE_SIZE, window: Sequence[float] = CT_WINDOW,
                 **options):
        super().__init__(synapse_cases(root, split, source, window), SYNAPSE_CLASSES,
                         image_size=image_size, **options)
