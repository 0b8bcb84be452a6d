"""ACDC (Automated Cardiac Diagnosis Challenge): cine MRI, right ventricle 1, myocardium 2, left
ventricle 3; the official 100 training / 50 test patients; 256².

Files: `root/training/patient001/patient001_frame01.nii.gz` and `..._frame01_gt.nii.gz`, with the
end-diastolic and end-systolic frame numbers in `patient001/Info.cfg` (`ED: 1`, `ES: 12`); patients
101–150 under `root/testing/`. Each patient gives two cases, `patient001_ED` and `patient001_ES`.
Slices follow the files' own third axis (the short-axis stack, plane="native"); intensities are
scaled per volume by the 0.5 / 99.5 percentiles.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..io import DataError, require_file
from .base import Case, LabelRemap, NiftiCase, SliceDataset, split_members
from .transforms import normalize_mri

ACDC_CLASSES = ("right ventricle", "myocardium", "left ventricle")
ACDC_TRAIN_PATIENTS = tuple(f"patient{n:03d}" for n in range(1, 101))
ACDC_TEST_PATIENTS = tuple(f"patient{n:03d}" for n in range(101, 151))
ACDC_SPLITS = {"train": ACDC_TRAIN_PATIENTS, "test": ACDC_TEST_PATIENTS}
ACDC_FOLDERS = {"train": "training", "test": "testing"}
ACDC_PHASES = ("ED", "ES")
ACDC_IMAGE_SIZE = 256
ACDC_REMAP = LabelRemap.identity(len(ACDC_CLASSES))


def read_phases(info_path: Path) -> dict[str, int]:
    """The ED and ES frame numbers from a patient's Info.cfg."""
    require_file(info_path, "ACDC Info.cfg")
    text = info_path.read_text(errors="replace")
    phases = {}
    for phase in ACDC_PHASES:
        match = re.search(rf"^\s*{phase}\s*:\s*(\d+)\s*$", text, flags=re.MULTILINE)
        if match is None:
            raise DataError(f"{info_path}: no '{phase}: <frame>' line")
        phases[phase] = int(match.group(1))
    return phases


def acdc_cases(root: str | os.PathLike, split: str = "train") -> list[Case]:
    patients = split_members(ACDC_SPLITS, split, "ACDC")
    folder = Path(root) / ACDC_FOLDERS[split]
    cases = []
    for patient in patients:
        patient_dir = folder / patient
        for phase, frame in read_phases(patient_dir / "Info.cfg").items():
            stem = patient_dir / f"{patient}_frame{frame:02d}"
            image = require_file(f"{stem}.nii.gz", f"ACDC {phase} image")
            label = require_file(f"{stem}_gt.nii.gz", f"ACDC {phase} label")
            cases.append(NiftiCase(f"{patient}_{phase}", image, label, normalize_mri, ACDC_REMAP,
                                   plane="native"))
    return cases


class ACDCDataset(SliceDataset):
    """ACDC short-axis slices with RV / myocardium / LV concepts (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *,
                 image_size: int = ACDC_IMAGE_SIZE, **options):
        super().__init__(acdc_cases(root, split), ACDC_CLASSES, image_size=image_size, **options)
        self.record_preprocessing("acdc", "mri", None, "native")
