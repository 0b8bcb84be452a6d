"""`dasam3 train`: train DA-SAM3 through its stages from a YAML file and/or flags.

The YAML holds the training options of `dasam3.training.TrainConfig` (dataset, stages, batch size,
...) plus either `model:` (a `DASAM3Config` as a mapping) or `base:` (a checkpoint folder to start
from, e.g. a pretrained DA-SAM3 or a SAM3-based model saved with `save_pretrained`).  Flags override
the file.  Under `torchrun --nproc_per_node N` the same command trains with DDP.  At the end, rank 0
scores the test split (DSC, HD95) and writes the tables next to the checkpoints.

    stages:
      - {kind: warmup, steps: 2000, variant: da-sam3}
      - {kind: calibrate, steps: 500}
    dataset: synapse
    data_root: /data/Synapse
    base: runs/sam3-base/checkpoints/last
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dasam3.metrics import PROTOCOLS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML file of training options (see above)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoints/, log.csv, evaluation")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    parser.add_argument("--base", type=Path, default=None, help="checkpoint folder to start from")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--no-eval", action="store_true", help="skip scoring the test split at the end")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                        help="scoring protocol of the final test (default: the dataset's; transunet for synapse)")


def _read_options(args: argparse.Namespace) -> tuple[dict, dict | None, Path | None]:
    """(training options, model config mapping or None, base checkpoint or None)."""
    from dasam3.training.config import read_yaml_options

    try:
        options = read_yaml_options(args.config) if args.config else {}
    except ValueError as error:
        raise SystemExit(f"dasam3 train: {error}") from error
    model = options.pop("model", None)
    base = options.pop("base", None)
    base = args.base or (Path(base) if base else None)
    flags = {"dataset": args.dataset, "data_root": args.data_root, "image_size": args.image_size,
             "batch_size": args.batch_size, "seed": args.seed, "device": args.device,
             "num_workers": args.num_workers}
    options.update({k: v for k, v in flags.items() if v is not None})
    if model is None and base is None:
        raise SystemExit("dasam3 train: give the model, as `model:` (a DASAM3Config) in --config or --base DIR")
    if model is not None and base is not None:
        raise SystemExit("dasam3 train: give either `model:` or a base checkpoint, not both")
    return options, model, base


def run(args: argparse.Namespace) -> int:
    import torch

    from dasam3.data import load_dataset
    from dasam3.experiments import evaluate
    from dasam3.models import DASAM3, DASAM3Config
    from dasam3.training import TrainConfig, Trainer, init_world

    options, model_options, base = _read_options(args)
    config = TrainConfig.from_dict(options)
    world, device = init_world(config.device)
    torch.manual_seed(config.seed)
    model = DASAM3.from_pretrained(base, map_location=device).train() if base else \
        DASAM3(DASAM3Config.from_dict(model_options))
    size = {"image_size": config.image_size or model.config.image_size}
    train_set = load_dataset(config.dataset, config.data_root, "train", augment=config.augment, seed=config.seed,
                             channels=model.config.in_channels, **size)
    if not model.config.concepts:
        model.config.concepts = list(train_set.classes)
    trainer = Trainer(model, train_set, config, args.out, world=world, device=device)
    trainer.fit(resume=args.resume)
    if world.is_main and not args.no_eval:
        test_set = load_dataset(config.dataset, config.data_root, "test", channels=model.config.in_channels, **size)
        result = evaluate(model, test_set, device, config.batch_size, args.protocol)
        result.write(args.out, method="dasam3", overwrite=True)
        print(result.to_markdown("dasam3"))
    return 0
