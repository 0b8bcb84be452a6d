"""`dasam3 train` with `image_encoder: sam3` from a local directory, end to end, on the full-size SAM3.

    python benchmarks/sam3_train_e2e.py --out benchmarks/results/sam3_train_e2e_cpu.json
    python benchmarks/sam3_train_e2e.py --toy     # the same path at toy width (what CI runs)

1. A random-init `Sam3Model(Sam3Config())` (840 M parameters) is written with `save_pretrained` to a
   temporary folder: nothing is downloaded, the folder is what a user's checkpoint directory is.
2. `dasam3 train` (a subprocess, as a user runs it) builds DA-SAM3 on that folder's vision and text
   towers at a reduced resolution (`image_size` of the sam3 encoder), upcycles the fusion decoder and
   trains warm-up then calibration on the offline synthetic dataset, with `cache_features` (memory and
   disk tiers).  The run is killed (SIGKILL) right after its first checkpoint and resumed with
   `--resume` to its end.
3. `dasam3 predict` segments a NIfTI volume with the final checkpoint.
4. Frozen-feature caching: the same model trained over 3 epochs of a 4-slice set, with and without
   `cache_features`; the figure is the per-epoch time of the epochs after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from sam3_step import provenance, write_result  # noqa: E402

FULL = {"sam3_image_size": 336, "image_size": 64, "batch_size": 2, "warmup_steps": 3, "calibrate_steps": 1,
        "cache_epochs": 3}
TOY = {"sam3_image_size": 28, "image_size": 32, "batch_size": 2, "warmup_steps": 12, "calibrate_steps": 4,
       "cache_epochs": 3}


def write_sam3(folder: Path, toy: bool) -> float:
    """A random-init Sam3Model saved with save_pretrained; returns the seconds it took."""
    from transformers import Sam3Config, Sam3Model

    started = time.perf_counter()
    torch.manual_seed(0)
    if toy:
        from tests.toy_sam3 import toy_sam3_config

        config = toy_sam3_config()
    else:
        config = Sam3Config()
    Sam3Model(config).save_pretrained(folder)
    return time.perf_counter() - started


def model_options(sam3: Path, plan: dict) -> dict:
    """The DASAM3Config of the run: both towers from the folder (one load), the ViT at reduced resolution."""
    towers = {"pretrained": str(sam3), "tokenizer": "bytes"}  # a random-init folder has no tokenizer files
    return {"image_size": plan["image_size"], "in_channels": 1, "image_encoder": "sam3",
            "image_encoder_options": {**towers, "image_size": plan["sam3_image_size"]},
            "text_encoder": "sam3", "text_encoder_options": towers}


def train_options(sam3: Path, plan: dict) -> dict:
    return {"dataset": "synthetic", "image_size": plan["image_size"], "batch_size": plan["batch_size"],
            # the disk tier survives the kill: the resumed run reads the features the first run computed
            "augment": False, "cache_features": {"memory_gb": 4, "disk_gb": 2}, "checkpoint_every": 2,
            "val_every": 1000,
            "stages": [{"kind": "warmup", "steps": plan["warmup_steps"], "variant": "da-sam3"},
                       {"kind": "calibrate", "steps": plan["calibrate_steps"]}],
            "model": model_options(sam3, plan)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dasam3", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def train_killed_then_resumed(config: Path, out: Path) -> dict:
    """`dasam3 train`, SIGKILLed once its first checkpoint exists (mid-run), then `--resume`d to the end."""
    command = _cli("train", "--config", str(config), "--out", str(out), "--no-eval")
    started = time.perf_counter()
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "checkpoints" / "last"
    while process.poll() is None and not last.exists():
        time.sleep(0.05)
    interrupted = process.poll() is None
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    if not interrupted:
        raise RuntimeError(f"the run ended before it could be interrupted (rc {process.returncode}):\n"
                           f"{stderr.decode()[-3000:]}")
    killed_at = _checkpoint_step(last)
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([*command, "--resume"], env=_env(), check=True, stdout=subprocess.DEVNULL)
    return {"killed_after_checkpoint_step": killed_at, "first_run_seconds": first_seconds,
            "resumed_run_seconds": time.perf_counter() - started, "final_step": _checkpoint_step(last)}


def _checkpoint_step(link: Path) -> int:
    """The global step of the checkpoint a link (`last`) points at: its folder is `step-NNNNNNN`."""
    return int(link.resolve().name.split("-")[-1])


def predict(checkpoint: Path, folder: Path, size: int) -> dict:
    """`dasam3 predict` on a small synthetic MRI volume written as NIfTI."""
    import nibabel as nib

    from dasam3.data.synthetic import synthetic_volume

    image, _ = synthetic_volume(np.random.default_rng(7), 3, size)
    volume, output = folder / "volume.nii.gz", folder / "volume_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.transpose(1, 2, 0)).astype(np.float32), np.eye(4)), volume)
    started = time.perf_counter()
    subprocess.run(_cli("predict", "-i", str(volume), "-o", str(output), "--checkpoint", str(checkpoint)),
                   env=_env(), check=True, stdout=subprocess.DEVNULL)
    labels = np.asarray(nib.load(output).dataobj)
    return {"seconds": time.perf_counter() - started, "shape": list(labels.shape),
            "labels": sorted(int(v) for v in np.unique(labels))}


def cache_speedup(sam3: Path, plan: dict, folder: Path) -> dict:
    """Seconds per epoch with and without cache_features (4 slices, 3 epochs of warm-up)."""
    from dasam3.data import SyntheticDataset
    from dasam3.models import DASAM3, DASAM3Config
    from dasam3.training import StageConfig, TrainConfig, Trainer

    data = SyntheticDataset("train", num_cases=1, depth=4, size=plan["image_size"], image_size=plan["image_size"])
    steps_per_epoch = len(data) // plan["batch_size"]
    epochs = {}
    for cached in (False, True):
        torch.manual_seed(0)
        model = DASAM3(DASAM3Config(**model_options(sam3, plan), concepts=list(data.concepts)))
        stage = StageConfig("warmup", steps_per_epoch * plan["cache_epochs"], variant="da-sam3")
        config = TrainConfig(stages=[stage], batch_size=plan["batch_size"], augment=False, cache_features=cached,
                             val_every=1000, checkpoint_every=1000)
        trainer = Trainer(model, data, config, folder / f"cache-{cached}", show_progress=False)
        trainer.fit()
        seconds = trainer.step_seconds
        epochs[cached] = [sum(seconds[i:i + steps_per_epoch]) for i in range(0, len(seconds), steps_per_epoch)]
        del model, trainer
    later = {cached: statistics.mean(times[1:]) for cached, times in epochs.items()}
    return {"slices": len(data), "steps_per_epoch": steps_per_epoch, "epoch_seconds_uncached": epochs[False],
            "epoch_seconds_cached": epochs[True], "speedup_after_first_epoch": later[False] / later[True]}


def run(workdir: Path, toy: bool, measure_cache: bool = True) -> dict:
    plan = TOY if toy else FULL
    sam3 = workdir / "sam3"
    result = {"plan": plan, "toy": toy, "sam3_write_seconds": write_sam3(sam3, toy),
              "sam3_folder_bytes": sum(p.stat().st_size for p in sam3.iterdir())}
    config = workdir / "train.yaml"
    config.write_text(yaml.safe_dump(train_options(sam3, plan)))
    out = workdir / "run"
    result["train"] = train_killed_then_resumed(config, out)
    result["predict"] = predict(out / "checkpoints" / "last", workdir, plan["image_size"])
    if measure_cache:
        result["feature_cache"] = cache_speedup(sam3, plan, workdir)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", help="toy-width SAM3 (seconds) instead of the full size")
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dasam3-sam3-e2e-") as workdir:
        result = run(Path(workdir), args.toy)
    result.update(provenance(torch.device("cpu"), load_before))
    print(json.dumps(result, indent=2))
    write_result(result, args.out)
    return 0

if __name__ == "__main__":
    sys.exit(main())
