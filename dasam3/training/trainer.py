"""The staged trainer: pretrain (CPU demo only) → warm-up → calibration (SPEC section 3).

Every stage is a fixed number of optimizer steps over a seeded, epoch-wise shuffled stream of
batches, so a run killed at any step and resumed from its last checkpoint ends with the same weights
as an uninterrupted run: the checkpoint records the stage, the step, the epoch and the batch inside it,
the optimizer, the scheduler and the RNG; augmentation draws depend only on (seed, epoch, index).
Under `torchrun` the same code trains with DDP; rank 0 logs, validates and writes checkpoints.

A run folder is claimed when the run starts (`train_config.json`, created exclusively), so a second
run never writes into it. A resume compares the run's stored options with the current ones and refuses
any difference not named in `overrides` (the changes it accepts are recorded in `overrides.json`), and
starts from the newest intact checkpoint. Stage concepts and variants are checked (the variants on a
meta-device copy of the model) when the trainer is built, before anything trains.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from dasam3.data import SliceDataset, collate_slices
from dasam3._common import check_fields
from dasam3.encoders.cache import FeatureCache
from dasam3.io import atomic_output, create_new_text, read_json, write_text
from dasam3.layers import aux_loss, freeze_all_but
from dasam3.losses import segmentation_loss

from .checkpoint import (checkpoint_candidates, find_resumable, point, prune, restore_rng_state, rng_state,
                         write_checkpoint)
from .config import StageConfig, TrainConfig, resume_differences
from .distributed import World, all_reduce_mean, barrier

LOG_FIELDS = ("step", "stage", "kind", "loss", "seg_loss", "aux_loss", "dice", "lr", "val_dice", "seconds")
RUN_CONFIG, OVERRIDES = "train_config.json", "overrides.json"
RUN_FILES = (RUN_CONFIG, "log.csv", "checkpoints")  # any of them: the folder holds a run


@dataclass
class Progress:
    """Where a run is: stage index, step inside the stage, epoch and batch inside the epoch."""

    stage: int = 0
    step: int = 0
    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best_val_dice: float = -math.inf


def stage_parameters(model: nn.Module, stage: StageConfig) -> list[nn.Parameter]:
    """The parameters `stage` trains.  "pretrain": all but the encoders (frozen feature extractors
    unless the model builds its image encoder to be trained: `image_encoder.trainable`)."""
    if stage.kind != "pretrain":
        return model.trainable_parameters(stage.kind)
    frozen = {id(p) for p in model.text_encoder.parameters()}
    if getattr(model.image_encoder, "pretrained_source", None) is not None:
        frozen |= {id(p) for p in model.image_encoder.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen]


def warmup_cosine(total_steps: int, warmup_fraction: float):
    """LR multiplier: linear warm-up over the first `warmup_fraction` of the steps, then cosine to 0."""
    warmup = max(1, int(total_steps * warmup_fraction)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def dice_counts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per concept, |pred ∩ gt| and |pred| + |gt| over the batch, pred = `sigmoid(logits) > 0.5`.
    logits, targets: [B, K, H, W] → two [K] counts (sum them over batches to pool)."""
    pred, targets = logits.detach() > 0, targets > 0.5
    overlap = (pred & targets).flatten(2).sum((0, 2))
    return overlap, pred.flatten(2).sum((0, 2)) + targets.flatten(2).sum((0, 2))


def pooled_dice(overlap: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Hard Dice per concept from `dice_counts`, averaged over concepts (an empty pair counts 0)."""
    return (2 * overlap.float() / total.float().clamp_min(1)).mean()


class Trainer:
    """Train `model` (a `dasam3.models.DASAM3`) on `train_set` through `config.stages`.

    out_dir: checkpoints/ (with `last` and `best` links), log.csv, train_config.json.
    val_set: slices scored every `config.val_every` steps and at each stage's end (rank 0).
    """

    def __init__(self, model: nn.Module, train_set: SliceDataset, config: TrainConfig, out_dir: str | Path,
                 val_set: SliceDataset | None = None, world: World = World(), device: torch.device | str = "cpu",
                 show_progress: bool = True):
        self.model = model.to(device)
        self.train_set, self.val_set, self.config = train_set, val_set, config
        self.out_dir, self.world, self.device = Path(out_dir), world, torch.device(device)
        self.checkpoints = self.out_dir / "checkpoints"
        self.show_progress = show_progress and world.is_main
        self.progress = Progress()
        self._resumed_optimizer: dict[str, Any] | None = None
        self.step_seconds: list[float] = []  # compute time of each optimizer step this process ran
        self._board = None  # TensorBoard writer (rank 0, when tensorboard is installed)
        self._check_stages()
        self.feature_cache = None if not config.cache_features else \
            FeatureCache.from_option(config.cache_features, self.out_dir / "feature_cache")

    # -- public ----------------------------------------------------------------------------------------

    def fit(self, resume: bool = False, stop_after: int | None = None, overrides: Sequence[str] = ()) -> Progress:
        """Run every stage to its end (or `stop_after` global steps, to test interruption).

        resume: continue from the newest intact checkpoint exactly where it stopped (from step 0 when the
        run stopped before its first checkpoint). overrides: the options allowed to differ from the
        stored run's (e.g. ["seed"]); any other difference is a ValueError.
        """
        if resume:
            self._resume(overrides)
        elif self.world.is_main:
            self._claim_out_dir()
        self._board = self._open_tensorboard()
        try:
            while self.progress.stage < len(self.config.stages):
                if not self._run_stage(stop_after):
                    break
        finally:
            if self._board is not None:
                self._board.close()
                self._board = None
        return self.progress

    def _claim_out_dir(self) -> None:
        """Refuse a folder that holds a run (finished, running or killed), then claim it at once."""
        held = [name for name in RUN_FILES if (self.out_dir / name).exists()]
        if held:
            raise FileExistsError(f"{self.out_dir} already holds a run ({', '.join(held)}); resume it (--resume) "
                                  "or choose another output folder")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        create_new_text(self.out_dir / RUN_CONFIG, json.dumps(self.config.to_dict(), indent=2) + "\n")

    @property
    def median_step_ms(self) -> float | None:
        return 1e3 * statistics.median(self.step_seconds) if self.step_seconds else None

    # -- stages ------------------------------------------------------------------------------------------

    def _apply_variant(self, index: int) -> None:
        """Turn the model into the stage's variant (e.g. upcycle its FFNs), unless it already is one."""
        if apply_stage_variant(self.model, self.config.stages[index]):
            self.model.to(self.device)

    def _check_stages(self) -> None:
        """Every stage's concepts exist in the training data, and its variant builds: checked on a
        meta-device copy of the model (no memory, nothing trained) so a bad variant of a late stage is
        an error now, not after the earlier stages trained."""
        from dasam3.models.config import MoEConfig
        from dasam3.models.dasam3 import VARIANTS

        known = list(self.train_set.concepts)
        for index, stage in enumerate(self.config.stages):
            unknown = [c for c in stage.concepts or [] if c not in known]
            if unknown:
                raise ValueError(f"stages[{index}].concepts: {unknown} are not concepts of the training data {known}")
            if stage.variant is not None and stage.variant not in VARIANTS:
                raise ValueError(f"stages[{index}].variant must be one of {sorted(VARIANTS)}, got {stage.variant!r}")
            if stage.variant is not None and VARIANTS[stage.variant] is not None:
                check_fields(MoEConfig, stage.variant_options, f"stages[{index}].variant_options.")
        try:
            with torch.device("meta"):
                skeleton = type(self.model)(self.model.config)
        except RuntimeError:  # encoders that load their own weights (transformers) refuse the meta device:
            return  # the names and option types are checked above; a range error shows when its stage starts
        with torch.device("meta"):
            for index, stage in enumerate(self.config.stages):
                try:
                    apply_stage_variant(skeleton, stage)
                except (TypeError, ValueError) as error:
                    raise ValueError(f"stages[{index}].variant {stage.variant!r} with {stage.variant_options}: "
                                     f"{error}") from None

    def _select_trainable(self, stage: StageConfig) -> list[nn.Parameter]:
        params = stage_parameters(self.model, stage)
        freeze_all_but(self.model, params)
        return params

    def _run_stage(self, stop_after: int | None) -> bool:
        stage_index = self.progress.stage
        stage = self.config.stages[stage_index]
        self._apply_variant(stage_index)
        params = self._select_trainable(stage)
        if not params:  # e.g. calibrating a random router: no router, no context
            if self.world.is_main:
                tqdm.write(f"stage {stage_index + 1} ({stage.kind}): this model has nothing to train in it; skipped")
            self.progress.stage, self.progress.step = stage_index + 1, 0
            return True
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=self.config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(stage.steps, self.config.warmup_fraction))
        if self._resumed_optimizer is not None:  # resuming inside this stage
            optimizer.load_state_dict(self._resumed_optimizer["optimizer"])
            scheduler.load_state_dict(self._resumed_optimizer["scheduler"])
            self._resumed_optimizer = None
        network = self._wrap(self.model)
        concepts = stage.concepts or list(self.train_set.concepts)
        columns = [self.train_set.concepts.index(c) for c in concepts]

        bar = tqdm(total=stage.steps, initial=self.progress.step, disable=not self.show_progress,
                   desc=f"stage {stage_index + 1}/{len(self.config.stages)} {stage.kind}", dynamic_ncols=True)
        started = time.perf_counter()
        batches = self._batches()
        val_dice = None
        while self.progress.step < stage.steps:
            if stop_after is not None and self.progress.global_step >= stop_after:
                bar.close()
                return False
            network.train()
            batch = next(batches)
            step_started = time.perf_counter()
            metrics = self._train_step(network, optimizer, scheduler, params, batch, concepts, columns)
            self.step_seconds.append(time.perf_counter() - step_started)
            self.progress.step += 1
            self.progress.global_step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", dice=f"{metrics['dice']:.3f}")
            finished = self.progress.step == stage.steps
            if finished or self.progress.step % self.config.val_every == 0:
                metrics["val_dice"] = val_dice = self._validate(concepts)
            metrics["seconds"] = time.perf_counter() - started
            self._log(stage_index, stage, metrics)
            if not finished and self.progress.step % self.config.checkpoint_every == 0:
                self._checkpoint(optimizer, scheduler, metrics.get("val_dice"), concepts)
        bar.close()
        self.progress.stage, self.progress.step = stage_index + 1, 0  # a resume starts the next stage
        self._checkpoint(optimizer, scheduler, val_dice, concepts)
        return True

    def _train_step(self, network, optimizer, scheduler, params, batch, concepts, columns) -> dict[str, float]:
        images = batch["image"].to(self.device, non_blocking=True)
        targets = batch["masks"][:, columns].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp), \
                self.model.image_feature_cache(self.feature_cache):
            logits = network(images, concepts)
            seg = segmentation_loss(logits.float(), targets)
            aux = aux_loss(self.model, self.config.balance, self.config.sparse)
        loss = seg + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        optimizer.step()
        scheduler.step()
        values = torch.stack([loss.detach(), seg.detach(), aux.detach(), pooled_dice(*dice_counts(logits, targets))])
        loss, seg, aux, dice = all_reduce_mean(values, self.world).tolist()
        return {"loss": loss, "seg_loss": seg, "aux_loss": aux, "dice": dice, "lr": scheduler.get_last_lr()[0]}

    @property
    def _amp(self) -> bool:
        return self.config.amp and self.device.type == "cuda"

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.world.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # experts that receive no token in a step have no gradient: DDP must not wait for them
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    # -- data --------------------------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's index batches of `epoch` (full batches only; the same on every resume)."""
        sampler = DistributedSampler(self.train_set, num_replicas=self.world.size, rank=self.world.rank,
                                     shuffle=True, seed=self.config.seed, drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        size = min(self.config.batch_size, len(indices))
        return [indices[i:i + size] for i in range(0, len(indices) - size + 1, size)]

    def _loader_generator(self, epoch: int) -> torch.Generator:
        """A DataLoader's own seed source: iterating a loader draws a base seed, and drawn from the global
        RNG that draw would happen again when a resume re-creates the loader mid-epoch, shifting every
        later random draw (a next stage's expert initialisation) away from the uninterrupted run's."""
        return torch.Generator().manual_seed(hash((self.config.seed, epoch)) & 0x7FFF_FFFF_FFFF_FFFF)

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Batches from the recorded (epoch, batch) onwards, forever; progress is updated as they go."""
        while True:
            self.train_set.set_epoch(self.progress.epoch)
            batches = self._epoch_batches(self.progress.epoch)[self.progress.batch:]
            loader = DataLoader(self.train_set, batch_sampler=batches, collate_fn=collate_slices,
                                num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda",
                                generator=self._loader_generator(self.progress.epoch))
            for batch in loader:
                self.progress.batch += 1
                yield batch
            self.progress.epoch, self.progress.batch = self.progress.epoch + 1, 0

    # -- validation, logging, checkpoints -------------------------------------------------------------------

    @torch.no_grad()
    def _validate(self, concepts: list[str]) -> float | None:
        """Dice per concept pooled over the validation slices, averaged (rank 0; others get None)."""
        if self.val_set is None or not self.world.is_main:
            barrier(self.world)
            return None
        self.model.eval()
        columns = [self.val_set.concepts.index(c) for c in concepts]
        overlap = total = 0
        loader = DataLoader(self.val_set, batch_size=self.config.batch_size, collate_fn=collate_slices,
                            generator=self._loader_generator(-1))
        for batch in loader:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
                logits = self.model(batch["image"].to(self.device), concepts)
            batch_overlap, batch_total = dice_counts(logits, batch["masks"][:, columns].to(self.device))
            overlap, total = overlap + batch_overlap, total + batch_total
        self.model.train()
        barrier(self.world)
        return pooled_dice(overlap, total).item()

    def _log(self, stage_index: int, stage: StageConfig, metrics: dict[str, float]) -> None:
        if not self.world.is_main:
            return
        path = self.out_dir / "log.csv"
        new = not path.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({"step": self.progress.global_step, "stage": stage_index, "kind": stage.kind,
                             **{k: metrics.get(k) for k in LOG_FIELDS[3:]}})
        if self._board is not None:
            for name in LOG_FIELDS[3:]:
                if metrics.get(name) is not None:
                    self._board.add_scalar(f"train/{name}", metrics[name], self.progress.global_step)

    def _open_tensorboard(self):
        """A SummaryWriter in out_dir/tensorboard, or None without tensorboard (log.csv has it all).
        Events after the resumed step are purged: those steps are trained again, as in log.csv."""
        if not self.world.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.progress.global_step + 1)

    def _checkpoint(self, optimizer, scheduler, val_dice: float | None, concepts: list[str]) -> None:
        if self.world.is_main:
            best = val_dice is not None and concepts == self._final_concepts and val_dice > self.progress.best_val_dice
            if best:
                self.progress.best_val_dice = val_dice
            state = {"progress": asdict(self.progress), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rng_state(), "config": self.config.to_dict()}
            last = self.checkpoints / "last"
            previous = {Path(os.path.realpath(last))} if last.exists() else set()  # the fallback if last breaks
            folder = write_checkpoint(self.checkpoints, f"step-{self.progress.global_step:07d}",
                                      self._write_model, state)
            point(last, folder)
            if best:
                point(self.checkpoints / "best", folder)
            links = [self.checkpoints / n for n in ("last", "best") if (self.checkpoints / n).exists()]
            prune(self.checkpoints, set(links) | previous)
        barrier(self.world)

    @property
    def _final_concepts(self) -> list[str]:
        return self.config.stages[-1].concepts or list(self.train_set.concepts)

    def _write_model(self, folder: Path) -> None:
        from dasam3.adapters import save_adapter

        self.model.save_pretrained(folder)
        save_adapter(self.model, folder / "adapter.safetensors")
        if getattr(self.train_set, "preprocessing", None) is not None:  # read back by `dasam3 predict`
            self.train_set.preprocessing.save(folder)

    def _resume(self, overrides: Sequence[str]) -> None:
        """Rebuild the model's structure up to the newest intact checkpoint, then restore weights, RNG
        and optimizer. A run killed before its first checkpoint starts again from step 0."""
        if not checkpoint_candidates(self.checkpoints):  # at most a half-written first one
            self._restart(overrides)
            return
        folder, state, skipped = find_resumable(self.checkpoints)
        if self.world.is_main:
            for message in skipped:
                tqdm.write(f"dasam3 train: warning: {message}", file=sys.stderr)
        self._accept_config(state["config"], overrides, state["progress"]["global_step"])
        self.progress = Progress(**state["progress"])
        built = min(self.progress.stage + (self.progress.step > 0), len(self.config.stages))
        for index in range(built):
            self._apply_variant(index)
        stored_model = read_json(folder / "config.json", "checkpoint config")
        if stored_model != self.model.config.to_dict():
            changed = sorted(k for k in set(stored_model) | set(self.model.config.to_dict())
                             if stored_model.get(k) != self.model.config.to_dict().get(k))
            raise ValueError(f"the model given differs from the one in {folder / 'config.json'} (in {changed}); "
                             "resume with the run's model options")
        self.model.load_weights(folder)
        self.model.to(self.device)
        restore_rng_state(state["rng"])  # before the next stage's variant draws its initial factors
        if self.progress.step > 0:
            self._resumed_optimizer = state
        if self.world.is_main:
            if skipped:
                point(self.checkpoints / "last", folder)
            self._truncate_log()

    def _restart(self, overrides: Sequence[str]) -> None:
        """--resume of a run that stopped before its first checkpoint: same options, from step 0."""
        config_path = self.out_dir / RUN_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"nothing to resume in {self.out_dir}: it holds no checkpoint and no {RUN_CONFIG}")
        self._accept_config(read_json(config_path, "run config"), overrides, 0)
        if self.world.is_main:
            tqdm.write(f"dasam3 train: note: {self.out_dir} stopped before its first checkpoint; training again from "
                       "step 0", file=sys.stderr)
            self._truncate_log()

    def _accept_config(self, stored: dict[str, Any], overrides: Sequence[str], global_step: int) -> None:
        """Refuse options that differ from the stored run's unless named in overrides; record the accepted
        changes in overrides.json and make train_config.json the options the run now continues with."""
        known = set(self.config.to_dict())
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"--override {', '.join(unknown)}: not a training option; known: {sorted(known)}")
        changed = resume_differences(stored, self.config.to_dict())
        refused = {k: v for k, v in changed.items() if k not in overrides}
        if refused:
            listed = "; ".join(describe_change(k, old, new) for k, (old, new) in refused.items())
            raise ValueError(f"--resume: the options differ from the run in {self.out_dir} ({listed}); resume with "
                             f"the run's options, or pass --override {' --override '.join(refused)} to change them")
        if changed and self.world.is_main:
            path = self.out_dir / OVERRIDES
            history = read_json(path, "override record") if path.is_file() else []
            history.append({"global_step": global_step,
                            "changed": {k: {"from": old, "to": new} for k, (old, new) in changed.items()}})
            write_text(path, json.dumps(history, indent=2) + "\n")
            write_text(self.out_dir / RUN_CONFIG, json.dumps(self.config.to_dict(), indent=2) + "\n")

    def _truncate_log(self) -> None:
        """Drop log rows of steps after the checkpoint: they are trained again."""
        path = self.out_dir / "log.csv"
        if not path.exists():
            return
        with path.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= self.progress.global_step]
        with atomic_output(path) as staging, staging.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)


def apply_stage_variant(model: nn.Module, stage: StageConfig) -> bool:
    """Apply `stage.variant` to a DASAM3 model unless it is already upcycled or has concat fusion;
    returns whether it changed the model."""
    config = model.config
    if stage.variant is None or config.moe is not None or config.concat_layers is not None:
        return False
    model.apply_variant(stage.variant, **stage.variant_options)
    return True


def describe_change(key: str, old: Any, new: Any) -> str:
    """`key: run OLD, now NEW`; for stages, only the fields that changed (`stages[1].steps: run 3, now 5`)."""
    if key == "stages" and isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return "; ".join(f"stages[{i}].{name}: run {a.get(name)!r}, now {b.get(name)!r}"
                         for i, (a, b) in enumerate(zip(old, new)) for name in a if a.get(name) != b.get(name))
    return f"{key}: run {old!r}, now {new!r}"
