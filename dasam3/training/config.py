"""Training configuration: a YAML file and/or command-line flags, validated once."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dasam3._common import check_fields
from dasam3.io import one_line

STAGE_KINDS = ("pretrain", "warmup", "calibrate")


@dataclass
class StageConfig:
    """One training stage.

    kind: "pretrain" trains the whole model but its frozen encoders (the CPU demo's stand-in for
    SAM3's pretraining); "warmup" and "calibrate" are the paper's two stages (`mark_trainable`).
    concepts: the dataset concepts this stage trains on (None: all of them).
    variant: a `DASAM3.apply_variant` name applied before the stage (once), with variant_options.
    """

    kind: str
    steps: int
    lr: float = 5e-4
    concepts: list[str] | None = None
    variant: str | None = None  # applied to the model before the stage, e.g. "da-sam3" (its upcycle)
    variant_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        check_fields(StageConfig, dataclasses.asdict(self), "stage ")
        if self.steps < 0:
            raise ValueError(f"stage steps must be >= 0, got {self.steps}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"stage lr must be > 0, got {self.lr}")
        if self.concepts is not None:
            self.concepts = list(self.concepts)
            if not self.concepts or len(set(self.concepts)) != len(self.concepts) or not all(self.concepts):
                raise ValueError(f"stage concepts must be distinct non-empty names (or null for all), "
                                 f"got {self.concepts}")


def _paper_stages() -> list[StageConfig]:
    return [StageConfig("warmup", 2000), StageConfig("calibrate", 500)]


@dataclass
class TrainConfig:
    """Everything a run needs besides the model (SPEC section 3's defaults)."""

    dataset: str = "mni152"
    data_root: str | None = None
    image_size: int | None = None  # None: the dataset's default
    stages: list[StageConfig] = field(default_factory=_paper_stages)
    batch_size: int = 8
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05  # of each stage's steps: linear warm-up, then cosine to zero
    grad_clip: float = 1.0
    balance: float = 0.01
    sparse: float = 0.001
    augment: bool = True
    amp: bool = True  # bf16 autocast on GPUs; ignored on the CPU
    seed: int = 0
    val_every: int = 200
    checkpoint_every: int = 200
    num_workers: int = 0
    device: str = "auto"
    val_cases: int = 0  # without a "val" split: hold out this many training cases to validate on
    # Frozen image features computed once per training image (dasam3.encoders.cache): true (4 GiB in memory)
    # or {memory_gb, disk_gb}; needs augment: false (augmentation changes the images before the encoder).
    cache_features: bool | dict[str, float] = False

    # Options that may differ on --resume without changing what is trained (see `resume_differences`).
    RUNTIME_OPTIONS = ("device", "num_workers", "cache_features")

    def __post_init__(self):
        self.stages = [s if isinstance(s, StageConfig) else _stage(s, index) for index, s in enumerate(self.stages)]
        check_fields(TrainConfig, {**dataclasses.asdict(self), "stages": []})
        if not self.stages:
            raise ValueError("stages must list at least one stage, got []")
        if self.total_steps < 1:
            raise ValueError(f"the stages must train at least one step in all, got {[s.steps for s in self.stages]}")
        for name in ("batch_size", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "balance", "sparse", "seed", "num_workers", "val_cases"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1 (or null for the dataset's default), got {self.image_size}")
        _check_device(self.device)
        if self.cache_features and self.augment:
            raise ValueError("cache_features needs augment: false: augmentation runs on the images before the "
                             "frozen encoder, so features computed once would not match the augmented images "
                             f"(got cache_features: {self.cache_features!r} with augment: true)")

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from plain values (YAML, flags), every option checked first: ValueError naming it."""
        check_fields(cls, values)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """The file's options, with `overrides` (flags given on the command line) taking precedence."""
        values = read_yaml_options(path)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)


def read_yaml_options(path: str | Path) -> dict[str, Any]:
    """A YAML file of options as a dict (an empty file: none); ValueError unless it holds a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid YAML ({one_line(error)})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of training options, got {type(values).__name__}")
    return values


def _stage(values: Any, index: int) -> StageConfig:
    check_fields(StageConfig, values, f"stages[{index}].")
    try:
        return StageConfig(**values)
    except ValueError as error:
        raise ValueError(f"stages[{index}]: {error}") from None


def _check_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto' or a torch device (cpu, cuda, cuda:1, ...), got {name!r}") from None


def resume_differences(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """option → (stored, current) for the training options a resumed run would change (runtime-only
    options such as the device excluded). Both arguments are `TrainConfig.to_dict()` values."""
    stored = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)
                 if f.default is not dataclasses.MISSING}, **stored}  # options added since the run started
    keys = sorted((set(stored) | set(current)) - set(TrainConfig.RUNTIME_OPTIONS))
    return {k: (stored.get(k), current.get(k)) for k in keys if stored.get(k) != current.get(k)}
