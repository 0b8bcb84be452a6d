"""Volume evaluation: slice-wise inference, 3-D scoring per case and class, and result tables.

A *segmenter* is any callable `images [B, C, h, w] float in [0, 1] -> labels [B, h, w] int`
(0 = background, i = the i-th class). `predict_volume` runs it over the slices of a volume resized to
the model's size and resizes the labels back (nearest); `score_volume` scores each class in 3-D.

Protocols:

- "mm" (default): distances in mm with the volume's spacing, the "strict" empty-mask rule of
  `dasam3.metrics` (an absent class is skipped; a missed or hallucinated one scores dice 0 and the
  image diagonal as hd95).
- "transunet": TransUNet / SAMed's Synapse protocol, to compare with their tables: distances in voxels
  and their `calculate_metric_percase` rule.

Aggregation follows TransUNet: the mean over cases per class, then the mean over classes (nan values,
absent classes, are left out). Tables give DSC in percent and HD95 in mm, or in voxels for "transunet"
and for volumes whose spacing is unknown (TransUNet's preprocessed Synapse files store none), and name
their protocol under the table. Synapse's columns follow TransUNet's Table 1 order (aorta, gallbladder,
kidney L, kidney R, liver, pancreas, spleen, stomach) whatever the label ids are.
"""

from __future__ import annotations

import csv
import io as _stringio
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .data.base import Volume
from .data.transforms import resize_images, resize_labels
from .io import check_can_write, write_text
from .metrics import PROTOCOLS, score_pair

Segmenter = Callable[[torch.Tensor], torch.Tensor]

# The protocol a dataset's published tables use (`default_protocol`); every other dataset: "mm".
DATASET_PROTOCOLS = {"synapse": "transunet"}
PROTOCOL_DESCRIPTIONS = {
    "mm": "strict empty-mask rule: a class absent from both is skipped, a missed or hallucinated one "
          "scores DSC 0 and HD95 = the image diagonal",
    "transunet": "TransUNet/SAMed's calculate_metric_percase: a missed class scores (0, 0), one predicted "
                 "where the ground truth has none (1, 0)",
}
HD95_UNITS = ("mm", "voxel")


def default_protocol(dataset: str | None) -> str:
    """The protocol of `dataset`'s published tables: "transunet" for synapse, else "mm"."""
    return DATASET_PROTOCOLS.get(dataset or "", "mm")


def model_segmenter(model, concepts: Sequence[str], device: str | torch.device) -> Segmenter:
    """A model's `predict_labels(images, concepts)` as a segmenter: images [B, C, S, S] → labels
    [B, S, S] (0 background, i = concepts[i-1]), CPU tensors in and out."""
    concepts = list(concepts)

    def segment(images: torch.Tensor) -> torch.Tensor:
        return model.predict_labels(images.to(device), concepts).cpu()

    return segment


def _check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    return PROTOCOLS[protocol]


@torch.no_grad()
def predict_volume(image: np.ndarray, segmenter: Segmenter, *, image_size: int, channels: int = 1,
                   batch_size: int = 8, progress: bool = False, description: str = "") -> np.ndarray:
    """Label every slice of a volume.

    image: float [D, H, W] in [0, 1]; the segmenter sees [B, channels, image_size, image_size].
    Returns int64 labels [D, H, W].
    """
    from tqdm.auto import tqdm

    if image.ndim != 3:
        raise ValueError(f"image must be a volume [D, H, W], got shape {image.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    depth, height, width = image.shape
    labels = np.zeros(image.shape, dtype=np.int64)
    volume = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)
    for start in tqdm(range(0, depth, batch_size), desc=description or None, unit="batch",
                      disable=not progress, leave=False):
        batch = volume[start:start + batch_size, None]
        batch = resize_images(batch, (image_size, image_size)).expand(-1, channels, -1, -1)
        predicted = torch.as_tensor(segmenter(batch.contiguous())).cpu()
        expected = (batch.shape[0], image_size, image_size)
        if tuple(predicted.shape) != expected:
            raise ValueError(f"segmenter must return labels {list(expected)}, got {list(predicted.shape)}")
        labels[start:start + batch_size] = resize_labels(predicted.long(), (height, width)).numpy()
    return labels


@dataclass(frozen=True)
class ClassScore:
    """One class of one case. dice in [0, 1] (nan: class absent); hd95 in mm or voxels."""

    case_id: str
    label: int
    name: str
    dice: float
    hd95: float


def score_volume(pred: np.ndarray, gt: np.ndarray, class_names: Mapping[int, str], *,
                 case_id: str, spacing: Sequence[float] | None = None,
                 protocol: str = "mm") -> list[ClassScore]:
    """Score each label of `class_names` (label → name) of one case in 3-D. pred, gt: int [D, H, W]."""
    rule = _check_protocol(protocol)
    if pred.shape != gt.shape:
        raise ValueError(f"case {case_id}: prediction shape {pred.shape} differs from gt {gt.shape}")
    spacing = spacing if protocol == "mm" else None
    scores = []
    for label, name in class_names.items():
        dice, hd95 = score_pair(pred == label, gt == label, spacing, rule)
        scores.append(ClassScore(case_id, int(label), name, float(dice), float(hd95)))
    return scores


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _json_number(value: float):
    return None if math.isnan(value) else value


class EvaluationResult:
    """Per-case, per-class scores and their means (see the module docstring for the aggregation).

    hd95_unit: "mm" or "voxel" (distances computed without a physical spacing); the "transunet"
    protocol always scores in voxels.
    """

    def __init__(self, scores: Iterable[ClassScore], class_names: Mapping[int, str], protocol: str,
                 hd95_unit: str = "mm"):
        _check_protocol(protocol)
        if hd95_unit not in HD95_UNITS:
            raise ValueError(f"hd95_unit must be one of {HD95_UNITS}, got {hd95_unit!r}")
        self.scores = list(scores)
        self.class_names = dict(class_names)
        self.protocol = protocol
        self.hd95_unit = "voxel" if protocol == "transunet" else hd95_unit

    @property
    def case_ids(self) -> list[str]:
        return list(dict.fromkeys(score.case_id for score in self.scores))

    def per_class(self) -> dict[str, dict[str, float]]:
        """name → {"dice", "hd95", "cases"} (means over the cases where the value is defined)."""
        table = {}
        for label, name in self.class_names.items():
            rows = [s for s in self.scores if s.label == label]
            table[name] = {"dice": _nanmean([s.dice for s in rows]),
                           "hd95": _nanmean([s.hd95 for s in rows]),
                           "cases": sum(not math.isnan(s.dice) for s in rows)}
        return table

    def mean(self) -> dict[str, float]:
        """{"dice", "hd95"}: the mean over classes of the per-class means."""
        per_class = self.per_class().values()
        return {"dice": _nanmean([c["dice"] for c in per_class]),
                "hd95": _nanmean([c["hd95"] for c in per_class])}

    def to_dict(self) -> dict:
        return {
            "protocol": self.protocol,
            "hd95_unit": self.hd95_unit,
            "classes": {str(label): name for label, name in self.class_names.items()},
            "mean": {k: _json_number(v) for k, v in self.mean().items()},
            "per_class": {name: {k: _json_number(v) if k != "cases" else v for k, v in row.items()}
                          for name, row in self.per_class().items()},
            "cases": [{**asdict(s), "dice": _json_number(s.dice), "hd95": _json_number(s.hd95)}
                      for s in self.scores],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def cases_csv(self) -> str:
        return _csv(["case_id", "label", "class", "dice", "hd95"],
                    [[s.case_id, s.label, s.name, s.dice, s.hd95] for s in self.scores])

    def classes_csv(self) -> str:
        rows = [[name, label, row["dice"], row["hd95"], row["cases"]]
                for (label, name), row in zip(self.class_names.items(), self.per_class().values())]
        mean = self.mean()
        rows.append(["mean", "", mean["dice"], mean["hd95"], len(self.case_ids)])
        return _csv(["class", "label", "dice", "hd95", "cases"], rows)

    def to_markdown(self, method: str = "model") -> str:
        return comparison_table({method: self})

    def write(self, folder: str | Path, *, method: str = "model", overwrite: bool = False,
              prefix: str = "evaluation") -> list[Path]:
        """Write `<prefix>.json`, `_cases.csv`, `_classes.csv` and `.md` into folder, atomically;
        refuses to replace existing files unless overwrite. Returns the paths."""
        texts = (self.to_json(), self.cases_csv(), self.classes_csv(), self.to_markdown(method))
        outputs = dict(zip(result_paths(folder, prefix), texts))
        check_can_write(list(outputs), overwrite)
        for path, text in outputs.items():
            write_text(path, text)
        return list(outputs)


def result_paths(folder: str | Path, prefix: str = "evaluation") -> list[Path]:
    """The files `EvaluationResult.write` creates: .json, _cases.csv, _classes.csv, .md."""
    folder = Path(folder)
    return [folder / f"{prefix}{suffix}" for suffix in (".json", "_cases.csv", "_classes.csv", ".md")]


def _csv(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buffer = _stringio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value: float, percent: bool = False) -> str:
    return "–" if math.isnan(value) else f"{value * (100 if percent else 1):.2f}"


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table_order(names: Sequence[str]) -> list[str]:
    """The class columns in the published tables' order: TransUNet's Table 1 order for Synapse's 8
    organs, otherwise the order given."""
    from .data.synapse import SYNAPSE_TABLE_ORDER

    return list(SYNAPSE_TABLE_ORDER) if set(names) == set(SYNAPSE_TABLE_ORDER) else list(names)


def protocol_note(result: "EvaluationResult") -> str:
    """One line naming the protocol and the HD95 unit, printed under every table."""
    unit = "voxels" if result.hd95_unit == "voxel" else "mm"
    return (f"Protocol: `{result.protocol}` ({PROTOCOL_DESCRIPTIONS[result.protocol]}); HD95 in {unit}; "
            "means over cases per class, then over classes.")


def _shared(results: Mapping[str, EvaluationResult]) -> EvaluationResult:
    """The first result, after checking that all share their classes, protocol and HD95 unit."""
    if not results:
        raise ValueError("a table needs at least one result")
    first = next(iter(results.values()))
    for method, result in results.items():
        for what in ("class_names", "protocol", "hd95_unit"):
            if getattr(result, what) != getattr(first, what):
                raise ValueError(f"{method}: {what} {getattr(result, what)!r} differs from {getattr(first, what)!r}")
    return first


def comparison_table(results: Mapping[str, EvaluationResult], trainable: Mapping[str, int] | None = None) -> str:
    """Markdown, one row per method (as the papers' per-organ tables): [trainable parameters,] mean DSC ↑
    (%), mean HD95 ↓, then "DSC / HD95" per class in the published column order, and the protocol line.
    All results must share their classes, protocol and HD95 unit."""
    first = _shared(results)
    classes = table_order(list(first.class_names.values()))
    unit = "voxels" if first.hd95_unit == "voxel" else "mm"
    params = ["trainable params"] if trainable is not None else []
    header = ["Method", *params, "DSC ↑", f"HD95 ↓ ({unit})", *[f"{name} (DSC / HD95)" for name in classes]]
    rows = []
    for method, result in results.items():
        mean, per_class = result.mean(), result.per_class()
        count = [f"{trainable[method]:,}"] if trainable is not None else []
        rows.append([method, *count, _cell(mean["dice"], True), _cell(mean["hd95"]),
                     *[f"{_cell(per_class[n]['dice'], True)} / {_cell(per_class[n]['hd95'])}"
                       for n in classes]])
    return _markdown(header, rows) + "\n" + protocol_note(first) + "\n"


def dataset_table(results: Mapping[str, Mapping[str, EvaluationResult]]) -> str:
    """Markdown shaped like the paper's Table 1: one row per method, DSC ↑ (%) and HD95 ↓ per dataset.

    results: method → dataset → result (a missing dataset is shown as "–"). Each dataset's protocol
    and HD95 unit are named under the table.
    """
    datasets = list(dict.fromkeys(d for by_dataset in results.values() for d in by_dataset))
    header = ["Method", *[f"{d} {metric}" for d in datasets for metric in ("DSC ↑", "HD95 ↓")]]
    rows = []
    for method, by_dataset in results.items():
        row = [method]
        for dataset in datasets:
            mean = by_dataset[dataset].mean() if dataset in by_dataset else {"dice": math.nan,
                                                                             "hd95": math.nan}
            row += [_cell(mean["dice"], True), _cell(mean["hd95"])]
        rows.append(row)
    notes = [f"{dataset}: " + protocol_note(_shared({m: r[dataset] for m, r in results.items() if dataset in r}))
             for dataset in datasets]
    return _markdown(header, rows) + "\n" + "\n".join(notes) + "\n"


def evaluate_volumes(volumes: Iterable[Volume], segmenter: Segmenter, classes: Sequence[str], *,
                     image_size: int, channels: int = 1, batch_size: int = 8, protocol: str = "mm",
                     progress: bool = False) -> EvaluationResult:
    """Predict every volume slice by slice and score it in 3-D. classes: names of labels 1..K.
    HD95 is in mm unless a volume's spacing is unknown (`Volume.spacing_unit == "voxel"`)."""
    _check_protocol(protocol)
    class_names = {index: name for index, name in enumerate(classes, start=1)}
    scores, units = [], set()
    for volume in volumes:
        units.add(volume.spacing_unit)
        pred = predict_volume(volume.image, segmenter, image_size=image_size, channels=channels,
                              batch_size=batch_size, progress=progress, description=volume.case_id)
        scores += score_volume(pred, volume.label, class_names, case_id=volume.case_id,
                               spacing=volume.spacing, protocol=protocol)
    if len(units) > 1:
        raise ValueError("volumes with a physical spacing (mm) and without one (voxels) cannot be scored "
                         "together: HD95 would mix units")
    return EvaluationResult(scores, class_names, protocol, units.pop() if units else "mm")
