"""How a dataset turns raw volumes into model inputs, recorded beside a checkpoint.

A trainer writes `preprocessing.json` next to the model's `config.json`; `dasam3 predict` reads it, so
a CT model is windowed as it was trained and an ACDC model is sliced along its native axis without the
user repeating the flags (flags still override, with a warning). Checkpoints written before this
record existed simply have no such file.

    {"dataset": "synapse", "modality": "ct", "ct_window": [-125.0, 275.0], "plane": "axial",
     "image_size": 224, "channels": 1, "source": "h5"}

modality: "ct", "mri", or null (inputs that are generated, not read from scans). ct_window: [low, high]
in HU; a bound written "pNN" is the volume's NN-th percentile (see `dasam3.data.transforms`).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

from ..io import CT_WINDOW, write_text

PREPROCESSING_NAME = "preprocessing.json"
# What a checkpoint without a record is run with (`dasam3 predict`'s defaults before the record existed).
UNRECORDED = {"modality": "mri", "ct_window": tuple(CT_WINDOW), "plane": "axial"}


@dataclass(frozen=True)
class Preprocessing:
    """The settings of one dataset's inputs (see the module docstring)."""

    dataset: str
    modality: str | None
    ct_window: tuple[float | str, float | str] | None
    plane: str
    image_size: int
    channels: int = 1
    source: str | None = None

    def __post_init__(self):
        if self.ct_window is not None:
            object.__setattr__(self, "ct_window", tuple(self.ct_window))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `folder/preprocessing.json` atomically; returns its path."""
        path = Path(folder) / PREPROCESSING_NAME
        write_text(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Preprocessing | None":
        """The record of a checkpoint folder, or None when it has none (an older checkpoint)."""
        path = Path(folder) / PREPROCESSING_NAME
        if not path.is_file():
            return None
        values = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or not {"dataset", "modality", "plane", "image_size"} <= set(values):
            raise ValueError(f"{path}: expected a preprocessing record with dataset, modality, plane and "
                             f"image_size, got {values!r}")
        return cls(**{k: v for k, v in values.items() if k in known})


def window_values(window: Sequence[float | str]) -> tuple[float | str, float | str]:
    """A CT window as stored: floats, or "pNN" percentile bounds kept as strings."""
    if len(window) != 2:
        raise ValueError(f"a CT window is (low, high), got {tuple(window)}")
    return tuple(w if isinstance(w, str) and w.startswith("p") else float(w) for w in window)


def window_bound(text: str) -> float | str:
    """A command-line window bound: a number of HU, or "pNN" (a percentile of the volume)."""
    try:
        return text if text.startswith("p") and 0 <= float(text[1:]) <= 100 else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a window bound is a number or pNN (a percentile), got {text!r}") from None


def resolve_settings(record: Preprocessing | None, flags: dict, image_size: int,
                     checkpoint: str | os.PathLike) -> tuple[dict, list[str]]:
    """The modality, ct_window and plane to run a checkpoint with, and the warnings to show.

    flags: those three as given on the command line (None: not given). Each is the flag when given,
    else the record's, else `UNRECORDED`'s; a flag that differs from the record is warned about (the CT
    window only for CT), as are a missing record and an input size other than the recorded one.
    """
    trained = {} if record is None else {"modality": record.modality, "plane": record.plane,
                                         "ct_window": record.ct_window and window_values(record.ct_window)}
    flags = {**flags, "ct_window": flags.get("ct_window") and window_values(flags["ct_window"])}
    settings, warnings = {}, []
    for name in ("modality", "ct_window", "plane"):
        flag, learned = flags.get(name), trained.get(name)
        settings[name] = next(v for v in (flag, learned, UNRECORDED[name]) if v is not None)
        relevant = name != "ct_window" or settings["modality"] == "ct"
        if flag is not None and learned is not None and flag != learned and relevant:
            warnings.append(f"--{name.replace('_', '-')} {_shown(flag)} differs from the training's "
                            f"{_shown(learned)} ({Path(checkpoint) / PREPROCESSING_NAME}); using {_shown(flag)}")
    if record is None:
        warnings.append(f"{checkpoint} records no preprocessing (an older checkpoint): using --modality "
                        f"{settings['modality']} --plane {settings['plane']}")
    elif record.image_size != image_size:
        warnings.append(f"the model's input size {image_size} differs from the recorded training size "
                        f"{record.image_size}")
    return settings, warnings


def _shown(value) -> str:
    """A setting as typed on the command line: "ct", "-125 275", "0 p98"."""
    if isinstance(value, tuple):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)
