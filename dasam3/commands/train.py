"""`dasam3 train`: train DA-SAM3 through its stages from a YAML file and/or flags.

The YAML holds the training options of `dasam3.training.TrainConfig` (dataset, stages, batch size,
...) plus either `model:` (a `DASAM3Config` as a mapping) or `base:` (a checkpoint folder to start
from, e.g. a pretrained DA-SAM3 or a SAM3-based model saved with `save_pretrained`).  Flags override
the file.  Under `torchrun --nproc_per_node N` the same command trains with DDP.  The run validates on
the dataset's "val" split when it has one, else on `val_cases` training cases held out (none by
default: the published protocols train on every training case).  At the end, rank 0 scores the test
split (DSC, HD95) and writes the tables next to the checkpoints.

    stages:
      - {kind: warmup, steps: 2000, variant: da-sam3}
      - {kind: calibrate, steps: 500}
    dataset: synapse
    data_root: /data/Synapse
    base: runs/sam3-base/checkpoints/last

Everything is checked before anything trains: every option's name, type and range, the model, the
stages' concepts and variants, the data, and that --out can be written and holds no other run. Such
errors are one `dasam3 train: error: ...` line and exit status 2; a failure while training exits 1.
`--resume` refuses options that differ from the run's unless each is named with `--override KEY`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dasam3.metrics import PROTOCOLS

USAGE_ERROR, RUN_ERROR = 2, 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML file of training options (see above)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoints/, log.csv, evaluation")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    parser.add_argument("--override", action="append", default=[], metavar="KEY",
                        help="with --resume: accept a changed training option (repeatable; recorded in "
                             "overrides.json)")
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

    options = read_yaml_options(args.config) if args.config else {}
    model = options.pop("model", None)
    base = options.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ValueError(f"base must be a checkpoint folder path, got {base!r}")
    base = args.base or (Path(base) if base else None)
    flags = {"dataset": args.dataset, "data_root": args.data_root, "image_size": args.image_size,
             "batch_size": args.batch_size, "seed": args.seed, "device": args.device,
             "num_workers": args.num_workers}
    options.update({k: v for k, v in flags.items() if v is not None})
    if model is None and base is None:
        raise ValueError("give the model, as `model:` (a DASAM3Config) in --config or --base DIR")
    if model is not None and base is not None:
        raise ValueError("give either `model:` or a base checkpoint, not both")
    return options, model, base


def _check_out(args: argparse.Namespace) -> None:
    """--out must be writable; a new run needs a folder without a run, a resume one with it."""
    from dasam3.io import check_writable
    from dasam3.training.trainer import RUN_FILES

    if args.override and not args.resume:
        raise ValueError("--override only applies with --resume")
    check_writable(args.out)
    held = [name for name in RUN_FILES if (args.out / name).exists()]
    if args.resume and not held:
        raise FileNotFoundError(f"nothing to resume: {args.out} holds no run")
    if not args.resume and held:
        raise FileExistsError(f"{args.out} already holds a run ({', '.join(held)}); resume it (--resume) "
                              "or choose another --out")


def _build_model(model_options: dict | None, base: Path | None, device):
    from dasam3._common import check_fields
    from dasam3.models import DASAM3, DASAM3Config

    if base is not None:
        if not base.is_dir():
            raise FileNotFoundError(f"base checkpoint folder not found: {base}")
        return DASAM3.from_pretrained(base, map_location=device).train()
    check_fields(DASAM3Config, model_options, "model.")
    return DASAM3(DASAM3Config.from_dict(model_options))


def hold_out(dataset, count: int):
    """(training set, validation set): the last `count` cases of `dataset` held out, unaugmented."""
    from dasam3.data import SliceDataset

    cases = list(dataset.cases)
    if not 0 < count < len(cases):
        raise ValueError(f"val_cases must leave at least one of the {len(cases)} training cases, got {count}")
    extras = {k: v for k, v in dataset.concept_labels.items() if k not in dataset.classes}

    def subset(members, augment):
        return SliceDataset(members, dataset.classes, image_size=dataset.image_size, channels=dataset.channels,
                            augment=augment, seed=dataset.seed, extra_concepts=extras, cache=dataset.cache)

    train, val = subset(cases[:-count], dataset.augment), subset(cases[-count:], None)
    train.preprocessing = val.preprocessing = dataset.preprocessing  # what predict reads back
    return train, val


def _datasets(config, channels: int, image_size: int):
    """(train, validation or None, test loader): the dataset's "val" split when it has one, else
    `config.val_cases` held-out training cases, else no validation."""
    from dasam3.data import load_dataset

    def load(split: str, **options):
        return load_dataset(config.dataset, config.data_root, split, channels=channels, image_size=image_size,
                            **options)

    train_set = load("train", augment=config.augment, seed=config.seed)
    try:
        val_set = load("val")
    except ValueError as error:
        if "split must be one of" not in str(error):  # the dataset has a val split that is broken
            raise
        val_set = None
    if val_set is None and config.val_cases:
        train_set, val_set = hold_out(train_set, config.val_cases)
    if val_set is None:
        print(f"dasam3 train: note: {config.dataset} has no val split and val_cases is 0: no validation "
              "(no val_dice, no checkpoints/best)", file=sys.stderr)
    return train_set, val_set, (lambda: load("test"))


def _prepare(args: argparse.Namespace):
    """Everything that can be checked before training: returns (config, model, trainer, test loader)."""
    import torch

    from dasam3.training import TrainConfig, Trainer, init_world

    options, model_options, base = _read_options(args)
    config = TrainConfig.from_dict(options)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r}: no CUDA GPU is available here")
    _check_out(args)
    world, device = init_world(config.device)
    torch.manual_seed(config.seed)
    model = _build_model(model_options, base, device)
    size = config.image_size or model.config.image_size
    train_set, val_set, test_set = _datasets(config, model.config.in_channels, size)
    if not model.config.concepts:
        model.config.concepts = list(train_set.classes)
    trainer = Trainer(model, train_set, config, args.out, val_set=val_set, world=world, device=device)
    return config, model, trainer, test_set, world, device


def _error(message: object, status: int) -> int:
    print(f"dasam3 train: error: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    from dasam3.experiments import evaluate

    try:
        config, model, trainer, test_set, world, device = _prepare(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        return _error(error, USAGE_ERROR)
    try:
        trainer.fit(resume=args.resume, overrides=args.override)
        if world.is_main and not args.no_eval:
            result = evaluate(model, test_set(), device, config.batch_size, args.protocol)
            result.write(args.out, method="dasam3", overwrite=True)
            print(result.to_markdown("dasam3"))
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # data or checkpoint found bad at resume
        return _error(error, USAGE_ERROR)
    except OSError as error:  # the disk filled up, the folder vanished: the last checkpoint is intact
        return _error(error, RUN_ERROR)
    return 0
