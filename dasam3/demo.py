"""The CPU demo (`dasam3 demo`): budgets, the model, and what it writes."""

from __future__ import annotations

from pathlib import Path

import torch

from dasam3.adapters import save_adapter
from dasam3.data import load_dataset
from dasam3.evaluation import model_segmenter, predict_volume
from dasam3.experiments import FROZEN, Budget, VariantResult, results_table, routing_shares, run_experiment
from dasam3.figures import overlay_figure, routing_figure
from dasam3.models import DASAM3Config

GENERIC_CONCEPT = "brain"
VARIANTS = (FROZEN, "lora", "da-sam3")

# Measured on 2 cores: DA-SAM3's training Dice plateaus after ~400 warm-up steps (0.4 s each at 128²).
FULL = {"image_size": 128, "budget": Budget(pretrain_steps=150, warmup_steps=600, calibrate_steps=100)}
QUICK = {"image_size": 64, "budget": Budget(pretrain_steps=12, warmup_steps=12, calibrate_steps=4, batch_size=4)}


def demo_model_config(image_size: int, classes: list[str]) -> DASAM3Config:
    """A small DA-SAM3 with the real MiniLM sentence encoder and a conv image encoder trained in stage 0."""
    return DASAM3Config(image_size=image_size, in_channels=1, concepts=classes, text_encoder="minilm")


def run_demo(out: Path, *, quick: bool = False, seed: int = 0, device: torch.device = torch.device("cpu"),
             protocol: str | None = None) -> dict:
    """Train and score the demo's variants (under `protocol`, default the dataset's: mm); write the
    checkpoint with its preprocessing record, figures and tables into `out`."""
    preset = QUICK if quick else FULL
    size, budget = preset["image_size"], preset["budget"]
    train_set = load_dataset("mni152", split="train", image_size=size, augment=True, seed=seed)
    test_set = load_dataset("mni152", split="test", image_size=size)
    classes = list(test_set.classes)
    results = run_experiment(demo_model_config(size, classes), VARIANTS, train_set, test_set, budget,
                             out / "runs", base_concepts=[GENERIC_CONCEPT], device=device, seed=seed,
                             protocol=protocol)
    table = results_table(results)
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")

    adapted = results[-1]
    checkpoint = out / "checkpoint"
    adapted.model.save_pretrained(checkpoint)
    save_adapter(adapted.model, checkpoint / "adapter.safetensors")
    train_set.preprocessing.save(checkpoint)  # `dasam3 predict` normalises and slices as in training
    _figures(results, test_set, out, device)
    by_name = {r.variant: r for r in results}
    return {
        "mean_dice": adapted.evaluation.mean()["dice"],
        "baseline_mean_dice": by_name[FROZEN].evaluation.mean()["dice"],
        "per_concept": {name: {"dice": row["dice"], "hd95": row["hd95"]}
                        for name, row in adapted.evaluation.per_class().items()},
        "variants": [r.summary() for r in results],
        "protocol": adapted.evaluation.protocol,
        "hd95_unit": adapted.evaluation.hd95_unit,
        "quick": quick,
        "budget": vars(budget),
        "checkpoint": str(checkpoint),
    }


def _figures(results: list[VariantResult], test_set, out: Path, device: torch.device) -> None:
    """overlay.png (like the paper's Fig. 2) and routing.png (expert shares per concept and layer)."""
    volume = next(test_set.volumes())
    classes = list(test_set.classes)
    predictions = {}
    for result in results:
        config = result.model.config
        predictions[result.variant] = predict_volume(volume.image, model_segmenter(result.model, classes, device),
                                                     image_size=config.image_size, channels=config.in_channels)
    overlay_figure(volume.image, volume.label, predictions, classes, out / "overlay.png",
                   title="MNI152 held-out slab: gray and white matter")
    adapted = results[-1].model
    images = torch.stack([test_set[i]["image"] for i in range(len(test_set))]).to(device)
    shares = {concept: {_layer_title(name): values for name, values in layers.items()}
              for concept, layers in routing_shares(adapted, images, classes).items()}
    routing_figure(shares, out / "routing.png",
                   title="DA-SAM3: share of tokens per expert, per concept and DA-MoE layer")


def _layer_title(module_name: str) -> str:
    """"decoder.layers.0.ffn" → "fusion layer 1" (1-based, as the paper counts)."""
    index = next(int(part) for part in module_name.split(".") if part.isdigit())
    return f"fusion layer {index + 1}"
