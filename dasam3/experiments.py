"""The paper's experiments on one budget: a base model, its adapted variants, their scores.

`dasam3 demo` and `dasam3 ablate` are thin wrappers around `run_experiment`: pretrain (or load) a
base model, then for every variant start from the same base weights, run the two stages of
SPEC section 3 and score DSC and HD95 (mm) per class on the held-out volumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from dasam3.data import SliceDataset
from dasam3.evaluation import EvaluationResult, comparison_table, evaluate_volumes
from dasam3.layers import DAMoE, param_report
from dasam3.models import DASAM3, DASAM3Config
from dasam3.training import StageConfig, TrainConfig, Trainer

FROZEN = "frozen"  # the base model, not adapted: the table's baseline row


@dataclass
class Budget:
    """Steps and learning rates of every stage, the same for every variant."""

    pretrain_steps: int = 600
    warmup_steps: int = 400
    calibrate_steps: int = 100
    batch_size: int = 8
    pretrain_lr: float = 2e-3
    warmup_lr: float = 5e-3
    calibrate_lr: float = 1e-3
    val_every: int = 100


@dataclass
class ExperimentResult:
    """One row of the table: a variant's scores, size and speed."""

    variant: str
    evaluation: EvaluationResult
    trainable_params: int
    step_ms: float | None
    seconds: float

    def summary(self) -> dict:
        mean = self.evaluation.mean()
        return {"variant": self.variant, "mean_dice": mean["dice"], "mean_hd95": mean["hd95"],
                "per_concept": self.evaluation.per_class(), "trainable_params": self.trainable_params,
                "step_ms": self.step_ms, "seconds": self.seconds}


def segmenter(model: DASAM3, concepts: Sequence[str], device: torch.device) -> Callable:
    """images [B, C, S, S] → labels [B, S, S] (0 background, i = concepts[i-1]), as numpy-free tensors."""

    def run(images: torch.Tensor) -> torch.Tensor:
        return model.predict_labels(images.to(device), list(concepts)).cpu()

    return run


def evaluate(model: DASAM3, test_set: SliceDataset, device: torch.device, batch_size: int = 8) -> EvaluationResult:
    """DSC and HD95 (mm) per class in 3-D on the test volumes, prompting with the class concepts."""
    return evaluate_volumes(test_set.volumes(), segmenter(model, test_set.classes, device), test_set.classes,
                            image_size=model.config.image_size, channels=model.config.in_channels,
                            batch_size=batch_size, protocol="mm")


def pretrain_stages(budget: Budget, concepts: list[str]) -> list[StageConfig]:
    return [StageConfig("pretrain", budget.pretrain_steps, budget.pretrain_lr, concepts=concepts)]


def adaptation_stages(budget: Budget, variant: str, concepts: list[str]) -> list[StageConfig]:
    return [StageConfig("warmup", budget.warmup_steps, budget.warmup_lr, concepts=concepts, variant=variant),
            StageConfig("calibrate", budget.calibrate_steps, budget.calibrate_lr, concepts=concepts)]


def train(model: DASAM3, stages: list[StageConfig], train_set: SliceDataset, val_set: SliceDataset | None,
          budget: Budget, out_dir: Path, device: torch.device, seed: int, resume: bool = False) -> float:
    """Run `stages` on `model` in place; returns the median training step time in ms."""
    config = TrainConfig(stages=stages, batch_size=budget.batch_size, seed=seed, val_every=budget.val_every,
                         checkpoint_every=max(s.steps for s in stages) or 1)
    trainer = Trainer(model, train_set, config, out_dir, val_set=val_set, device=device)
    trainer.fit(resume=resume)
    return trainer.median_step_ms


def run_experiment(base_config: DASAM3Config, variants: Sequence[str], train_set: SliceDataset,
                   test_set: SliceDataset, budget: Budget, out_dir: Path, *, base_concepts: list[str],
                   device: torch.device, seed: int = 0, log: Callable[[str], None] = print) -> list[ExperimentResult]:
    """Pretrain a base on `base_concepts`, then adapt each variant to the test classes and score it.

    `FROZEN` among the variants scores the base itself, prompted with the new concepts.
    """
    concepts = list(test_set.classes)
    torch.manual_seed(seed)
    base = DASAM3(base_config).to(device)
    started = time.perf_counter()
    log(f"pretraining the base model on {base_concepts} ({budget.pretrain_steps} steps)")
    train(base, pretrain_stages(budget, base_concepts), train_set, None, budget, out_dir / "base", device, seed)
    base_dir = out_dir / "base" / "checkpoints" / "last"
    results = []
    for variant in variants:
        started_variant = time.perf_counter()
        if variant == FROZEN:
            model, step_ms = base, None
        else:
            log(f"adapting variant {variant!r} ({budget.warmup_steps} + {budget.calibrate_steps} steps)")
            torch.manual_seed(seed)
            model = DASAM3.from_pretrained(base_dir, map_location=device).train()
            step_ms = train(model, adaptation_stages(budget, variant, concepts), train_set, test_set, budget,
                            out_dir / variant, device, seed)
        evaluation = evaluate(model, test_set, device, budget.batch_size)
        trainable = 0 if variant == FROZEN else param_report(model).trainable
        results.append(ExperimentResult(variant, evaluation, trainable, step_ms,
                                        time.perf_counter() - started_variant))
        log(f"{variant}: mean DSC {evaluation.mean()['dice']:.4f}")
    log(f"done in {time.perf_counter() - started:.0f} s")
    return results


def results_table(results: Sequence[ExperimentResult]) -> str:
    """Markdown: per-class DSC/HD95 and means (Table 1's shape), then parameters and step time."""
    scores = comparison_table({r.variant: r.evaluation for r in results})
    lines = ["| variant | trainable params | step ms |", "|---|---:|---:|"]
    for r in results:
        lines.append(f"| {r.variant} | {r.trainable_params:,} | {'–' if r.step_ms is None else f'{r.step_ms:.0f}'} |")
    return scores + "\n\n" + "\n".join(lines)
