"""The embedded MNI152 default: label map sanity, brain mask respected, disjoint slabs, scaling."""

import numpy as np
import pytest

from dasam3.data import MNI152Dataset, mni152_cases, mni152_volume
from dasam3.data.mni152 import MNI152_SLABS_MM
from dasam3.data.transforms import normalize_mri

datasets = pytest.importorskip("nilearn.datasets")


@pytest.fixture(scope="module")
def template():
    def load(name):
        return np.asarray(getattr(datasets, name)(resolution=2).dataobj, dtype=np.float32)

    volume, z_mm = mni152_volume(2)
    return volume, z_mm, {name: load(f"load_mni152_{name}") for name in
                          ("template", "gm_template", "wm_template", "brain_mask")}


def test_label_map_follows_the_probability_maps_inside_the_mask(template):
    volume, _, maps = template
    label = volume.layout.from_slices(volume.label)  # back to nilearn's voxel grid
    gray, white, mask = maps["gm_template"], maps["wm_template"], maps["brain_mask"] > 0
    assert set(np.unique(label)) == {0, 1, 2}
    assert not label[~mask].any(), "tissue outside the brain mask"
    tissue = gray + white >= 0.5
    np.testing.assert_array_equal(label > 0, mask & tissue)
    assert (gray[label == 1] >= white[label == 1]).all()
    assert (white[label == 2] > gray[label == 2]).all()
    assert 0.3 < (label == 2).sum() / (label > 0).sum() < 0.6  # a plausible WM share


def test_image_is_the_percentile_scaled_template(template):
    volume, _, maps = template
    np.testing.assert_allclose(volume.layout.from_slices(volume.image), normalize_mri(maps["template"]),
                               atol=1e-6)
    assert volume.spacing == (2.0, 2.0, 2.0)


def _offset(volume, case):
    """Where a slab's slices sit in the whole volume."""
    depth = case.num_slices()
    matches = [s for s in range(volume.image.shape[0] - depth + 1)
               if np.array_equal(volume.image[s:s + depth], case.volume.image)]
    assert len(matches) == 1
    return matches[0]


def test_slabs_are_disjoint_with_gaps_and_hold_both_tissues(template):
    volume, z_mm, _ = template
    taken = {}
    for split in ("train", "test"):
        for case, (low, high) in zip(mni152_cases(split), MNI152_SLABS_MM[split]):
            start = _offset(volume, case)
            z = z_mm[start:start + case.num_slices()]
            assert z.min() >= low and z.max() <= high and len(z) == (high - low) / 2 + 1
            taken[split] = taken.get(split, set()) | set(z.tolist())
            for slice_label in case.volume.label:
                assert {1, 2} <= set(np.unique(slice_label).tolist())
    assert taken["train"].isdisjoint(taken["test"])
    gap = min(abs(a - b) for a in taken["train"] for b in taken["test"])
    assert gap >= 6.0  # 4 mm of skipped slices between the nearest slice centres (2 mm apart)
    assert len(taken["train"]) == 43 and len(taken["test"]) == 9


def test_dataset_items(template):
    dataset = MNI152Dataset("test", image_size=64)
    assert dataset.concepts == ["gray matter", "white matter", "brain"]
    item = dataset[4]
    assert item["image"].shape == (1, 64, 64) and item["masks"].shape == (3, 64, 64)
    torch = pytest.importorskip("torch")
    assert torch.equal(item["masks"][2], torch.maximum(item["masks"][0], item["masks"][1]))
    assert item["masks"][0].sum() > 100 and item["masks"][1].sum() > 100


def test_predict_on_the_template_file_sees_the_training_inputs(template, tmp_path):
    """`dasam3 predict --modality mri` reads the template into the same slices the dataset serves."""
    from dasam3.data.transforms import normalize
    from dasam3.io import read_nifti_slices

    volume, _, _ = template
    path = tmp_path / "mni152.nii.gz"
    template_image = datasets.load_mni152_template(resolution=2)
    # nilearn's header says uint8 (saving it as is would quantise the intensities): keep float32
    template_image.set_data_dtype(np.float32)
    template_image.to_filename(str(path))
    slices, layout, _ = read_nifti_slices(path)
    np.testing.assert_array_equal(normalize(slices, "mri"), volume.image)
    assert layout.spacing == volume.spacing
