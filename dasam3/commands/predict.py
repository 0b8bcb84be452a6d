"""`dasam3 predict`: segment NIfTI volumes slice by slice and write integer label maps.

    dasam3 predict -i scan.nii.gz -o scan_labels.nii.gz --checkpoint CKPT --concept liver \
        --concept spleen --modality ct

Each output has the input's shape, affine and header (data type uint8, int16 beyond 255 labels, no
intensity scaling) and a JSON legend beside it (`scan_labels.json`: label → concept). Slices are taken
along the axial axis of the input's closest canonical orientation (`--plane native` keeps the file's
third axis, for short-axis cardiac stacks). Inputs are normalised like the training data: MRI by its
0.5 / 99.5 percentiles, CT by a HU window, to [0, 1].

How the model was trained decides: a checkpoint written by `dasam3 train` / `demo` holds
`preprocessing.json` (modality, CT window, plane, input size, dataset), and predict uses it; a flag
given on the command line overrides it, with a warning when it differs from the training. Older
checkpoints without the record use the flags, defaulting to `--modality mri --plane axial` and the
window [-125, 275] HU.

Every input header and every output path is checked before the model is loaded: an existing output is
never replaced without --overwrite, an output folder that cannot be written stops the run before any
work, and two inputs whose legends would collide (`case.nii` and `case.nii.gz`) are refused. A bad
input file stops a one-file run; a folder run segments every readable file, reports every bad one (one
line each, naming it) and exits 1; once they are fixed, `--skip-existing` segments just them. NaN/inf
voxels are reported and left out of the normalisation (they become 0). Outputs are written atomically,
so a failed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import (CT_WINDOW, MODALITIES, PLANES, DataError, check_can_write, is_nifti, load_nifti, nifti_stem,
                  read_nifti_slices, require_3d, save_label_map, write_text)

DEFAULT_BATCH_SIZE = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data.preprocessing import window_bound

    parser.add_argument("-i", "--input", required=True, type=Path,
                        help="a NIfTI file (.nii/.nii.gz) or a folder of them")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="output file for one input, or a folder (created) for a folder")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a DASAM3 checkpoint folder")
    parser.add_argument("--concept", action="append", default=None, metavar="TEXT",
                        help="a concept to segment, label i = i-th --concept (repeatable; default: "
                             "the concepts the model was trained on)")
    parser.add_argument("--modality", choices=MODALITIES, default=None,
                        help="intensity normalisation: mri = percentile scaling, ct = HU window (default: as "
                             "the checkpoint was trained, else mri)")
    parser.add_argument("--ct-window", nargs=2, type=window_bound, default=None, metavar=("LOW", "HIGH"),
                        help="HU window for --modality ct; a bound 'pNN' is the volume's NN-th percentile "
                             "(default: the training's, else -125 275)")
    parser.add_argument("--plane", choices=PLANES, default=None,
                        help="slice along the canonical axial axis or the file's own third axis (default: "
                             "the training's, else axial)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="slices per batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--skip-existing", action="store_true",
                        help="leave inputs whose label map and legend both exist (rerun a folder after fixing "
                             "its bad files)")


def training_preprocessing(args: argparse.Namespace, image_size: int) -> dict:
    """modality, ct_window and plane: the flags, else the checkpoint's record (warnings on stderr)."""
    from ..data.preprocessing import Preprocessing, resolve_settings

    flags = {"modality": args.modality, "ct_window": args.ct_window, "plane": args.plane}
    settings, warnings = resolve_settings(Preprocessing.load(args.checkpoint), flags, image_size, args.checkpoint)
    for warning in warnings:
        print(f"dasam3 predict: warning: {warning}", file=sys.stderr)
    return settings


def load_model(checkpoint: Path, device):
    """The only model-dependent step: a DASAM3 model with `config.image_size`, `config.in_channels`,
    `config.concepts` and `predict_labels(images [B, C, S, S], concepts) -> [B, S, S]`."""
    from ..models import DASAM3

    return DASAM3.from_pretrained(checkpoint, map_location=device)


def legend_path(output: Path) -> Path:
    """`out.nii.gz` → `out.json`."""
    return output.with_name(nifti_stem(output) + ".json")


def plan_outputs(source: Path, output: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs: a file to a file (or into a folder), a folder's NIfTI files into a folder."""
    if source.is_dir():
        inputs = sorted(p for p in source.iterdir() if p.is_file() and is_nifti(p))
        if not inputs:
            raise FileNotFoundError(f"no .nii or .nii.gz files in {source}")
        if output.is_file():
            raise ValueError(f"input {source} is a folder, so the output must be a folder, got file {output}")
        return [(path, output / path.name) for path in inputs]
    if not source.is_file():
        raise FileNotFoundError(f"input not found: {source}")
    if not is_nifti(source):
        raise ValueError(f"input must be a .nii or .nii.gz file, got {source}")
    if output.is_dir() or str(output).endswith(os.sep):
        return [(source, output / source.name)]
    if not is_nifti(output):
        raise ValueError(f"output must end in .nii or .nii.gz (or be a folder), got {output}")
    return [(source, output)]


def check_inputs(pairs: Sequence[tuple[Path, Path]]) -> dict[Path, str]:
    """Read every input's header now, before any output is written: input → error, for each bad one."""
    problems = {}
    for source, _ in pairs:
        try:
            require_3d(load_nifti(source).shape, source)
        except (DataError, FileNotFoundError) as error:
            problems[source] = str(error)
    return problems


def check_legends(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Refuse a plan where two outputs would write the same legend (`case.nii`, `case.nii.gz` → case.json)."""
    writers: dict[Path, Path] = {}
    for source, output in pairs:
        legend = legend_path(output)
        if legend in writers:
            raise ValueError(f"{writers[legend]} and {source} would both write the legend {legend}; rename one "
                             "of them")
        writers[legend] = source


def skip_finished(pairs: Sequence[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """The pairs whose label map or legend is still missing (the others are said to be skipped)."""
    remaining = []
    for source, output in pairs:
        if output.is_file() and legend_path(output).is_file():
            print(f"dasam3 predict: skipped {source}: {output} exists", file=sys.stderr)
        else:
            remaining.append((source, output))
    if not remaining:
        raise FileExistsError(f"every output already exists ({len(pairs)} files); nothing to do")
    return remaining


def normalize_finite(slices: np.ndarray, modality: str, ct_window: Sequence[float], source: Path):
    """(volume in [0, 1], number of non-finite voxels): NaN/inf voxels are left out of the normalisation
    (a single NaN would turn the percentiles, and so every voxel, into NaN) and set to 0."""
    from ..data.transforms import normalize

    finite = np.isfinite(slices)
    bad = int(finite.size - np.count_nonzero(finite))
    if bad == 0:
        return normalize(slices, modality, ct_window), 0
    if bad == finite.size:
        raise DataError(f"{source}: every voxel is NaN or infinite")
    volume = np.zeros(slices.shape, dtype=np.float32)
    volume[finite] = normalize(slices[finite], modality, ct_window)
    return volume, bad


def warn_untrained_concepts(concepts: Sequence[str], trained: Sequence[str]) -> None:
    """A concept the checkpoint never saw may still produce labels, but nobody has measured them."""
    unknown = [c for c in concepts if trained and c not in trained]
    if unknown:
        print(f"dasam3 predict: warning: the checkpoint was not trained on {unknown} (trained on {list(trained)}); "
              "their labels are untested", file=sys.stderr)


def predict_file(source: Path, output: Path, segmenter, concepts: Sequence[str], *, image_size: int,
                 channels: int, modality: str, ct_window: Sequence[float] = CT_WINDOW,
                 plane: str = "axial", batch_size: int = DEFAULT_BATCH_SIZE,
                 metadata: dict | None = None) -> None:
    """Segment one NIfTI file with `segmenter` (images [B, channels, S, S] → labels [B, S, S]) and
    write the label map and its legend."""
    from ..evaluation import predict_volume

    slices, layout, image = read_nifti_slices(source, plane)
    volume, non_finite = normalize_finite(slices, modality, ct_window, source)
    if non_finite:
        print(f"dasam3 predict: warning: {source}: {non_finite} of {slices.size} voxels are NaN or infinite; "
              "normalised on the finite ones, those set to 0", file=sys.stderr)
        metadata = {**(metadata or {}), "non_finite_voxels": non_finite}
    labels = predict_volume(volume, segmenter, image_size=image_size, channels=channels,
                            batch_size=batch_size, progress=True, description=source.name)
    if labels.min() < 0 or labels.max() > len(concepts):
        raise ValueError(f"segmenter returned labels outside 0..{len(concepts)} for {source}: "
                         f"[{labels.min()}, {labels.max()}]")
    save_label_map(layout.from_slices(labels), image, output)
    legend = {"labels": {"0": "background", **{str(i): c for i, c in enumerate(concepts, start=1)}},
              "source": str(source), "modality": modality, "plane": plane, **(metadata or {})}
    write_text(legend_path(output), json.dumps(legend, indent=2) + "\n")


def _check_concepts(concepts: Sequence[str]) -> list[str]:
    concepts = [c.strip() for c in concepts]
    if not concepts or any(not c for c in concepts):
        raise ValueError(f"concepts must be non-empty strings, got {concepts}")
    duplicates = sorted({c for c in concepts if concepts.count(c) > 1})
    if duplicates:
        raise ValueError(f"each concept may appear once (it names one label), repeated: {duplicates}")
    return concepts


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .._common import resolve_device
    from ..evaluation import model_segmenter

    failed: list[str] = []
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        pairs = plan_outputs(args.input, args.output)
        for source, output in pairs:
            if output.resolve() == source.resolve():
                raise ValueError(f"output would replace its own input: {output}")
        check_legends(pairs)
        if args.skip_existing:
            pairs = skip_finished(pairs)
        check_can_write([p for _, out in pairs for p in (out, legend_path(out))], args.overwrite)
        unreadable = check_inputs(pairs)
        if unreadable and not args.input.is_dir():
            raise DataError(*unreadable.values())
        failed = list(unreadable.values())
        _report(failed)
        pairs = [(source, output) for source, output in pairs if source not in unreadable]
        if not pairs:
            raise DataError(f"none of the {len(failed)} files in {args.input} can be read")
        if not args.checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {args.checkpoint}")
        device = resolve_device(args.device)
        model = load_model(args.checkpoint, device)
        concepts = _check_concepts(args.concept or model.config.concepts)
        warn_untrained_concepts(concepts, model.config.concepts)
        segmenter = model_segmenter(model, concepts, device)
        settings = training_preprocessing(args, model.config.image_size)
        for source, output in tqdm(pairs, desc="volumes", unit="file", disable=len(pairs) < 2):
            try:
                predict_file(source, output, segmenter, concepts, image_size=model.config.image_size,
                             channels=model.config.in_channels, **settings, batch_size=args.batch_size,
                             metadata={"checkpoint": str(args.checkpoint),
                                       "ct_window": list(settings["ct_window"]) if settings["modality"] == "ct"
                                       else None})
            except DataError as error:  # an unreadable body: the other files still get segmented
                if not args.input.is_dir():
                    raise
                failed.append(str(error))
                _report([str(error)])
                continue
            print(f"wrote {output}")
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"dasam3 predict: error: {error}", file=sys.stderr)
        return 1
    if failed:
        print(f"dasam3 predict: {len(failed)} file(s) in {args.input} could not be segmented (listed above); "
              "the others were written", file=sys.stderr)
        return 1
    return 0


def _report(messages: Sequence[str]) -> None:
    from tqdm.auto import tqdm

    for message in messages:  # tqdm.write: each on its own line, even under the progress bars
        tqdm.write(f"dasam3 predict: error: {message}", file=sys.stderr)
