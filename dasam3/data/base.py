"""The common sample and dataset API.

A dataset is a list of *cases* (3-D volumes with a label map). `SliceDataset` serves their 2-D slices
to a `torch.utils.data.DataLoader` (use `collate_fn=collate_slices`); `dataset.volumes()` yields the
whole volumes for 3-D evaluation.

Item (one slice, `SliceDataset[i]`):

    image       float32 [C, S, S] in [0, 1]     (C = channels, the grey slice repeated)
    label       int64   [S, S]                  0 = background, i = classes[i - 1]
    masks       float32 [K, S, S] in {0, 1}     one mask per concept
    concepts    list of K str                   = dataset.concepts
    case_id     str
    slice_index int                             index along the volume's slice axis

Volume (`Volume`, from `case.load()` / `dataset.volumes()`): image float32 [D, H, W] in [0, 1],
label int64 [D, H, W], spacing (mm along D, H, W; `spacing_unit` "voxel" when the files store none),
the case id, and for NIfTI sources the file's affine and the `SliceLayout` that maps arrays back to
its voxel grid. The slice layout is described
in `dasam3.io` (axis 0 inferior → superior, rows anterior → posterior, columns right → left).
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import DataError, Plane, SliceLayout, load_nifti, read_volume, require_3d
from .augment import Augmentation
from .preprocessing import Preprocessing
from .transforms import resize_images, resize_labels


@dataclass
class Volume:
    """One case in the slice layout. image: float32 [D, H, W] in [0, 1]; label: int64 [D, H, W].

    spacing_unit: "mm", or "voxel" when the source stores no voxel size (spacing is then (1, 1, 1)).
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    case_id: str
    affine: np.ndarray | None = None
    layout: SliceLayout | None = None
    spacing_unit: str = "mm"

    def __post_init__(self):
        self.image = np.asarray(self.image, dtype=np.float32)
        self.label = np.asarray(self.label, dtype=np.int64)
        if self.image.ndim != 3 or self.image.shape != self.label.shape:
            raise DataError(
                f"case {self.case_id}: image and label must be 3-D with one shape, got "
                f"{self.image.shape} and {self.label.shape}"
            )


class DataWarning(UserWarning):
    """Data that is used, but not as the dataset documents it (a stray label value, a value range)."""


class LabelRemap:
    """Maps a dataset's stored label values to 0..K, rejecting values it does not know.

    mapping: stored value → class index (0 = background). Values of the dataset that are known but not
    evaluated (Synapse's esophagus) map to 0. strays: stored values some releases hold by mistake →
    (class index, why it is read so); they are mapped with a `DataWarning` naming the file.
    """

    def __init__(self, mapping: Mapping[int, int], strays: Mapping[int, tuple[int, str]] | None = None):
        self.strays = {int(k): (int(v), str(why)) for k, (v, why) in (strays or {}).items()}
        mapping = {**dict(mapping), **{k: v for k, (v, _) in self.strays.items()}}
        self.mapping = dict(sorted((int(k), int(v)) for k, v in mapping.items()))
        self._lookup = np.zeros(max(self.mapping) + 1, dtype=np.int64)
        for stored, index in self.mapping.items():
            self._lookup[stored] = index

    @classmethod
    def identity(cls, num_classes: int) -> "LabelRemap":
        return cls({value: value for value in range(num_classes + 1)})

    def __call__(self, label: np.ndarray, source: str | os.PathLike) -> np.ndarray:
        """label: any shape of stored values → int64 class indices. Raises DataError naming `source`."""
        values = np.unique(label)
        unknown = values[~np.isin(values, list(self.mapping))]
        if unknown.size:
            raise DataError(
                f"{source}: unknown label values {unknown[:10].tolist()}; expected values in "
                f"{list(self.mapping)}"
            )
        for value in values[np.isin(values, list(self.strays))].tolist():
            index, why = self.strays[int(value)]
            warnings.warn(f"{source}: label value {int(value)} read as class {index} ({why})", DataWarning,
                          stacklevel=2)
        return self._lookup[label.astype(np.int64)]


class Case(ABC):
    """One annotated volume of a dataset; loads lazily."""

    case_id: str

    @abstractmethod
    def num_slices(self) -> int:
        """The number of 2-D slices, read cheaply (a header), without loading the voxels."""

    @abstractmethod
    def load(self) -> Volume:
        """Read, validate and normalise the volume."""


class ArrayCase(Case):
    """A case already in memory (the MNI152 default, synthetic data)."""

    def __init__(self, case_id: str, image: np.ndarray, label: np.ndarray,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0)):
        self.case_id = case_id
        self.volume = Volume(image, label, tuple(float(s) for s in spacing), case_id)

    def num_slices(self) -> int:
        return self.volume.image.shape[0]

    def load(self) -> Volume:
        return self.volume


class NiftiCase(Case):
    """An image/label pair of NIfTI files, read in the slice layout.

    normalize: raw intensities [D, H, W] → [0, 1]; remap: stored label values → class indices;
    plane: "axial" (reoriented by the affine) or "native" (the file's third axis, e.g. ACDC).
    """

    def __init__(self, case_id: str, image_path: str | os.PathLike, label_path: str | os.PathLike,
                 normalize: Callable[[np.ndarray], np.ndarray], remap: LabelRemap,
                 plane: Plane = "axial"):
        self.case_id = case_id
        self.image_path, self.label_path = Path(image_path), Path(label_path)
        self.normalize, self.remap, self.plane = normalize, remap, plane

    def num_slices(self) -> int:
        image = load_nifti(self.image_path)
        layout = SliceLayout.from_affine(image.affine, self.plane)
        file_axis = int(layout.from_layout[0, 0])  # the file axis that becomes slice axis 0
        return require_3d(image.shape, self.image_path)[file_axis]

    def load(self) -> Volume:
        voxels, image = read_volume(self.image_path)
        labels, _ = read_volume(self.label_path)
        if voxels.shape != labels.shape:
            raise DataError(
                f"{self.label_path}: label shape {labels.shape} does not match the image "
                f"{self.image_path} shape {voxels.shape}"
            )
        # The label is mapped with the image's layout (its own affine is not used).
        layout = SliceLayout.from_affine(image.affine, self.plane)
        return Volume(
            image=self.normalize(layout.to_slices(voxels)),
            label=self.remap(layout.to_slices(labels), self.label_path),
            spacing=layout.spacing, case_id=self.case_id, affine=image.affine, layout=layout,
        )


def lateral(classes: Sequence[str]) -> bool:
    """Whether any class is one side of the body ("left kidney"), which a left-right flip would swap."""
    return any(word in name.lower().split() for name in classes for word in ("left", "right"))


class SliceDataset(Dataset):
    """2-D slices of a list of cases, resized to `image_size`², with one mask per concept.

    cases: the volumes; classes: class names, label i ↔ classes[i - 1]; image_size: output side;
    channels: the grey slice is repeated to this many channels; augment: an `Augmentation`, True for
    `default_augmentation()`, or None; seed: the augmentation seed (per item it is drawn from
    (seed, epoch, index), see `set_epoch`); extra_concepts: further concepts, each the union of some
    label values (e.g. {"brain": (1, 2)}); cache: keep every resized volume in memory (otherwise only
    the last one read; each DataLoader worker process keeps its own cache).
    """

    def __init__(self, cases: Sequence[Case], classes: Sequence[str], *, image_size: int,
                 channels: int = 1, augment: Augmentation | bool | None = None, seed: int = 0,
                 extra_concepts: Mapping[str, Sequence[int]] | None = None, cache: bool = True):
        if image_size < 1 or channels < 1:
            raise ValueError(f"image_size and channels must be >= 1, got {image_size} and {channels}")
        self.cases = list(cases)
        self.classes = tuple(classes)
        self.image_size, self.channels, self.seed, self.cache = int(image_size), int(channels), seed, cache
        self.augment = self.default_augmentation() if augment is True else (augment or None)
        self.concept_labels: dict[str, tuple[int, ...]] = {
            name: (index,) for index, name in enumerate(self.classes, start=1)}
        for name, values in (extra_concepts or {}).items():
            self.concept_labels[name] = tuple(int(v) for v in values)
        self._concepts = tuple(self.concept_labels)
        self._mask_offset, self._mask_table = _concept_table(self.concept_labels.values())
        self.epoch = 0
        counts = [case.num_slices() for case in self.cases]
        self._index = [(c, s) for c, count in enumerate(counts) for s in range(count)]
        self._resized: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # How raw volumes become this dataset's inputs (set by the datasets that read files; trainers
        # store it beside a checkpoint so that `dasam3 predict` repeats it).
        self.preprocessing: Preprocessing | None = None

    def record_preprocessing(self, dataset: str, modality: str | None, ct_window=None,
                             plane: Plane = "axial", source: str | None = None) -> None:
        """Set `preprocessing` from this dataset's image size and channels and the given settings."""
        self.preprocessing = Preprocessing(dataset, modality, ct_window, plane, self.image_size,
                                           self.channels, source)

    @property
    def concepts(self) -> list[str]:
        """The concept of each mask, in order: the classes, then the extra concepts."""
        return list(self.concept_labels)

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]

    def default_augmentation(self) -> Augmentation:
        """Flips, rotation, scaling, intensity shift; no left-right flip for lateral classes."""
        return Augmentation(horizontal_flip=0.0 if lateral(self.classes) else 0.5)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draws of this epoch (call before each epoch when augmenting)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._index)

    def volumes(self) -> Iterator[Volume]:
        """The whole cases at their own resolution, for 3-D evaluation."""
        for case in self.cases:
            yield case.load()

    def _resized_case(self, case_number: int) -> tuple[torch.Tensor, torch.Tensor]:
        if case_number not in self._resized:
            if not self.cache:
                self._resized.clear()
            volume = self.cases[case_number].load()
            size = (self.image_size, self.image_size)
            image = resize_images(torch.from_numpy(volume.image)[:, None], size)[:, 0]
            label = resize_labels(torch.from_numpy(volume.label), size)
            self._resized[case_number] = (image.contiguous(), label.contiguous())
        return self._resized[case_number]

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        index %= len(self)
        case_number, slice_index = self._index[index]
        images, labels = self._resized_case(case_number)
        image, label = images[slice_index][None], labels[slice_index]
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, label = self.augment(image, label, rng)
        # Labels outside the table's range land on a sentinel column of zeros (in no concept).
        columns = (label - self._mask_offset).clamp_(0, self._mask_table.shape[1] - 1)
        masks = self._mask_table[:, columns]
        return {
            "image": image.expand(self.channels, -1, -1).clone(),
            "label": label.clone(),
            "masks": masks,
            "concepts": list(self._concepts),
            "case_id": self.cases[case_number].case_id,
            "slice_index": slice_index,
        }


def _concept_table(concept_values) -> tuple[int, torch.Tensor]:
    """(offset, table float32 [K, n]) with table[k, v - offset] = 1 iff v is one of concept k's label
    values; the first and last columns are all zero, for labels outside the range of every concept."""
    concept_values = [tuple(values) for values in concept_values]
    every = [v for values in concept_values for v in values] or [0]
    offset = min(every) - 1
    table = torch.zeros(len(concept_values), max(every) - offset + 2, dtype=torch.float32)
    for k, values in enumerate(concept_values):
        table[k, [v - offset for v in values]] = 1.0
    return offset, table


def collate_slices(batch: Sequence[dict]) -> dict:
    """Stack items: image [B, C, S, S], label [B, S, S], masks [B, K, S, S], slice_index [B];
    concepts stays a list of B lists, case_id a list of B strings."""
    return {
        "image": torch.stack([item["image"] for item in batch]),
        "label": torch.stack([item["label"] for item in batch]),
        "masks": torch.stack([item["masks"] for item in batch]),
        "concepts": [list(item["concepts"]) for item in batch],
        "case_id": [item["case_id"] for item in batch],
        "slice_index": torch.tensor([item["slice_index"] for item in batch]),
    }


Members = TypeVar("Members")


def split_members(splits: Mapping[str, Members], split: str, dataset: str) -> Members:
    """The members of `split` (its case ids, slabs, ...), or a ValueError naming the splits that exist."""
    if split not in splits:
        raise ValueError(f"{dataset} split must be one of {list(splits)}, got {split!r}")
    return splits[split]


def first_existing(candidates: Sequence[Path], what: str) -> Path:
    """The first path that exists, or FileNotFoundError listing every place looked at."""
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{what} not found; looked for " + ", ".join(str(c) for c in candidates))
