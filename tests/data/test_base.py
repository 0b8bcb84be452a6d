"""The slice dataset API: items, masks per concept, DataLoader collation, seeded augmentation."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dasam3.data import (ArrayCase, DataError, LabelRemap, SliceDataset, SyntheticDataset, Volume,
                         collate_slices, load_dataset)


def _ramp_case(case_id="ramp", depth=3, size=8):
    label = np.zeros((depth, size, size), np.int64)
    label[:, 1:4, 1:5], label[:, 5:7, 2:7] = 1, 2
    image = np.linspace(0, 1, depth * size * size, dtype=np.float32).reshape(depth, size, size)
    return ArrayCase(case_id, image, label, (3.0, 1.0, 1.0))


def test_items_hold_image_label_and_one_mask_per_concept():
    case = _ramp_case()
    dataset = SliceDataset([case], ("left part", "right part"), image_size=8, channels=3,
                           extra_concepts={"anything": (1, 2)})
    assert dataset.concepts == ["left part", "right part", "anything"] and len(dataset) == 3
    item = dataset[-1]
    assert (item["case_id"], item["slice_index"]) == ("ramp", 2)
    expected = torch.from_numpy(case.volume.image[2])
    for channel in range(3):
        torch.testing.assert_close(item["image"][channel], expected)
    label = torch.from_numpy(case.volume.label[2])
    torch.testing.assert_close(item["label"], label)
    torch.testing.assert_close(item["masks"], torch.stack([label == 1, label == 2, label > 0]).float())
    with pytest.raises(IndexError, match="index 3 out of range for 3 slices"):
        dataset[3]


def test_dataloader_batches_with_collate():
    dataset = SyntheticDataset("train", num_cases=2, depth=4, size=16, image_size=24)
    batch = next(iter(DataLoader(dataset, batch_size=5, collate_fn=collate_slices)))
    assert batch["image"].shape == (5, 1, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (5, 24, 24) and batch["label"].dtype == torch.int64
    assert batch["masks"].shape == (5, 2, 24, 24)
    assert batch["concepts"] == [["disc", "square"]] * 5
    assert batch["case_id"] == ["synthetic_train_000"] * 4 + ["synthetic_train_001"]
    assert batch["slice_index"].tolist() == [0, 1, 2, 3, 0]
    torch.testing.assert_close(batch["masks"][:, 1], (batch["label"] == 2).float())


def test_synthetic_is_seeded_and_splits_differ():
    first = next(SyntheticDataset("test", seed=3).volumes())
    again = next(SyntheticDataset("test", seed=3).volumes())
    train = next(SyntheticDataset("train", seed=3).volumes())
    np.testing.assert_array_equal(first.image, again.image)
    assert not np.array_equal(first.label, train.label)
    assert set(np.unique(first.label)) == {0, 1, 2}
    # the disc is bright, the square mid-grey, the background dark
    assert first.image[first.label == 1].mean() > first.image[first.label == 2].mean() > \
        first.image[first.label == 0].mean()


def test_augmentation_is_reproducible_per_seed_epoch_and_index():
    def draw(seed, epoch):
        dataset = SyntheticDataset("train", num_cases=1, augment=True, seed=seed)
        dataset.set_epoch(epoch)
        return dataset[2]

    a, b = draw(0, 0), draw(0, 0)
    torch.testing.assert_close(a["image"], b["image"])
    torch.testing.assert_close(a["masks"], b["masks"])
    assert not torch.equal(a["image"], draw(0, 1)["image"])
    assert not torch.equal(a["image"], draw(1, 0)["image"])
    plain = SyntheticDataset("train", num_cases=1, augment=None)[2]
    assert not torch.equal(a["image"], plain["image"])


def test_default_augmentation_keeps_body_sides():
    lateral = SliceDataset([_ramp_case()], ("right kidney", "left kidney"), image_size=8, augment=True)
    symmetric = SliceDataset([_ramp_case()], ("gray matter", "white matter"), image_size=8, augment=True)
    assert lateral.augment.horizontal_flip == 0.0 and symmetric.augment.horizontal_flip == 0.5


def test_uncached_dataset_reloads_and_resizes():
    cases = [_ramp_case("a"), _ramp_case("b")]
    cached = SliceDataset(cases, ("x", "y"), image_size=16)
    uncached = SliceDataset(cases, ("x", "y"), image_size=16, cache=False)
    for index in (0, 4, 1, 5):
        torch.testing.assert_close(cached[index]["image"], uncached[index]["image"])
    assert len(uncached._resized) == 1 and len(cached._resized) == 2


def test_volume_and_remap_errors_name_the_source():
    with pytest.raises(DataError, match=r"case c1: image and label must be 3-D with one shape.*"
                                        r"\(2, 3, 3\).*\(2, 3, 4\)"):
        Volume(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)), (1, 1, 1), "c1")
    remap = LabelRemap({0: 0, 5: 1})
    np.testing.assert_array_equal(remap(np.array([0, 5, 5]), "x"), [0, 1, 1])
    with pytest.raises(DataError, match=r"seg.nii.gz: unknown label values \[2.5, 7.0\]; expected "
                                        r"values in \[0, 5\]"):
        remap(np.array([0.0, 2.5, 7.0]), "seg.nii.gz")


def test_load_dataset_registry():
    assert len(load_dataset("synthetic", split="test", num_cases=1, depth=2)) == 2
    with pytest.raises(ValueError, match="dataset must be one of.*'kits'"):
        load_dataset("kits")
    with pytest.raises(ValueError, match="'synapse' reads your files: pass root"):
        load_dataset("synapse")
    with pytest.raises(ValueError, match="'mni152' needs no files"):
        load_dataset("mni152", root="/data")
