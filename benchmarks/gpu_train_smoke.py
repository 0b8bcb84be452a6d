"""A short DA-SAM3 training run on a GPU (part of gpu_check.sh): SAM3's vision and text towers from
transformers, upcycled fusion decoder, both stages with bf16 autocast, then scoring.

The towers are transformers' `Sam3Model` at toy width built from a config (no weights ship offline), or
the real SAM3 when DASAM3_SAM3_DIR names a local `from_pretrained` directory.

    python benchmarks/gpu_train_smoke.py --out benchmarks/results/train_smoke.json

`--dry-run`: one step per stage on the CPU, no file (gpu_check.sh --dry-run: proves the wiring).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dasam3.benchmark import hardware_name  # noqa: E402
from dasam3.data import load_dataset  # noqa: E402
from dasam3.experiments import evaluate  # noqa: E402
from dasam3.models import DASAM3, DASAM3Config  # noqa: E402
from dasam3.training import StageConfig, TrainConfig, Trainer  # noqa: E402


def sam3_options() -> dict:
    local = os.environ.get("DASAM3_SAM3_DIR")
    if local:
        return {"pretrained": local}
    from tests.toy_sam3 import toy_sam3_config

    return {"config": toy_sam3_config().to_dict()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="one step per stage on the CPU, no file")
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.steps, args.out = "cpu", 1, None
    elif args.out is None:
        parser.error("--out is required (or --dry-run)")

    options = sam3_options()
    size = 1008 if "pretrained" in options else 56
    config = DASAM3Config(image_size=size, in_channels=3, image_encoder="sam3", image_encoder_options=options,
                          text_encoder="sam3", text_encoder_options=options, d_model=64, num_layers=6)
    torch.manual_seed(0)
    model = DASAM3(config)
    train_set = load_dataset("synthetic", split="train", image_size=size, channels=3, augment=True)
    test_set = load_dataset("synthetic", split="test", image_size=size, channels=3)
    stages = [StageConfig("pretrain", args.steps, 2e-3),
              StageConfig("warmup", args.steps, 5e-3, variant="da-sam3"),
              StageConfig("calibrate", max(1, args.steps // 2), 1e-3)]
    train_config = TrainConfig(dataset="synthetic", stages=stages, batch_size=8, amp=True, val_every=10**6,
                               checkpoint_every=10**6)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, train_set, train_config, run_dir, device=torch.device(args.device),
                          show_progress=False)
        trainer.fit()
        resumed = DASAM3.from_pretrained(Path(run_dir) / "checkpoints" / "last", map_location=args.device)
    result = evaluate(resumed, test_set, torch.device(args.device))
    report = {
        "device": hardware_name(args.device),
        "torch": torch.__version__, "sam3": "pretrained" if "pretrained" in options else "toy config",
        "steps": train_config.total_steps, "median_step_ms": trainer.median_step_ms,
        "seconds": time.perf_counter() - started, "mean_dice": result.mean()["dice"],
        "per_class": result.per_class(),
    }
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
