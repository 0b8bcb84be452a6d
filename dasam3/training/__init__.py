"""Two-stage training (warm-up, calibration), the CPU demo's pretraining stage, resume and DDP."""

from .config import STAGE_KINDS, StageConfig, TrainConfig
from .distributed import World, init_world
from .trainer import Progress, Trainer, stage_parameters, warmup_cosine

__all__ = ["STAGE_KINDS", "Progress", "StageConfig", "TrainConfig", "Trainer", "World", "init_world",
           "stage_parameters", "warmup_cosine"]
