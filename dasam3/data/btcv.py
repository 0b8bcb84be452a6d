"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen): 30 labelled CT volumes, 13 organs.

Files, as the challenge distributes them (`RawData/Training/img/img0001.nii.gz`,
`RawData/Training/label/label0001.nii.gz`; `root` may be the folder holding `RawData`, holding
`Training`, or holding `img`/`label`) or in MONAI's layout (`imagesTr/img0001.nii.gz`,
`labelsTr/label0001.nii.gz`). CT is windowed to [-175, 250] HU and scaled to [0, 1], the window of
MONAI's UNETR / Swin-UNETR BTCV recipe (`ScaleIntensityRanged(a_min=-175, a_max=250)`), whose split this
is too (`window=` changes it); slices are axial; 256² by default. Labels: the challenge's 13 ids, in
their order (1 spleen ... 13 left adrenal gland).

Split: 24 training / 6 test cases, the split of MONAI's UNETR / Swin-UNETR BTCV experiments
(`dataset_0.json`: validation = img0035–img0040).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Sequence

from ..io import require_file
from .base import Case, LabelRemap, NiftiCase, SliceDataset, first_existing, split_members
from .transforms import BTCV_CT_WINDOW, CT_WINDOW, normalize_ct

BTCV_CLASSES = (
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland",
    "left adrenal gland",
)
# The 30 labelled training volumes of the challenge.
BTCV_CASES = tuple(f"{n:04d}" for n in (*range(1, 11), *range(21, 41)))
BTCV_TEST_CASES = ("0035", "0036", "0037", "0038", "0039", "0040")
BTCV_TRAIN_CASES = tuple(c for c in BTCV_CASES if c not in BTCV_TEST_CASES)
BTCV_SPLITS = {"train": BTCV_TRAIN_CASES, "test": BTCV_TEST_CASES}
BTCV_IMAGE_SIZE = 256
# The 13 stored labels are the classes themselves.
BTCV_REMAP = LabelRemap.identity(len(BTCV_CLASSES))


def abdomen_ct_files(root: str | os.PathLike, case_id: str) -> tuple[Path, Path]:
    """(image, label) paths of one BTCV/Synapse raw case, in either distributed layout."""
    root = Path(root)
    image_name, label_name = f"img{case_id}.nii.gz", f"label{case_id}.nii.gz"
    layouts = [(base / "img", base / "label")
               for base in (root / "RawData" / "Training", root / "Training", root)]
    layouts.append((root / "imagesTr", root / "labelsTr"))
    image = first_existing([images / image_name for images, _ in layouts], f"CT image of case {case_id}")
    label = require_file(dict(layouts)[image.parent] / label_name, f"label of case {case_id}")
    return image, label


def abdomen_ct_cases(root: str | os.PathLike, case_ids: Sequence[str], remap: LabelRemap,
                     window: Sequence[float] = CT_WINDOW) -> list[Case]:
    """Raw abdominal CT cases (BTCV's files) with the given label remap."""
    normalize = partial(normalize_ct, window=tuple(window))
    return [NiftiCase(case_id, *abdomen_ct_files(root, case_id), normalize, remap)
            for case_id in case_ids]


def btcv_cases(root: str | os.PathLike, split: str = "train",
               window: Sequence[float] = BTCV_CT_WINDOW) -> list[Case]:
    return abdomen_ct_cases(root, split_members(BTCV_SPLITS, split, "BTCV"), BTCV_REMAP, window)


class BTCVDataset(SliceDataset):
    """BTCV axial slices with 13 organ concepts (see the module docstring for files and split)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *,
                 image_size: int = BTCV_IMAGE_SIZE, window: Sequence[float] = BTCV_CT_WINDOW, **options):
        super().__init__(btcv_cases(root, split, window), BTCV_CLASSES, image_size=image_size,
                         **options)
        self.record_preprocessing("btcv", "ct", window, "axial")
