"""`dasam3 evaluate`: score predicted label maps against ground truth, per case and class, in 3-D.

    dasam3 evaluate --pred PRED_DIR --gt GT_DIR [--dataset synapse|btcv|acdc|mmwhs]
        [--spacing-from gt|pred|none] [--labels 1,2,...] [--protocol mm|transunet] [--out DIR] [--overwrite]

Predictions and ground truth are NIfTI label maps paired by file name (every gt file needs a
prediction of the same name, in the same voxel grid). Arrays are scored in the files' own voxel order;
HD95 is in mm with the voxel sizes of the `--spacing-from` file ("none": voxels). `--protocol mm` uses
the strict empty-mask rule, `--protocol transunet` TransUNet's rule and voxel units (see
`dasam3.evaluation`). Labels default to every non-zero value in the gt files; class names come from the
`predict` legends (`<name>.json` beside the predictions) when there are any.

`--dataset NAME` reads the ground truth as that dataset distributes it: its file names are paired with
the predictions of its image files (BTCV/Synapse `label0001` ↔ `img0001`, ACDC `..._gt` ↔ the frame,
MM-WHS `_label` ↔ `_image`), its stored ids are mapped to the model's classes (raw Synapse's 13 → 8,
MM-WHS 205 … 850 → 1 … 7; see `dasam3.data.ground_truth`), and the classes are named and ordered as
the dataset's. `--protocol` then defaults to the dataset's (transunet for synapse, mm otherwise).

Label spaces must agree, or nothing is scored: prediction or ground-truth labels outside the legends
(with --dataset, outside its classes; without either, prediction labels absent from every ground
truth), legends that disagree between cases, negative labels and affines that differ (a shifted
prediction) are errors naming the files.
`--allow-mismatch` scores such cases anyway, with a warning for each (negative labels stay errors).

Writes `evaluation.json`, `evaluation_cases.csv`, `evaluation_classes.csv` and `evaluation.md` into
--out (default: the prediction folder) and prints the Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..io import DataError, check_can_write, is_nifti, nifti_stem, read_volume
from ..metrics import PROTOCOLS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted label maps")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth label maps")
    parser.add_argument("--spacing-from", choices=("gt", "pred", "none"), default="gt",
                        help="whose voxel sizes give HD95 in mm (none: voxel units)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated labels to score (default: all non-zero gt labels)")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                        help="empty-mask rule and units: strict in mm, or TransUNet's in voxels (default: the "
                             "--dataset's, mm without one)")
    _add_dataset_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: --pred)")
    parser.add_argument("--method", default="model", help="row name in the Markdown table")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="score even when label spaces or affines disagree (a warning for each)")


def _add_dataset_argument(parser: argparse.ArgumentParser) -> None:
    from ..data.ground_truth import GROUND_TRUTH_LAYOUTS

    parser.add_argument("--dataset", choices=tuple(GROUND_TRUTH_LAYOUTS), default=None,
                        help="read the ground truth as this dataset stores it: its file names, label ids "
                             "and class names")


def _dataset_cases(args: argparse.Namespace):
    """(layout or None, [(case id or None, prediction, ground truth)]) for --dataset or plain pairing."""
    if args.dataset is None:
        return None, [(None, pred, gt) for pred, gt in _pairs(args.pred, args.gt)]
    from ..data.ground_truth import GROUND_TRUTH_LAYOUTS

    layout = GROUND_TRUTH_LAYOUTS[args.dataset]
    return layout, layout.pairs(args.pred, args.gt)


def _dataset_class_names(layout, labels: list[int] | None) -> dict[int, str]:
    """The dataset's classes (label → name), all of them or the chosen labels."""
    names = dict(enumerate(layout.classes, start=1))
    unknown = sorted(set(labels or []) - set(names))
    if unknown:
        raise ValueError(f"--labels {unknown} are not {layout.dataset} classes (1..{len(names)})")
    return {label: names[label] for label in (labels or names)}


def _label_volume(path: Path) -> tuple[np.ndarray, object]:
    data, image = read_volume(path)
    labels = np.rint(data).astype(np.int64)
    if not np.array_equal(labels, data):
        raise DataError(f"{path}: a label map must hold integers, found non-integer values")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: a label map holds labels >= 0 (0 = background), found {labels.min()}")
    return labels, image


def _parse_labels(text: str) -> list[int]:
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"--labels must be comma-separated integers, got {text!r}") from error
    if not labels or min(labels) < 1:
        raise ValueError(f"--labels must be positive integers, got {text!r}")
    return labels


def _pairs(pred_dir: Path, gt_dir: Path) -> list[tuple[Path, Path]]:
    for folder in (pred_dir, gt_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"folder not found: {folder}")
    gt_files = sorted(p for p in gt_dir.iterdir() if p.is_file() and is_nifti(p))
    if not gt_files:
        raise FileNotFoundError(f"no .nii or .nii.gz files in {gt_dir}")
    missing = [str(pred_dir / p.name) for p in gt_files if not (pred_dir / p.name).is_file()]
    if missing:
        raise FileNotFoundError("predictions missing for the ground truth: " + ", ".join(missing))
    return [(pred_dir / p.name, p) for p in gt_files]


def _legend_names(pred_dir: Path, allow_mismatch: bool = False) -> dict[int, str]:
    """Class names from `predict` legends beside the predictions (label → concept), checked to agree:
    legends that map labels differently are a DataError naming two of them (merged with a warning
    under allow_mismatch)."""
    names: dict[int, str] = {}
    first: Path | None = None
    for legend in sorted(pred_dir.glob("*.json")):
        try:
            labels = {int(k): str(v) for k, v in json.loads(legend.read_text())["labels"].items() if int(k) > 0}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not a predict legend (e.g. an earlier evaluation.json)
        if first is not None and labels != names:
            _mismatch(f"legends disagree: {first} maps {names}, {legend} maps {labels}", allow_mismatch)
        names, first = {**names, **labels}, first or legend
    return names


def _mismatch(message: str, allowed: bool) -> None:
    """A disagreement between the files: an error, or with --allow-mismatch a warning."""
    if not allowed:
        raise DataError(f"{message} (pass --allow-mismatch to score anyway)")
    print(f"dasam3 evaluate: warning: {message}", file=sys.stderr)


def check_label_space(pred: np.ndarray, gt: np.ndarray, pred_path: Path, gt_path: Path, space: set[int] | None,
                      allowed: bool) -> None:
    """Every label of the prediction and of the ground truth must be in `space` (0 included), the labels
    the legend names, or with no legend the ground truth's labels; None: not checked (--labels)."""
    if space is None:
        return
    for path, values in ((pred_path, pred), (gt_path, gt)):
        outside = sorted(set(np.unique(values).tolist()) - space)
        if outside:
            _mismatch(f"{path} holds labels {outside} outside the label space {sorted(space)}", allowed)


def load_case(pred_path: Path, gt_path: Path, spacing_from: str, allow_mismatch: bool = False):
    """(case_id, pred [X, Y, Z], gt [X, Y, Z], spacing or None) with the shapes checked."""
    import nibabel as nib

    pred, pred_image = _label_volume(pred_path)
    gt, gt_image = _label_volume(gt_path)
    if pred.shape != gt.shape:
        raise DataError(f"{pred_path}: shape {pred.shape} differs from the ground truth "
                        f"{gt_path} shape {gt.shape}")
    if not np.allclose(pred_image.affine, gt_image.affine, atol=1e-3):
        shift = float(np.abs(pred_image.affine - gt_image.affine).max())
        _mismatch(f"{pred_path} and {gt_path} have different affines (up to {shift:.3g} apart)", allow_mismatch)
    source = {"gt": gt_image, "pred": pred_image, "none": None}[spacing_from]
    spacing = None if source is None else tuple(nib.affines.voxel_sizes(source.affine)[:3])
    return nifti_stem(gt_path), pred, gt, spacing


def _gt_labels(pairs) -> list[int]:
    """Every non-zero label in the ground truth (one file in memory at a time)."""
    labels: set[int] = set()
    for _, gt_path in pairs:
        labels.update(np.unique(_label_volume(gt_path)[0]).tolist())
    return sorted(labels - {0})


def run(args: argparse.Namespace) -> int:
    from ..evaluation import EvaluationResult, default_protocol, result_paths, score_volume

    try:
        layout, cases = _dataset_cases(args)
        pairs = [(pred, gt) for _, pred, gt in cases]
        out = args.out or args.pred
        check_can_write(result_paths(out), args.overwrite)
        if layout is not None:
            class_names = _dataset_class_names(layout, _parse_labels(args.labels) if args.labels else None)
            space = set(range(len(layout.classes) + 1))
        else:
            labels = _parse_labels(args.labels) if args.labels else _gt_labels(pairs)
            if not labels:
                raise ValueError(f"the ground truth in {args.gt} has no non-zero label; pass --labels")
            legend = _legend_names(args.pred, args.allow_mismatch)
            class_names = {label: legend.get(label, f"label {label}") for label in labels}
            space = set(legend) | {0} if legend else (None if args.labels else set(labels) | {0})
        protocol = args.protocol or default_protocol(args.dataset)
        scores = []
        for dataset_case_id, pred_path, gt_path in cases:
            case_id, pred, gt, spacing = load_case(pred_path, gt_path, args.spacing_from, args.allow_mismatch)
            if layout is not None:
                gt = layout.remap(gt, gt_path)
            check_label_space(pred, gt, pred_path, gt_path, space, args.allow_mismatch)
            scores += score_volume(pred, gt, class_names, case_id=dataset_case_id or case_id, spacing=spacing,
                                   protocol=protocol)
        hd95_unit = "voxel" if args.spacing_from == "none" else "mm"
        result = EvaluationResult(scores, class_names, protocol, hd95_unit)
        written = result.write(out, method=args.method, overwrite=args.overwrite)
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"dasam3 evaluate: error: {error}", file=sys.stderr)
        return 1
    print(result.to_markdown(args.method), end="")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
