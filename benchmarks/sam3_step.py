"""One training step of the full-size SAM3 (transformers' `Sam3Model(Sam3Config())`, 840 M parameters,
random init): the frozen model's forward alone, LoRA at the DA-MoE layers (E = 1, k = 1, no context)
and DA-SAM3 (E = 4, k = 2, rank 8, concept context), side by side in one run.

    python benchmarks/sam3_step.py --out benchmarks/results/sam3_step_cpu.json            # 336² on the CPU
    python benchmarks/sam3_step.py --device cuda --out benchmarks/results/sam3_step_gpu.json  # 1008²

A training step is what `dasam3 train` does per batch: forward in training mode, Dice + Focal on
`semantic_seg` plus the routing loss, backward, AdamW over `mark_trainable(model, "warmup")` (the
fusion encoder's DA-MoE / LoRA factors, routers, contexts and LayerNorms; the towers run without
autograd).  One model is built; the contenders differ only in its fusion encoder (the original, a LoRA
copy, a DA-SAM3 copy), swapped in turn, and their steps are interleaved round by round (after one
warm-up step each: AdamW's state, the allocator), so a machine whose load drifts slows all three
alike.  The figure is each contender's median step.

Peak memory: on the CPU the process's peak resident set (VmHWM, reset through /proc/self/clear_refs
before each step; the script re-runs itself with glibc's mmap threshold pinned low, so freed tensors
leave the resident set at once and it follows the live tensors; tracemalloc cannot be used, it does
not see torch's allocations).  On a GPU `torch.cuda.max_memory_allocated`.  Both are reported as the
total (weights included) and as the step's extra over what was resident before it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTENDERS = ("frozen-forward", "lora", "da-sam3")
ADAPTATIONS = {"lora": {"num_experts": 1, "top_k": 1, "use_context": False},
               "da-sam3": {"num_experts": 4, "top_k": 2, "rank": 8}}
PROMPT_LENGTH = 32


def build(image_size: int, device: torch.device):
    """The full-size model and each contender's fusion encoder (the original and two adapted copies)."""
    from transformers import Sam3Config, Sam3Model

    from dasam3.integrations.sam3 import adapt_sam3

    config = Sam3Config()
    config.vision_config.backbone_config.image_size = image_size
    model = Sam3Model(config)
    encoders = {"frozen-forward": model.detr_encoder}
    for name, options in ADAPTATIONS.items():
        model.detr_encoder = copy.deepcopy(encoders["frozen-forward"])
        adapt_sam3(model, **options)
        encoders[name] = model.detr_encoder
    return model.to(device).train(), {name: e.to(device).train() for name, e in encoders.items()}


def use(model, encoders: dict, contender: str) -> list[torch.nn.Parameter]:
    """Put `contender`'s fusion encoder in the model and mark what it trains; returns those parameters."""
    from dasam3.layers import mark_trainable

    model.detr_encoder = encoders[contender]
    if contender in ADAPTATIONS:
        mark_trainable(model, "warmup")
    else:
        model.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def inputs(batch: int, image_size: int, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, PROMPT_LENGTH, dtype=torch.long)
    mask[:, 6:] = 0  # a short prompt padded to 32 tokens, as Sam3Processor pads
    return {"pixel_values": torch.rand(batch, 3, image_size, image_size, generator=generator).to(device),
            "input_ids": torch.randint(1, vocab_size, (batch, PROMPT_LENGTH), generator=generator).to(device),
            "attention_mask": mask.to(device)}


class PeakMemory:
    """Peak memory of a block: the total and the extra over what was in use when it began."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
            self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _status_bytes("VmHWM")
        self.extra = self.peak - self.start


def _status_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure(image_size: int, batch: int, steps: int, device: torch.device) -> dict[str, dict]:
    """Build once, warm each contender up, then `steps` rounds of one timed step per contender."""
    from dasam3.layers import aux_loss
    from dasam3.losses import segmentation_loss

    torch.manual_seed(0)
    started = time.perf_counter()
    model, encoders = build(image_size, device)
    build_seconds = time.perf_counter() - started
    batch_inputs = inputs(batch, image_size, model.config.text_config.vocab_size, device)
    optimizers = {c: torch.optim.AdamW(use(model, encoders, c), lr=5e-4, weight_decay=0.1) for c in ADAPTATIONS}

    def step(contender: str) -> None:  # with the contender's encoder in place
        if contender not in optimizers:
            with torch.no_grad():
                model(**batch_inputs)
            return
        logits = model(**batch_inputs).semantic_seg
        targets = (torch.rand(logits.shape, generator=torch.Generator().manual_seed(1)) > 0.5).float().to(device)
        loss = segmentation_loss(logits, targets) + aux_loss(model)
        optimizers[contender].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[contender].step()

    rows = {c: {"contender": c, "step_seconds": [], "peaks": [], "extras": []} for c in CONTENDERS}
    for contender in CONTENDERS:
        use(model, encoders, contender)
        step(contender)  # warm-up
    for _ in range(steps):
        for contender in CONTENDERS:
            use(model, encoders, contender)
            with PeakMemory(device) as memory:
                begun = time.perf_counter()
                step(contender)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                rows[contender]["step_seconds"].append(time.perf_counter() - begun)
            rows[contender]["peaks"].append(memory.peak)
            rows[contender]["extras"].append(memory.extra)
            print(f"{contender:>15}: {rows[contender]['step_seconds'][-1]:7.2f} s", file=sys.stderr, flush=True)
    for contender, row in rows.items():
        row.update(median_seconds=statistics.median(row["step_seconds"]), min_seconds=min(row["step_seconds"]),
                   peak_bytes=max(row.pop("peaks")),
                   peak_extra_bytes=max(row.pop("extras")),
                   trainable_parameters=sum(p.numel() for p in use(model, encoders, contender)),
                   build_seconds=build_seconds)
    return rows


def run_child(args: argparse.Namespace) -> dict[str, dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--device", args.device,
               "--image-size", str(args.image_size), "--batch", str(args.batch), "--steps", str(args.steps)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed (rc {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rows: dict[str, dict]) -> dict[str, float]:
    """The goals' ratios, from the medians and from the fastest steps (contention only ever adds time, so on
    a loaded machine the fastest step is the steadier estimate)."""
    frozen, lora, moe = (rows[c] for c in CONTENDERS)
    ratios = {}
    for estimate, pick in (("median", statistics.median), ("min", min)):
        seconds = {name: pick(row["step_seconds"]) for name, row in rows.items()}
        ratios[f"time_da_sam3_over_lora_{estimate}"] = seconds["da-sam3"] / seconds["lora"]
        ratios[f"time_da_sam3_over_frozen_forward_{estimate}"] = seconds["da-sam3"] / seconds["frozen-forward"]
        ratios[f"time_lora_over_frozen_forward_{estimate}"] = seconds["lora"] / seconds["frozen-forward"]
    ratios["peak_da_sam3_over_frozen_forward"] = moe["peak_bytes"] / frozen["peak_bytes"]
    ratios["peak_extra_da_sam3_over_frozen_forward"] = moe["peak_extra_bytes"] / frozen["peak_extra_bytes"]
    ratios["peak_lora_over_frozen_forward"] = lora["peak_bytes"] / frozen["peak_bytes"]
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--image-size", type=int, default=None, help="default: 336 on the CPU, 1008 on a GPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (one step per contender each)")
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.image_size = args.image_size or (1008 if args.device == "cuda" else 336)
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(measure(args.image_size, args.batch, args.steps, device)))
        return 0
    load_before = os.getloadavg()
    rows = run_child(args)
    for contender, row in rows.items():
        print(f"{contender:>15}: {row['median_seconds']:7.2f} s/step, peak {row['peak_bytes'] / 2**30:5.2f} GiB "
              f"(+{row['peak_extra_bytes'] / 2**30:.2f} over the resident model)")
    result = {**provenance(device, load_before), "image_size": args.image_size, "batch": args.batch,
              "steps": args.steps, "contenders": rows, "ratios": summarise(rows)}
    for name, value in result["ratios"].items():
        print(f"{name:>40}: {value:.3f}")
    write_result(result, args.out)
    return 0


def provenance(device: torch.device, load_before: tuple[float, float, float]) -> dict:
    """How and where a benchmark ran: its command line, the hardware and the machine's load around it."""
    from dasam3.benchmark import hardware_name

    return {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "device": device.type,
            "hardware": hardware_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


def write_result(result: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

if __name__ == "__main__":
    sys.exit(main())
