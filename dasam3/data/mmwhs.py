"""MM-WHS (Multi-Modality Whole Heart Segmentation), CT part: 20 labelled volumes, 7 structures; 256².

Files: `ct_train_1001_image.nii.gz` / `ct_train_1001_label.nii.gz` in `root/ct_train/` or `root/`.
Stored label values 205, 420, 500, 550, 600, 820, 850 become 1..7 (LV myocardium, left atrium, LV
blood pool, right atrium, right ventricle, ascending aorta, pulmonary artery). Some releases hold a
stray value 421 on a few left-atrium voxels: it is read as the left atrium, with a `DataWarning`.

Intensities: `CARDIAC_CT_WINDOW`, [0 HU, the volume's 98th percentile] scaled to [0, 1], after
xmed-lab/GenericSSL's MM-WHS preprocessing. The abdominal window [-125, 275] would saturate
contrast-filled blood (above 275 HU) and erase the blood-pool / myocardium contrast. `window=` changes it
(numbers in HU, or "pNN" percentiles). Slices are axial.

Splits (`split_scheme=`): the challenge withholds its test labels, so the 20 labelled volumes are split
here, 16 / 4:

- "uda" (default): test = 1003, 1008, 1014, 1019, the CT test cases of the cross-modality (MR ↔ CT)
  benchmark split that most CT papers reuse (e.g. GenericSSL's preprocessing lists them);
- "last4": test = 1017, 1018, 1019, 1020 (the last four).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Sequence

from ..io import require_file
from .base import Case, LabelRemap, NiftiCase, SliceDataset, first_existing, split_members
from .transforms import CARDIAC_CT_WINDOW, normalize_ct

MMWHS_CLASSES = ("left ventricle myocardium", "left atrium", "left ventricle blood pool",
                 "right atrium", "right ventricle", "ascending aorta", "pulmonary artery")
MMWHS_LABEL_VALUES = (205, 420, 500, 550, 600, 820, 850)
MMWHS_STRAY_LEFT_ATRIUM = 421
MMWHS_REMAP = LabelRemap({0: 0, **{v: i for i, v in enumerate(MMWHS_LABEL_VALUES, start=1)}},
                         strays={MMWHS_STRAY_LEFT_ATRIUM: (2, "a stray left-atrium value some MM-WHS releases hold")})
MMWHS_CASES = tuple(str(n) for n in range(1001, 1021))


def _split(test_cases: Sequence[str]) -> dict[str, tuple[str, ...]]:
    return {"train": tuple(c for c in MMWHS_CASES if c not in test_cases), "test": tuple(test_cases)}


MMWHS_SPLIT_SCHEMES = {"uda": _split(("1003", "1008", "1014", "1019")),
                       "last4": _split(("1017", "1018", "1019", "1020"))}
MMWHS_DEFAULT_SCHEME = "uda"
MMWHS_SPLITS = MMWHS_SPLIT_SCHEMES[MMWHS_DEFAULT_SCHEME]
MMWHS_TEST_CASES, MMWHS_TRAIN_CASES = MMWHS_SPLITS["test"], MMWHS_SPLITS["train"]
MMWHS_IMAGE_SIZE = 256


def mmwhs_cases(root: str | os.PathLike, split: str = "train",
                window: Sequence[float | str] = CARDIAC_CT_WINDOW,
                split_scheme: str = MMWHS_DEFAULT_SCHEME) -> list[Case]:
    """The cases of `split` under the named `split_scheme` (see the module docstring)."""
    if split_scheme not in MMWHS_SPLIT_SCHEMES:
        raise ValueError(f"MMWHS split_scheme must be one of {list(MMWHS_SPLIT_SCHEMES)}, got {split_scheme!r}")
    splits = MMWHS_SPLIT_SCHEMES[split_scheme]
    root, cases = Path(root), []
    normalize = partial(normalize_ct, window=tuple(window))
    for case_id in split_members(splits, split, "MMWHS"):
        name = f"ct_train_{case_id}"
        image = first_existing([root / "ct_train" / f"{name}_image.nii.gz",
                                root / f"{name}_image.nii.gz"], f"MMWHS CT image {case_id}")
        label = require_file(image.parent / f"{name}_label.nii.gz", f"MMWHS CT label {case_id}")
        cases.append(NiftiCase(case_id, image, label, normalize, MMWHS_REMAP))
    return cases


class MMWHSDataset(SliceDataset):
    """MM-WHS CT axial slices with 7 cardiac structure concepts (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *,
                 image_size: int = MMWHS_IMAGE_SIZE, window: Sequence[float | str] = CARDIAC_CT_WINDOW,
                 split_scheme: str = MMWHS_DEFAULT_SCHEME, **options):
        super().__init__(mmwhs_cases(root, split, window, split_scheme), MMWHS_CLASSES,
                         image_size=image_size, **options)
        self.record_preprocessing("mmwhs", "ct", window, "axial", f"split {split_scheme}")
