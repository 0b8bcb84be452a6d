"""Synapse multi-organ CT (the TransUNet / SAMed protocol): 8 organs, 18 training / 12 test cases, 224².

Sources (`source=`):

- "npz": TransUNet's preprocessed training slices `train_npz/caseXXXX_sliceNNN.npz` (arrays `image`,
  CT windowed to [-125, 275] and scaled, and `label`, values 0..8).
- "h5": TransUNet's preprocessed test volumes `test_vol_h5/caseXXXX.npy.h5` (datasets `image`
  [D, H, W] and `label` [D, H, W], values 0..8).
- "raw": the challenge's NIfTI files (see `dasam3.data.btcv` for the layouts) with the 13 labels
  mapped to the 8 organs: spleen 1, right kidney 2, left kidney 3, gallbladder 4, liver 6 → 5,
  stomach 7 → 6, aorta 8 → 7, pancreas 11 → 8, every other organ → background.
- "auto" (default): npz for the training split and h5 for the test split where those folders exist,
  otherwise raw.

Intensities of the preprocessed files: TransUNet's distributed volumes span about [-0.15, 1.2], not
[0, 1] (reported in its issue tracker). They are used as stored, as TransUNet itself does, with a
`DataWarning` naming the file and its range (never clipped silently); a volume whose values exceed 2
holds raw HU and is windowed like the raw files (also with a warning).

The preprocessed files carry no voxel spacing: their volumes report spacing (1, 1, 1) with
`spacing_unit="voxel"` (HD95 in voxels, as the TransUNet protocol scores them), and their slices keep
the orientation TransUNet stored, which need not match the raw files' slice layout; do not mix the two
sources in one model. `dasam3 check-labels` checks which id is which organ on such a volume.

Label order: the SAMed order above (1 spleen ... 8 pancreas), the ids TransUNet's files store.
Tables print TransUNet's Table 1 column order, `SYNAPSE_TABLE_ORDER`.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import DataError, require_file
from .base import Case, DataWarning, LabelRemap, SliceDataset, Volume, split_members
from .btcv import abdomen_ct_cases
from .transforms import CT_WINDOW, normalize_ct

SYNAPSE_CLASSES = ("spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach",
                   "aorta", "pancreas")
SYNAPSE_TEST_CASES = ("0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032",
                      "0035", "0036", "0038")
SYNAPSE_TRAIN_CASES = ("0005", "0006", "0007", "0009", "0010", "0021", "0023", "0024", "0026",
                       "0027", "0028", "0030", "0031", "0033", "0034", "0037", "0039", "0040")
# TransUNet's Table 1 columns (SAMed's too): the order results are printed in.
SYNAPSE_TABLE_ORDER = ("aorta", "gallbladder", "left kidney", "right kidney", "liver", "pancreas", "spleen",
                       "stomach")
SYNAPSE_SPLITS = {"train": SYNAPSE_TRAIN_CASES, "test": SYNAPSE_TEST_CASES}
SYNAPSE_IMAGE_SIZE = 224
# Raw BTCV label (1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver,
# 7 stomach, 8 aorta, 9 IVC, 10 portal/splenic veins, 11 pancreas, 12/13 adrenal glands) → Synapse.
SYNAPSE_RAW_REMAP = LabelRemap({0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 0, 6: 5, 7: 6, 8: 7, 9: 0, 10: 0,
                                11: 8, 12: 0, 13: 0})
SYNAPSE_PREPROCESSED_REMAP = LabelRemap.identity(len(SYNAPSE_CLASSES))
SOURCES = ("auto", "npz", "h5", "raw")
_SLICE_FILE = re.compile(r"case(\d{4})_slice(\d+)\.npz$")
RAW_HU_ABOVE = 2.0  # a preprocessed volume with values above this holds raw Hounsfield units
# Values below this are neither TransUNet's scaled range nor HU-shaped data above RAW_HU_ABOVE.
LOWEST_SCALED = -1.0


def preprocessed_intensities(image: np.ndarray, where: str | os.PathLike,
                             window: Sequence[float] = CT_WINDOW) -> np.ndarray:
    """A preprocessed volume's intensities as the model sees them (see the module docstring): used as
    stored, with a DataWarning when outside [0, 1]; windowed (also with a warning) when they are HU."""
    image = np.asarray(image, dtype=np.float32)
    if not image.size:
        return image
    low, high = float(image.min()), float(image.max())
    if high > RAW_HU_ABOVE:
        warnings.warn(f"{where}: intensities [{low:.4g}, {high:.4g}] exceed {RAW_HU_ABOVE:g}: read as raw HU and "
                      f"windowed to {tuple(window)}", DataWarning, stacklevel=3)
        return normalize_ct(image, window)
    if low < LOWEST_SCALED:
        raise DataError(f"{where}: intensities [{low:.4g}, {high:.4g}] are neither scaled CT (about [0, 1]; "
                        f"TransUNet's files span about [-0.15, 1.2]) nor raw HU (values above {RAW_HU_ABOVE:g})")
    if low < -1e-3 or high > 1 + 1e-3:
        warnings.warn(f"{where}: intensities [{low:.4g}, {high:.4g}] lie outside [0, 1] (TransUNet's distributed "
                      "files span about [-0.15, 1.2]); used as stored, not clipped, as TransUNet does",
                      DataWarning, stacklevel=3)
    return image


def _preprocessed_volume(case_id: str, image: np.ndarray, label: np.ndarray, path: Path,
                         window: Sequence[float]) -> Volume:
    if image.shape != label.shape:
        raise DataError(f"{path}: image shape {image.shape} does not match label shape {label.shape}")
    return Volume(preprocessed_intensities(image, path, window), SYNAPSE_PREPROCESSED_REMAP(label, path),
                  (1.0, 1.0, 1.0), case_id, spacing_unit="voxel")


class NpzSliceCase(Case):
    """One training case as TransUNet's per-slice npz files (sorted by slice number)."""

    def __init__(self, case_id: str, files: Sequence[Path], window: Sequence[float] = CT_WINDOW):
        self.case_id, self.files, self.window = case_id, list(files), tuple(window)

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
        return image, SYNAPSE_PREPROCESSED_REMAP(label, path)

    def load(self) -> Volume:
        slices = [self._read(path) for path in self.files]
        shapes = {image.shape for image, _ in slices}
        if len(shapes) > 1:
            raise DataError(f"case {self.case_id}: slices of different shapes {sorted(shapes)} in "
                            f"{self.files[0].parent}")
        image = np.stack([image for image, _ in slices])
        label = np.stack([label for _, label in slices])
        where = self.files[0].parent / f"case{self.case_id}_slice*.npz"
        return Volume(preprocessed_intensities(image, where, self.window), label, (1.0, 1.0, 1.0), self.case_id,
                      spacing_unit="voxel")


class H5VolumeCase(Case):
    """One test case as TransUNet's `caseXXXX.npy.h5` volume."""

    def __init__(self, case_id: str, path: Path, window: Sequence[float] = CT_WINDOW):
        self.case_id, self.path, self.window = case_id, path, tuple(window)

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
        return _preprocessed_volume(self.case_id, image, label, self.path, self.window)


def _npz_cases(root: Path, case_ids: Sequence[str], window: Sequence[float]) -> list[Case]:
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
        cases.append(NpzSliceCase(case_id, [path for _, path in sorted(by_case[case_id])], window))
    return cases


def _h5_cases(root: Path, case_ids: Sequence[str], window: Sequence[float]) -> list[Case]:
    paths = [require_file(root / "test_vol_h5" / f"case{c}.npy.h5", f"volume of case {c}")
             for c in case_ids]
    return [H5VolumeCase(c, path, window) for c, path in zip(case_ids, paths)]


def resolve_source(root: str | os.PathLike, split: str, source: str = "auto") -> str:
    """"npz", "h5" or "raw": the source `synapse_cases` reads for this split."""
    if source not in SOURCES:
        raise ValueError(f"Synapse source must be one of {SOURCES}, got {source!r}")
    if source != "auto":
        return source
    preprocessed, folder = ("npz", "train_npz") if split == "train" else ("h5", "test_vol_h5")
    return preprocessed if (Path(root) / folder).is_dir() else "raw"


def synapse_cases(root: str | os.PathLike, split: str = "train", source: str = "auto",
                  window: Sequence[float] = CT_WINDOW) -> list[Case]:
    """The cases of a split from the chosen source (see the module docstring)."""
    root, case_ids = Path(root), split_members(SYNAPSE_SPLITS, split, "Synapse")
    source = resolve_source(root, split, source)
    if source == "npz":
        return _npz_cases(root, case_ids, window)
    if source == "h5":
        return _h5_cases(root, case_ids, window)
    return abdomen_ct_cases(root, case_ids, SYNAPSE_RAW_REMAP, window)


class SynapseDataset(SliceDataset):
    """Synapse slices with the 8 organ concepts (see the module docstring for sources and split)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *, source: str = "auto",
                 image_size: int = SYNAPSE_IMAGE_SIZE, window: Sequence[float] = CT_WINDOW,
                 **options):
        super().__init__(synapse_cases(root, split, source, window), SYNAPSE_CLASSES,
                         image_size=image_size, **options)
        self.record_preprocessing("synapse", "ct", window, "axial", resolve_source(root, split, source))
