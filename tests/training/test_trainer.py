"""The staged trainer: what each stage trains, exact resume, atomic checkpoints, DDP with gloo."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dasam3.data import SyntheticDataset
from dasam3.models import DASAM3, DASAM3Config
from dasam3.training import StageConfig, TrainConfig, Trainer, World

CONCEPTS = ["disc", "square"]


def tiny_model(seed: int = 0) -> DASAM3:
    torch.manual_seed(seed)
    config = DASAM3Config(image_size=32, in_channels=1, concepts=CONCEPTS, image_encoder_options={"widths": [4, 8, 8]},
                          text_encoder_options={"dim": 16}, d_model=16, num_layers=2, num_heads=2, d_ff=32, mask_dim=4)
    return DASAM3(config)


def tiny_data(split: str = "train") -> SyntheticDataset:
    return SyntheticDataset(split, num_cases=2, depth=4, size=32, image_size=32, augment=split == "train")


def stages() -> list[StageConfig]:
    return [StageConfig("pretrain", 3, 1e-2, concepts=["disc"]),
            StageConfig("warmup", 3, 1e-2, variant="da-sam3", variant_options={"num_experts": 3, "rank": 2}),
            StageConfig("calibrate", 2, 1e-2)]


def train_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"stages": stages(), "batch_size": 3, "val_every": 2, "checkpoint_every": 2, **overrides})


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["pretrain", "warmup", "calibrate"])
def test_one_step_changes_exactly_what_the_stage_trains(tmp_path, kind):
    model = tiny_model()
    variant = None if kind == "pretrain" else "da-sam3"
    if variant:  # a non-zero delta, so no trained tensor has a zero gradient by construction
        model.apply_variant(variant)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)
    before = snapshot(model)
    stage = StageConfig(kind, 1, 1e-2)
    trainer = Trainer(model, tiny_data(), TrainConfig(stages=[stage], batch_size=3), tmp_path, show_progress=False)
    trainer.fit()
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed == expected
    if kind == "pretrain":
        assert all(not n.startswith("text_encoder") for n in changed) and any("image_encoder" in n for n in changed)
    if kind == "warmup":
        assert any("lora_A" in n for n in changed) and any("norm" in n for n in changed)
        assert not any("fc1.weight" in n or "image_encoder.levels.0.0.weight" in n for n in changed)
    if kind == "calibrate":
        assert changed and all(".router." in n or "concept_context" in n for n in changed)


def test_resume_is_exact(tmp_path):
    reference = tiny_model()
    Trainer(reference, tiny_data(), train_config(), tmp_path / "straight", show_progress=False).fit()

    for stop in (3, 4):  # at a stage boundary (before the upcycle) and inside the warm-up stage
        out = tmp_path / f"stopped-{stop}"
        interrupted = Trainer(tiny_model(), tiny_data(), train_config(checkpoint_every=1), out, show_progress=False)
        progress = interrupted.fit(stop_after=stop)
        assert progress.global_step == stop
        resumed = Trainer(tiny_model(seed=123), tiny_data(), train_config(checkpoint_every=1), out, show_progress=False)
        resumed.fit(resume=True)
        final, expected = resumed.model.state_dict(), reference.state_dict()
        assert final.keys() == expected.keys()
        differing = [k for k in expected if not torch.equal(final[k], expected[k])]
        assert not differing, f"stopped at {stop}: {differing[:5]}"
        with (out / "log.csv").open() as handle:
            steps = [int(row["step"]) for row in csv.DictReader(handle)]
        assert steps == list(range(1, 9))


def test_tensorboard_mirrors_the_csv_log_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The last checkpoint is at step 3 (the end of stage 1): step 4 is logged, lost, and trained again.
    Trainer(tiny_model(), tiny_data(), train_config(), tmp_path, show_progress=False).fit(stop_after=4)
    Trainer(tiny_model(), tiny_data(), train_config(), tmp_path, show_progress=False).fit(resume=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    with (tmp_path / "log.csv").open() as handle:
        logged = {int(row["step"]): float(row["loss"]) for row in csv.DictReader(handle)}
    written = events.Scalars("train/loss")
    assert [event.step for event in written] == sorted(logged) == list(range(1, 9))  # the first step 4 purged
    assert all(event.value == pytest.approx(logged[event.step], rel=1e-6) for event in written)


def test_checkpoints_are_complete_and_a_second_run_refuses_the_folder(tmp_path):
    model = tiny_model()
    Trainer(model, tiny_data(), train_config(), tmp_path, val_set=tiny_data("test"), show_progress=False).fit()
    last, best = tmp_path / "checkpoints" / "last", tmp_path / "checkpoints" / "best"
    assert last.is_symlink() and best.is_symlink()
    for name in ("config.json", "model.safetensors", "adapter.safetensors", "trainer_state.pt"):
        assert (last / name).is_file()
    folders = [p.resolve() for p in (tmp_path / "checkpoints").iterdir() if not p.is_symlink()]
    previous = (tmp_path / "checkpoints" / "step-0000006").resolve()  # the one before last: the fallback
    assert last.resolve().name == "step-0000008"
    assert set(folders) == {last.resolve(), best.resolve(), previous}  # older ones pruned
    restored = DASAM3.from_pretrained(last)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in restored.state_dict().items())
    images = tiny_data("test")[0]["image"][None]
    assert torch.allclose(restored(images, CONCEPTS), model.eval()(images, CONCEPTS), atol=1e-5)
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(tiny_model(), tiny_data(), train_config(), tmp_path, show_progress=False).fit()


def test_config_rejects_bad_values_and_reads_yaml(tmp_path):
    with pytest.raises(ValueError, match=r"stage kind must be one of .*got 'finetune'"):
        StageConfig("finetune", 3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['epochs'\]"):
        TrainConfig.from_dict({"epochs": 3})
    path = tmp_path / "train.yaml"
    path.write_text("batch_size: 4\nstages:\n  - {kind: warmup, steps: 10, variant: da-sam3}\n  - {kind: calibrate, steps: 5}\n")
    config = TrainConfig.from_yaml(path, batch_size=2)
    assert config.batch_size == 2 and [s.kind for s in config.stages] == ["warmup", "calibrate"]
    assert config.stages[0].variant == "da-sam3" and config.total_steps == 15


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = tiny_model()
        trainer = Trainer(model, tiny_data(), train_config(), out_dir, world=World(rank, world_size, rank),
                          show_progress=False)
        trainer.fit()
        torch.save(snapshot(model), Path(results) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_with_two_gloo_processes(tmp_path):
    """Two ranks end with identical weights; only rank 0 writes the log and the checkpoints."""
    out = tmp_path / "run"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert (out / "checkpoints" / "last" / "model.safetensors").is_file()
    with (out / "log.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(1, 9))
    single = tiny_model()
    Trainer(single, tiny_data(), train_config(), tmp_path / "single", show_progress=False).fit()
    assert any(not torch.equal(single.state_dict()[k], rank0[k]) for k in rank0)  # each rank saw other batches
