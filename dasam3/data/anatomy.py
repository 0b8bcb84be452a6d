"""Which label id is which organ? An anatomy check of abdominal label maps.

Forks of TransUNet disagree about the organ behind each id of its preprocessed Synapse files, and a
swapped pair (the kidneys, liver and spleen) silently swaps the columns of a results table. This check
reads one labelled volume, computes each label's centroid and size, and tests relations that hold in
every abdomen, by organ name:

- the liver is the largest labelled organ;
- the right kidney, gallbladder, inferior vena cava and right adrenal gland lie on the liver's side of
  the midline (the aorta's centroid, else the kidneys' midpoint), the spleen, left kidney, stomach and
  left adrenal gland on the other side;
- the aorta lies between the kidneys;
- with a known orientation (NIfTI files, read in the slice layout of `dasam3.io`): the liver is on the
  patient's right, the gallbladder anterior to the right kidney, the stomach anterior to the left
  kidney, each adrenal gland superior to its kidney's centroid.

Files without an orientation (TransUNet's h5/npz) are checked up to a flip: their lateral axis is the
in-plane axis along which the organ centroids spread most (the abdomen is wider than deep), and sides
are relative to the liver. Run it with `dasam3 check-labels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

LIVER_SIDE = ("right kidney", "gallbladder", "inferior vena cava", "right adrenal gland")
OTHER_SIDE = ("spleen", "left kidney", "stomach", "left adrenal gland")
# (organ, "anterior to" | "superior to", reference organ): checked when the orientation is known.
ORIENTED_RELATIONS = (("gallbladder", "anterior to", "right kidney"), ("stomach", "anterior to", "left kidney"),
                      ("right adrenal gland", "superior to", "right kidney"),
                      ("left adrenal gland", "superior to", "left kidney"))


@dataclass(frozen=True)
class Organ:
    """One label of a volume: its id, name, voxel count and centroid [S, H, W] (mm, or voxels)."""

    label: int
    name: str
    voxels: int
    centroid: tuple[float, float, float]


@dataclass(frozen=True)
class Check:
    """One anatomical relation: what it says, whether the volume satisfies it, the numbers behind it."""

    relation: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class AnatomyReport:
    """The organs of one volume and the checks on them; lateral_axis: 1 or 2 of [S, H, W]."""

    organs: list[Organ]
    checks: list[Check]
    oriented: bool
    lateral_axis: int
    midline: float

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def side(self, organ: Organ) -> str:
        """"right"/"left" (oriented) or "liver's side"/"other side" of the midline."""
        offset = organ.centroid[self.lateral_axis] - self.midline
        liver = next((o for o in self.organs if o.name == "liver"), None)
        if self.oriented:
            return "right" if offset < 0 else "left"  # the W axis runs patient right → left
        if liver is None:
            return "?"
        same = np.sign(offset) == np.sign(liver.centroid[self.lateral_axis] - self.midline)
        return "liver's side" if same else "other side"


def organs_of(label: np.ndarray, class_names: Mapping[int, str], spacing: Sequence[float]) -> list[Organ]:
    """The labels of `class_names` present in `label` [S, H, W], with centroids scaled by `spacing`."""
    organs = []
    for value, name in class_names.items():
        where = np.argwhere(label == value)
        if len(where):
            centroid = tuple(float(c) for c in where.mean(axis=0) * np.asarray(spacing, dtype=float))
            organs.append(Organ(int(value), name, len(where), centroid))
    return organs


def _lateral_axis(organs: list[Organ], oriented: bool) -> int:
    if oriented or len(organs) < 2:
        return 2
    spread = np.array([o.centroid for o in organs]).std(axis=0)
    return 1 if spread[1] > spread[2] else 2


def _midline(by_name: dict[str, Organ], axis: int, organs: list[Organ]) -> float:
    if "aorta" in by_name:
        return by_name["aorta"].centroid[axis]
    if "right kidney" in by_name and "left kidney" in by_name:
        return (by_name["right kidney"].centroid[axis] + by_name["left kidney"].centroid[axis]) / 2
    return float(np.mean([o.centroid[axis] for o in organs]))


def check_anatomy(label: np.ndarray, class_names: Mapping[int, str], spacing: Sequence[float] = (1, 1, 1),
                  oriented: bool = False) -> AnatomyReport:
    """Check the organ relations of the module docstring on one volume.

    label: int [S, H, W] (the slice layout of `dasam3.io` when oriented); class_names: id → organ name
    (e.g. SYNAPSE_CLASSES or BTCV_CLASSES by id); spacing: mm per axis (centroids in voxels otherwise).
    """
    organs = organs_of(np.asarray(label), class_names, spacing)
    by_name = {o.name: o for o in organs}
    axis = _lateral_axis(organs, oriented)
    midline = _midline(by_name, axis, organs)
    checks = []
    if organs and "liver" in by_name:
        largest = max(organs, key=lambda o: o.voxels)
        checks.append(Check("the liver is the largest organ", largest.name == "liver",
                            f"largest: {largest.name} (id {largest.label}, {largest.voxels} voxels)"))
        liver_offset = by_name["liver"].centroid[axis] - midline
        for names, wanted in ((LIVER_SIDE, True), (OTHER_SIDE, False)):
            for name in (n for n in names if n in by_name):
                offset = by_name[name].centroid[axis] - midline
                same = bool(np.sign(offset) == np.sign(liver_offset))
                where = "on the liver's side" if wanted else "opposite the liver"
                checks.append(Check(f"the {name} lies {where}", same == wanted,
                                    f"{name} {offset:+.1f}, liver {liver_offset:+.1f} from the midline"))
        if oriented:
            checks.append(Check("the liver is on the patient's right", liver_offset < 0,
                                f"liver {liver_offset:+.1f} from the midline (negative: right)"))
    if {"aorta", "right kidney", "left kidney"} <= by_name.keys():
        kidneys = sorted(by_name[k].centroid[axis] for k in ("right kidney", "left kidney"))
        aorta = by_name["aorta"].centroid[axis]
        checks.append(Check("the aorta lies between the kidneys", kidneys[0] < aorta < kidneys[1],
                            f"kidneys at {kidneys[0]:.1f} and {kidneys[1]:.1f}, aorta at {aorta:.1f}"))
    if oriented:
        checks += _oriented_checks(by_name)
    return AnatomyReport(organs, checks, oriented, axis, midline)


def _oriented_checks(by_name: dict[str, Organ]) -> list[Check]:
    """Anterior (smaller H) and superior (larger S) relations, for volumes of known orientation."""
    checks = []
    for name, relation, reference in ORIENTED_RELATIONS:
        if name in by_name and reference in by_name:
            axis = 1 if relation == "anterior to" else 0
            a, b = by_name[name].centroid[axis], by_name[reference].centroid[axis]
            passed = a < b if relation == "anterior to" else a > b
            checks.append(Check(f"the {name} is {relation} the {reference}", passed,
                                f"{name} at {a:.1f}, {reference} at {b:.1f} along the {'H' if axis else 'S'} axis"))
    return checks


def report_text(report: AnatomyReport, unit: str) -> str:
    """The organs (id, name, voxels, centroid, side) and each check, as Markdown."""
    lines = [f"| id | organ | voxels | centroid S, H, W ({unit}) | side |", "|---:|---|---:|---|---|"]
    for organ in report.organs:
        centroid = ", ".join(f"{c:.1f}" for c in organ.centroid)
        lines.append(f"| {organ.label} | {organ.name} | {organ.voxels} | {centroid} | {report.side(organ)} |")
    axis = "HW"[report.lateral_axis - 1]
    orientation = ("known (S up, H anterior → posterior, W right → left)" if report.oriented else
                   f"not stored: sides relative to the liver, lateral axis {axis} (widest organ spread)")
    lines += ["", f"Orientation: {orientation}.", ""]
    lines += [f"- {'PASS' if c.passed else 'FAIL'}: {c.relation} ({c.detail})" for c in report.checks]
    return "\n".join(lines) + "\n"
