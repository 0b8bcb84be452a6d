"""MM-WHS (Multi-Modality Whole Heart Segmentation), CT part: 20 labelled volumes, 7 structures; 256².

Files: `ct_train_1001_image.nii.gz` / `ct_train_1001_label.nii.gz` in `root/ct_train/` or `root/`.
Stored label values 205, 420, 500, 550, 600, 820, 850 become 1..7 (LV myocardium, left atrium, LV
blood pool, right atrium, right ventricle, ascending aorta, pulmonary artery). CT is windowed to
[-125, 275] HU and scaled to [0, 1] (`window=` changes it); slices are axial.

Split: the challenge withholds its test labels, so the 20 labelled volumes are split here, 16 / 4:
test = 1017, 1018, 1019, 1020 (the last four), train = 1001–1016.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Sequence

from ..io import require_file
from .base import Case, LabelRemap, NiftiCase, SliceDataset, first_existing, split_members
from .transforms import CT_WINDOW, normalize_ct

MMWHS_CLASSES = ("left ventricle myocardium", "left atrium", "left ventricle blood pool",
                 "right atrium", "right ventricle", "ascending aorta", "pulmonary artery")
MMWHS_LABEL_VALUES = (205, 420, 500, 550, 600, 820, 850)
MMWHS_REMAP = LabelRemap({0: 0, **{v: i for i, v in enumerate(MMWHS_LABEL_VALUES, start=1)}})
MMWHS_CASES = tuple(str(n) for n in range(1001, 1021))
MMWHS_TEST_CASES = ("1017", "1018", "1019", "1020")
MMWHS_TRAIN_CASES = tuple(c for c in MMWHS_CASES if c not in MMWHS_TEST_CASES)
MMWHS_SPLITS = {"train": MMWHS_TRAIN_CASES, "test": MMWHS_TEST_CASES}
MMWHS_IMAGE_SIZE = 256


def mmwhs_cases(root: str | os.PathLike, split: str = "train",
                window: Sequence[float] = CT_WINDOW) -> list[Case]:
    root, cases = Path(root), []
    normalize = partial(normalize_ct, window=tuple(window))
    for case_id in split_members(MMWHS_SPLITS, split, "MMWHS"):
        name = f"ct_train_{case_id}"
        image = first_existing([root / "ct_train" / f"{name}_image.nii.gz",
                                root / f"{name}_image.nii.gz"], f"MMWHS CT image {case_id}")
        label = require_file(image.parent / f"{name}_label.nii.gz", f"MMWHS CT label {case_id}")
        cases.append(NiftiCase(case_id, image, label, normalize, MMWHS_REMAP))
    return cases


class MMWHSDataset(SliceDataset):
    """MM-WHS CT axial slices with 7 cardiac structure concepts (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *,
                 image_size: int = MMWHS_IMAGE_SIZE, window: Sequence[float] = CT_WINDOW, **options):
        super().__init__(mmwhs_cases(root, split, window), MMWHS_CLASSES, image_size=image_size,
                         **options)
