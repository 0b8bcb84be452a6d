"""The `dasam3` command line: one subcommand per module in `dasam3.commands`.

Each command module defines `add_arguments(parser)` and `run(args) -> int` (its one-line help is in
`COMMANDS` here); modules are imported only when their command runs, so `dasam3 --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name (= module under dasam3.commands, a dash read as an underscore) → one-line help
COMMANDS = {
    "demo": "DA-SAM3 end to end on the embedded MNI152 brain MRI (the main job; --quick for a smoke run)",
    "train": "train a DA-SAM3 model through its stages (YAML config and/or flags; torchrun for DDP)",
    "ablate": "the paper's Table 2 variants under one budget: DSC, HD95, trainable parameters, step time",
    "predict": "segment NIfTI volumes with a checkpoint and write label maps with a JSON legend",
    "evaluate": "score predicted label maps against ground truth (DSC, HD95 per case and class)",
    "bench": "time the DA-MoE layer against a dense FFN and print the parameter table",
    "check-labels": "check which label id is which organ on your data (centroid side and position per label)",
    "kernels": "compile every GPU kernel config for sm_80/sm_90 (no GPU needed): registers, spills, shared memory",
    "env": "versions, CPU and GPU, and which backend is available or why not (for bug reports)",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dasam3", description="Dual-Adaptive SAM3")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        sub_parser = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        if name == command:  # only the command that runs pays for its imports
            _module(name).add_arguments(sub_parser)
    return parser


def _module(name: str):
    return importlib.import_module(f"dasam3.commands.{name.replace('-', '_')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    return _module(args.command).run(args)
