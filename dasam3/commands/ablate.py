"""`dasam3 ablate`: the paper's Table 2 variants under one budget.

Frozen baseline, Concat (the concept embedding concatenated to the tokens, no MoE), LoRA (E = 1,
k = 1), LoRA at DA-SAM3's trainable budget (rank matched), LoRA with the concept given to the decoder
(LoRA + Concat), standard MoE (full experts, token-only router), w/o DER (random router), w/o DPE
(full experts with the DER router) and DA-SAM3, all from the same base weights with the same steps,
learning rates and seed.  Writes ablation.csv and ablation.md (trainable parameters, DSC, HD95, step
time and wall time per row, the protocol named) and each variant's run folder.  On the embedded MNI152
data the base is pretrained first (as in the demo); on a real dataset, pass the base model with --base.
--protocol defaults to the dataset's (transunet for synapse, mm otherwise).
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from dasam3._common import resolve_device
from dasam3.commands import clear_output
from dasam3.experiments import FROZEN, LORA_CONCEPT, LORA_MATCHED
from dasam3.metrics import PROTOCOLS

TABLE2_VARIANTS = (FROZEN, "concat", "lora", LORA_MATCHED, LORA_CONCEPT, "standard-moe", "wo-der", "wo-dpe",
                   "da-sam3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mni152")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--base", type=Path, default=None,
                        help="checkpoint folder of the base model (default: pretrain one, as the demo does)")
    parser.add_argument("--variants", nargs="+", default=list(TABLE2_VARIANTS), choices=TABLE2_VARIANTS)
    parser.add_argument("--quick", action="store_true", help="the demo's --quick budget (a smoke run)")
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--calibrate-steps", type=int, default=None)
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("ablation_out"))
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier ablation in --out")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                        help="scoring protocol (default: the dataset's; transunet for synapse, mm otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    import time
    from dataclasses import replace

    from dasam3.data import load_dataset
    from dasam3.demo import FULL, GENERIC_CONCEPT, QUICK, demo_model_config
    from dasam3.experiments import results_table, run_experiment

    clear_output(args.out, args.overwrite, "ablate")
    if args.base is None and args.dataset != "mni152":
        raise SystemExit("dasam3 ablate: on a real dataset pass the base model with --base CHECKPOINT")
    preset = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("warmup_steps", args.warmup_steps), ("calibrate_steps", args.calibrate_steps),
                                   ("pretrain_steps", args.pretrain_steps), ("batch_size", args.batch_size))
                 if v is not None}
    budget = replace(preset["budget"], **overrides)
    device = resolve_device(args.device)
    size = preset["image_size"] if args.base is None else None
    options = {"image_size": size} if size else {}
    train_set = load_dataset(args.dataset, args.data_root, "train", augment=True, seed=args.seed, **options)
    test_set = load_dataset(args.dataset, args.data_root, "test", **options)
    base = args.base or demo_model_config(size, list(test_set.classes))
    started = time.perf_counter()
    results = run_experiment(base, args.variants, train_set, test_set, budget, args.out / "runs",
                             base_concepts=[GENERIC_CONCEPT], device=device, seed=args.seed, protocol=args.protocol)
    table = results_table(results) + f"\nTotal: {time.perf_counter() - started:.0f} s.\n"
    print("\n" + table)
    (args.out / "ablation.md").write_text(table + "\n")
    (args.out / "ablation.csv").write_text(_csv(results))
    return 0


def _csv(results) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    classes = list(results[0].evaluation.per_class())
    evaluation = results[0].evaluation
    writer.writerow(["variant", "protocol", "mean_dice", f"mean_hd95_{evaluation.hd95_unit}",
                     *(f"{c} {m}" for c in classes for m in ("dice", "hd95")), "trainable_params", "step_ms",
                     "seconds"])
    for r in results:
        summary = r.summary()
        per_class = [summary["per_concept"][c][m] for c in classes for m in ("dice", "hd95")]
        writer.writerow([r.variant, r.evaluation.protocol, summary["mean_dice"], summary["mean_hd95"], *per_class,
                         r.trainable_params, r.step_ms, round(r.seconds, 1)])
    return buffer.getvalue()
