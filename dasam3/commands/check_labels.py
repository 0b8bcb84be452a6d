"""`dasam3 check-labels`: check on your own copy which label id is which organ (an anatomy check).

    dasam3 check-labels /data/Synapse/test_vol_h5                      # TransUNet's h5 volumes, 8 ids
    dasam3 check-labels /data/Synapse/RawData/Training/label --dataset btcv   # raw NIfTI, 13 ids

PATH is a label file or a folder of them: TransUNet's `caseXXXX.npy.h5` volumes (their `label`, read
with the project's Synapse ids, SAMed's order: 1 spleen ... 8 pancreas), or NIfTI label maps with the
challenge's raw ids (`--dataset synapse`: mapped 13 → 8 as the loader does; `--dataset btcv`: all 13).
For each volume it prints every label's size, centroid and side, then the relations of
`dasam3.data.anatomy` (the liver is the largest organ, each organ on its side of the aorta, ...), each
PASS or FAIL. Exit status 0 when every volume passes every check, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..io import DataError, is_nifti

DATASETS = ("synapse", "btcv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="a label file (.npy.h5, .nii, .nii.gz) or a folder of them")
    parser.add_argument("--dataset", choices=DATASETS, default="synapse",
                        help="whose ids the NIfTI files hold (h5 volumes hold the 8 Synapse ids)")


def label_files(path: Path) -> list[Path]:
    """The label files at `path` (one file, or a folder's .h5 and NIfTI files, sorted)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.name.endswith(".h5") or is_nifti(p)))
    if not files:
        raise FileNotFoundError(f"no .h5, .nii or .nii.gz files in {path}")
    return files


def read_labels(path: Path, dataset: str):
    """(label [S, H, W], class names by id, spacing, oriented) of one file."""
    import numpy as np

    from ..data.btcv import BTCV_CLASSES
    from ..data.synapse import SYNAPSE_CLASSES, SYNAPSE_RAW_REMAP, H5VolumeCase

    if path.name.endswith(".h5"):
        if dataset != "synapse":
            raise ValueError(f"{path}: h5 volumes hold TransUNet's Synapse ids; use --dataset synapse")
        volume = H5VolumeCase(path.stem, path).load()  # ids checked to be 0..8
        return volume.label, dict(enumerate(SYNAPSE_CLASSES, 1)), volume.spacing, False
    from ..io import read_nifti_slices

    data, layout, _ = read_nifti_slices(path, "axial")
    label = np.rint(data).astype(np.int64)
    if dataset == "synapse":
        return SYNAPSE_RAW_REMAP(label, path), dict(enumerate(SYNAPSE_CLASSES, 1)), layout.spacing, True
    return label, dict(enumerate(BTCV_CLASSES, 1)), layout.spacing, True


def run(args: argparse.Namespace) -> int:
    from ..data.anatomy import check_anatomy, report_text

    try:
        files = label_files(args.path)
        passed = 0
        for path in files:
            label, names, spacing, oriented = read_labels(path, args.dataset)
            report = check_anatomy(label, names, spacing, oriented)
            print(f"## {path}\n\n" + report_text(report, "mm" if oriented else "voxels"))
            passed += report.passed
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"dasam3 check-labels: error: {error}", file=sys.stderr)
        return 1
    print(f"{passed} of {len(files)} volumes pass every check"
          + ("" if passed == len(files) else "; a FAIL means the ids are not the organs their names say"))
    return 0 if passed == len(files) else 1
