"""The paper's experiments on one budget: a base model, its adapted variants, their scores.

`dasam3 demo` and `dasam3 ablate` wrap `run_experiment`: pretrain a base model on a generic concept
(standing in for SAM3's pretrained knowledge), then for every variant start from the same base
weights, run the two stages of SPEC section 3 on the dataset's classes and score DSC and HD95 (mm) per
class in 3-D on the held-out volumes.  Every variant gets the same steps, learning rates and seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from dasam3.data import SliceDataset
from dasam3.evaluation import EvaluationResult, comparison_table, evaluate_volumes, model_segmenter
from dasam3.layers import DAMoE
from dasam3.models import DASAM3, DASAM3Config
from dasam3.training import StageConfig, TrainConfig, Trainer

FROZEN = "frozen"  # the base model prompted with the new concepts, not adapted: the baseline row


@dataclass
class Budget:
    """Steps and learning rates of every stage, the same for every variant."""

    pretrain_steps: int
    warmup_steps: int
    calibrate_steps: int
    batch_size: int = 8
    pretrain_lr: float = 2e-3
    warmup_lr: float = 5e-3
    calibrate_lr: float = 1e-3

    def pretrain(self, concepts: list[str]) -> list[StageConfig]:
        return [StageConfig("pretrain", self.pretrain_steps, self.pretrain_lr, concepts=concepts)]

    def adaptation(self, variant: str, concepts: list[str]) -> list[StageConfig]:
        return [StageConfig("warmup", self.warmup_steps, self.warmup_lr, concepts=concepts, variant=variant),
                StageConfig("calibrate", self.calibrate_steps, self.calibrate_lr, concepts=concepts)]


@dataclass
class VariantResult:
    """One row of the table: a variant, its model, scores, size and speed."""

    variant: str
    model: DASAM3
    evaluation: EvaluationResult
    trainable_params: int
    step_ms: float | None
    seconds: float

    def summary(self) -> dict:
        mean = self.evaluation.mean()
        return {"variant": self.variant, "mean_dice": mean["dice"], "mean_hd95": mean["hd95"],
                "per_concept": self.evaluation.per_class(), "trainable_params": self.trainable_params,
                "step_ms": self.step_ms, "seconds": self.seconds}


def evaluate(model: DASAM3, test_set: SliceDataset, device: torch.device, batch_size: int = 8) -> EvaluationResult:
    """DSC and HD95 (mm) per class in 3-D on the test volumes, prompting with the class names."""
    return evaluate_volumes(test_set.volumes(), model_segmenter(model, test_set.classes, device), test_set.classes,
                            image_size=model.config.image_size, channels=model.config.in_channels,
                            batch_size=batch_size, protocol="mm")


@torch.no_grad()
def routing_shares(model: DASAM3, images: torch.Tensor, concepts: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """concept → DA-MoE layer name → the share of (token, slot) pairs each expert receives."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, DAMoE)}
    was_training = model.training
    model.eval()
    shares = {}
    for concept in concepts:
        model(images, [concept])
        shares[concept] = {}
        for name, layer in layers.items():
            chosen = layer.last_routing["indices"].flatten()
            counts = torch.bincount(chosen, minlength=layer.num_experts).float()
            shares[concept][name] = (counts / counts.sum().clamp_min(1)).tolist()
    model.train(was_training)
    return shares


def train(model: DASAM3, stages: list[StageConfig], train_set: SliceDataset, budget: Budget, out_dir: Path,
          device: torch.device, seed: int) -> float | None:
    """Run `stages` on `model` in place (checkpoints in out_dir); returns the median step time in ms."""
    steps = max((s.steps for s in stages), default=1)
    config = TrainConfig(stages=stages, batch_size=budget.batch_size, seed=seed, val_every=steps + 1,
                         checkpoint_every=steps + 1)
    trainer = Trainer(model, train_set, config, out_dir, device=device)
    trainer.fit()
    return trainer.median_step_ms


def run_experiment(base: DASAM3Config | Path, variants: Sequence[str], train_set: SliceDataset,
                   test_set: SliceDataset, budget: Budget, out_dir: Path, *, base_concepts: list[str],
                   device: torch.device, seed: int = 0,
                   log: Callable[[str], None] = print) -> list[VariantResult]:
    """Adapt each variant of a base model to the test classes and score it.

    base: a checkpoint folder to start from, or a config whose model is first pretrained on
    `base_concepts` (the CPU stand-in for SAM3's pretraining).  `FROZEN` among the variants scores the
    base itself, prompted with the new concepts.
    """
    concepts = list(test_set.classes)
    if isinstance(base, DASAM3Config):
        torch.manual_seed(seed)
        model = DASAM3(base).to(device)
        log(f"stage 0: pretraining the base model on {base_concepts} ({budget.pretrain_steps} steps)")
        train(model, budget.pretrain(base_concepts), train_set, budget, out_dir / "base", device, seed)
        base = out_dir / "base" / "checkpoints" / "last"
    results = []
    for variant in variants:
        started = time.perf_counter()
        torch.manual_seed(seed)
        model = DASAM3.from_pretrained(base, map_location=device)
        step_ms, trainable = None, 0
        if variant != FROZEN:
            log(f"{variant}: warm-up {budget.warmup_steps} + calibration {budget.calibrate_steps} steps")
            step_ms = train(model.train(), budget.adaptation(variant, concepts), train_set, budget,
                            out_dir / variant, device, seed)
            trainable = sum(p.numel() for p in model.trainable_parameters("warmup"))
        evaluation = evaluate(model, test_set, device, budget.batch_size)
        results.append(VariantResult(variant, model, evaluation, trainable, step_ms, time.perf_counter() - started))
        log(f"{variant}: mean DSC {evaluation.mean()['dice']:.4f}, HD95 {evaluation.mean()['hd95']:.2f} mm")
    return results


def results_table(results: Sequence[VariantResult]) -> str:
    """Markdown: per-class DSC/HD95 and their means (Table 1's shape), then parameters and step time."""
    scores = comparison_table({r.variant: r.evaluation for r in results})
    lines = ["| variant | trainable params (warm-up) | step ms |", "|---|---:|---:|"]
    for r in results:
        step = "–" if r.step_ms is None else f"{r.step_ms:.0f}"
        lines.append(f"| {r.variant} | {r.trainable_params:,} | {step} |")
    return scores + "\n\n" + "\n".join(lines)
