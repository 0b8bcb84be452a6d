"""`dasam3 demo`: DA-SAM3 end to end on the embedded MNI152 brain MRI, on a CPU.

Stage 0 trains a small base model on the generic concept "brain" (standing in for SAM3's pretrained
knowledge: no pretrained weights ship offline); it is then frozen, its hierarchical FFNs are upcycled
into DA-MoE layers and the paper's two stages adapt it to "gray matter" and "white matter".  The
frozen base (prompted with the new concepts), LoRA (E = 1, k = 1) and DA-SAM3 are scored (DSC, HD95
in mm, 3-D; `--protocol` chooses the empty-mask rule) on held-out axial slabs under the same budget.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dasam3._common import resolve_device
from dasam3.commands import clear_output
from dasam3.metrics import PROTOCOLS

QUICK_SECONDS = 90  # what --quick promises on 2 CPU cores


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"the same path end to end on a tiny budget (under {QUICK_SECONDS} s on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"),
                        help="checkpoint, figures and tables go here (default: ./demo_out)")
    parser.add_argument("--json", type=Path, default=None, help="also write the headline numbers here")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --out")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                        help="scoring protocol (default: the dataset's, mm for the MNI152 demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from dasam3.demo import run_demo

    out = args.out
    clear_output(out, args.overwrite, "demo")
    device = resolve_device(args.device)
    started = time.perf_counter()
    summary = run_demo(out, quick=args.quick, seed=args.seed, device=device, protocol=args.protocol)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nmean DSC (gray + white matter): DA-SAM3 {summary['mean_dice']:.4f}, "
          f"frozen baseline {summary['baseline_mean_dice']:.4f}; {summary['seconds']:.0f} s. Results in {out}/")
    return 0
