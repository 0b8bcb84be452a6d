"""The paper's experiments on one budget: a base model, its adapted variants, their scores.

`dasam3 demo` and `dasam3 ablate` wrap `run_experiment`: pretrain a base model on a generic concept
(standing in for SAM3's pretrained knowledge), then for every variant start from the same base
weights, run the two stages of SPEC section 3 on the dataset's classes and score DSC and HD95 per
class in 3-D on the held-out volumes, under the dataset's protocol unless one is given
(`dasam3.evaluation.default_protocol`).  Every variant gets the same steps, learning rates and seed.

Besides the model's variants (`dasam3.models.dasam3.VARIANTS`) two rows answer "is it the parameter
count, or the concept signal?":

- "lora-matched": LoRA (E = 1, k = 1) with its rank chosen so that its trainable parameters match
  DA-SAM3's (the rank may exceed the layer width: the budget, not the rank, is what is matched);
- "lora-concept": LoRA plus the concept embedding e_c given to the same decoder layers' FFNs (the Concat
  baseline's `Linear([h ; e_c])`, identity at initialisation): the concept signal of DA-SAM3's router
  context (whose other half attends e_c over the visual tokens) without the routing.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from dasam3.data import SliceDataset
from dasam3.evaluation import EvaluationResult, comparison_table, default_protocol, evaluate_volumes, model_segmenter
from dasam3.layers import DAMoE
from dasam3.models import DASAM3, DASAM3Config
from dasam3.training import StageConfig, TrainConfig, Trainer

FROZEN = "frozen"  # the base model prompted with the new concepts, not adapted: the baseline row
LORA_MATCHED, LORA_CONCEPT = "lora-matched", "lora-concept"  # the fairness rows (module docstring)


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

    def adaptation(self, variant: str | None, concepts: list[str], options: dict | None = None) -> list[StageConfig]:
        """Warm-up (turning the model into `variant` with `options` first, unless None) and calibration."""
        return [StageConfig("warmup", self.warmup_steps, self.warmup_lr, concepts=concepts, variant=variant,
                            variant_options=dict(options or {})),
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


def dataset_protocol(test_set: SliceDataset, protocol: str | None = None) -> str:
    """`protocol`, or the default of the dataset the test set reads (transunet for synapse, else mm)."""
    if protocol is not None:
        return protocol
    return default_protocol(test_set.preprocessing.dataset if test_set.preprocessing else None)


def evaluate(model: DASAM3, test_set: SliceDataset, device: torch.device, batch_size: int = 8,
             protocol: str | None = None) -> EvaluationResult:
    """DSC and HD95 per class in 3-D on the test volumes, prompting with the class names, under
    `protocol` (default: the dataset's, see `dataset_protocol`)."""
    return evaluate_volumes(test_set.volumes(), model_segmenter(model, test_set.classes, device), test_set.classes,
                            image_size=model.config.image_size, channels=model.config.in_channels,
                            batch_size=batch_size, protocol=dataset_protocol(test_set, protocol))


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


def warmup_trainable(model: DASAM3) -> int:
    """The number of parameters the warm-up stage trains (each shared parameter once)."""
    return sum(p.numel() for p in model.trainable_parameters("warmup"))


def matched_lora_rank(base: DASAM3, target: int) -> int:
    """The LoRA rank whose warm-up trainable count is nearest `target` (e.g. DA-SAM3's), on copies of
    `base`.  The count is affine in the rank, so two ranks fix it."""
    one, two = (warmup_trainable(copy.deepcopy(base).apply_variant("lora", rank=r)) for r in (1, 2))
    return max(1, round((target - (2 * one - two)) / (two - one)))


def adaptation_stages(variant: str, base: Path, model: DASAM3, concepts: list[str], budget: Budget,
                      log: Callable[[str], None]) -> list[StageConfig]:
    """The two stages that adapt `model` (loaded from the `base` checkpoint) into `variant`; the fairness
    rows are prepared here (module docstring), the model's own variants by the trainer."""
    if variant == LORA_MATCHED:
        with torch.random.fork_rng():  # counting on copies must not change the draws of the row's training
            reference = DASAM3.from_pretrained(base)
            target = warmup_trainable(copy.deepcopy(reference).apply_variant("da-sam3"))
            rank = matched_lora_rank(reference, target)
        log(f"{variant}: rank {rank} matches DA-SAM3's {target:,} trainable parameters")
        return budget.adaptation("lora", concepts, {"rank": rank})
    if variant == LORA_CONCEPT:
        model.apply_variant("lora").add_concat_fusion()  # the same hierarchical layers as the LoRA experts
        return budget.adaptation(None, concepts)
    return budget.adaptation(variant, concepts)


def run_experiment(base: DASAM3Config | Path, variants: Sequence[str], train_set: SliceDataset,
                   test_set: SliceDataset, budget: Budget, out_dir: Path, *, base_concepts: list[str],
                   device: torch.device, seed: int = 0, protocol: str | None = None,
                   log: Callable[[str], None] = print) -> list[VariantResult]:
    """Adapt each variant of a base model to the test classes and score it.

    base: a checkpoint folder to start from, or a config whose model is first pretrained on
    `base_concepts` (the CPU stand-in for SAM3's pretraining).  `FROZEN` among the variants scores the
    base itself, prompted with the new concepts; `LORA_MATCHED` and `LORA_CONCEPT` are the fairness
    rows (module docstring).  protocol: the scoring protocol (default: the test set's dataset's).
    """
    concepts = list(test_set.classes)
    if isinstance(base, DASAM3Config):
        torch.manual_seed(seed)
        model = DASAM3(base).to(device)
        log(f"stage 0: pretraining the base model on {base_concepts} ({budget.pretrain_steps} steps)")
        train(model, budget.pretrain(base_concepts), train_set, budget, out_dir / "base", device, seed)
        base = out_dir / "base" / "checkpoints" / "last"
    protocol = dataset_protocol(test_set, protocol)
    results = []
    for variant in variants:
        started = time.perf_counter()
        torch.manual_seed(seed)
        model = DASAM3.from_pretrained(base, map_location=device)
        step_ms, trainable = None, 0
        if variant != FROZEN:
            log(f"{variant}: warm-up {budget.warmup_steps} + calibration {budget.calibrate_steps} steps")
            stages = adaptation_stages(variant, base, model, concepts, budget, log)
            step_ms = train(model.train(), stages, train_set, budget, out_dir / variant, device, seed)
            trainable = warmup_trainable(model)
        evaluation = evaluate(model, test_set, device, budget.batch_size, protocol)
        results.append(VariantResult(variant, model, evaluation, trainable, step_ms, time.perf_counter() - started))
        unit = "voxels" if evaluation.hd95_unit == "voxel" else "mm"
        log(f"{variant}: mean DSC {evaluation.mean()['dice']:.4f}, HD95 {evaluation.mean()['hd95']:.2f} {unit}, "
            f"{trainable:,} trainable, {results[-1].seconds:.0f} s")
    return results


def results_table(results: Sequence[VariantResult]) -> str:
    """Markdown: trainable parameters, per-class DSC/HD95 and their means (Table 1's shape) per row with
    the protocol line, then step time and wall time per row."""
    scores = comparison_table({r.variant: r.evaluation for r in results},
                              trainable={r.variant: r.trainable_params for r in results})
    lines = ["| variant | step ms | seconds |", "|---|---:|---:|"]
    for r in results:
        step = "–" if r.step_ms is None else f"{r.step_ms:.0f}"
        lines.append(f"| {r.variant} | {step} | {r.seconds:.0f} |")
    return scores + "\n" + "\n".join(lines)
