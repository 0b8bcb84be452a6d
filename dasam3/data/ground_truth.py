"""Ground truth as each dataset distributes it, for scoring predictions in the model's label space.

`dasam3 evaluate --dataset NAME` pairs the dataset's label files with the predictions `dasam3 predict`
wrote for its image files, and maps the stored label ids to the model's classes with the same remap
the loader uses (raw Synapse liver 6 → 5, MM-WHS 205 … 850 → 1 … 7):

| dataset | ground truth | prediction named after | ids |
|---|---|---|---|
| synapse | `label0001.nii.gz` (raw, 13 ids) | `img0001.nii.gz` (or `label0001.nii.gz`) | 13 → 8 (SAMed's) |
| btcv | `label0001.nii.gz` | `img0001.nii.gz` (or `label0001.nii.gz`) | the 13 as stored |
| acdc | `patient001_frame01_gt.nii.gz` | `patient001_frame01.nii.gz` (or the gt name) | as stored |
| mmwhs | `ct_train_1001_label.nii.gz` | `ct_train_1001_image.nii.gz` (or the label name) | 205 … 850 → 1 … 7 |

Both folders are searched recursively (ACDC keeps one folder per patient).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..io import is_nifti, nifti_stem
from .acdc import ACDC_CLASSES, ACDC_REMAP
from .base import LabelRemap
from .btcv import BTCV_CLASSES, BTCV_REMAP
from .mmwhs import MMWHS_CLASSES, MMWHS_REMAP
from .synapse import SYNAPSE_CLASSES, SYNAPSE_RAW_REMAP


@dataclass(frozen=True)
class GroundTruthLayout:
    """How one dataset names and stores its ground truth.

    label_stem: a regular expression a ground-truth file stem matches in full, with a `case` group;
    prediction_stems: the stems a prediction of that case may have (`{case}` filled in), in order.
    """

    dataset: str
    classes: tuple[str, ...]
    remap: LabelRemap
    label_stem: str
    prediction_stems: tuple[str, ...]

    def case_id(self, gt_path: Path) -> str | None:
        """The case id of a ground-truth file, or None when the file is not one of this dataset's."""
        match = re.fullmatch(self.label_stem, nifti_stem(gt_path))
        return match.group("case") if match else None

    def pairs(self, pred_dir: Path, gt_dir: Path) -> list[tuple[str, Path, Path]]:
        """(case id, prediction, ground truth) for every ground-truth file of the dataset under gt_dir."""
        for folder in (pred_dir, gt_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"folder not found: {folder}")
        gt_files = sorted(p for p in gt_dir.rglob("*") if p.is_file() and is_nifti(p) and self.case_id(p))
        if not gt_files:
            raise FileNotFoundError(f"no {self.dataset} ground truth in {gt_dir} (file stems matching "
                                    f"{self.label_stem!r}, .nii or .nii.gz)")
        predictions: dict[str, list[Path]] = {}
        for path in sorted(pred_dir.rglob("*")):
            if path.is_file() and is_nifti(path) and path not in gt_files:
                predictions.setdefault(nifti_stem(path), []).append(path)
        pairs, missing = [], []
        for gt in gt_files:
            case = self.case_id(gt)
            stems = [stem.format(case=case) for stem in self.prediction_stems]
            found = [path for stem in stems for path in predictions.get(stem, [])]
            if not found:
                missing.append(f"{gt.name} (expected {' or '.join(s + '.nii.gz' for s in stems)})")
            elif len(found) > 1:
                raise ValueError(f"several predictions for {gt}: {', '.join(map(str, found))}")
            else:
                pairs.append((case, found[0], gt))
        if missing:
            raise FileNotFoundError(f"predictions missing in {pred_dir} for: " + "; ".join(missing))
        return pairs


_ABDOMEN = {"label_stem": r"label(?P<case>\d{4})", "prediction_stems": ("img{case}", "label{case}")}
GROUND_TRUTH_LAYOUTS = {
    "synapse": GroundTruthLayout("synapse", SYNAPSE_CLASSES, SYNAPSE_RAW_REMAP, **_ABDOMEN),
    "btcv": GroundTruthLayout("btcv", BTCV_CLASSES, BTCV_REMAP, **_ABDOMEN),
    "acdc": GroundTruthLayout("acdc", ACDC_CLASSES, ACDC_REMAP, r"(?P<case>patient\d{3}_frame\d{2})_gt",
                              ("{case}", "{case}_gt")),
    "mmwhs": GroundTruthLayout("mmwhs", MMWHS_CLASSES, MMWHS_REMAP, r"ct_train_(?P<case>\d{4})_label",
                               ("ct_train_{case}_image", "ct_train_{case}_label")),
}
