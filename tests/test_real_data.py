"""The gpu preset's real-data path, offline: every torchvision loader reads a tiny fake in its real on-disk format.

The fakes (`matu_lib.data.fake_real`) write the files torchvision parses (idx, .mat, pickled CIFAR batches, HDF5,
CSV, split files, class folders); these tests load them through `load_real_task` / `real_splits` with
download=False and check sizes, labels, class names, the transform's output and the validation split.
"""

from __future__ import annotations

import pickle
import time
from contextlib import nullcontext

import pytest
import torch

from matu_lib.data.fake_real import FAKERS, accept_fake_checksums, write_fake
from matu_lib.data.real import (
    REAL_TASKS,
    DatasetNotAvailable,
    clean_class_name,
    default_transform,
    load_real_task,
    real_class_names,
    real_splits,
)
from matu_lib.presets import preset

SMALL = default_transform(16)  # parsing is what is tested; 224 px is checked once per dataset


def _labels(ds) -> list[int]:
    return [ds[i][1] for i in range(len(ds))]


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """One fake copy of every gpu-preset dataset, each under its own root, written once for the module."""
    base = tmp_path_factory.mktemp("real")
    return {name: (base / name, write_fake(name, base / name, seed=0)) for name in FAKERS}


def test_every_gpu_preset_dataset_has_a_fake():
    cfg = preset("gpu")
    used = set(cfg.tasks) if cfg.tasks is not None else set(REAL_TASKS)
    assert cfg.dataset == "real" and used == set(REAL_TASKS)
    assert set(FAKERS) == used, f"no fake for {sorted(used - set(FAKERS))}"


@pytest.mark.parametrize("name", sorted(REAL_TASKS))
def test_loader_reads_fake(fakes, name):
    root, layout = fakes[name]
    with accept_fake_checksums() if layout.md5_checked else nullcontext():
        for i, (split, n) in enumerate(layout.sizes.items()):
            ds = load_real_task(name, root, split, download=False, transform=None if i == 0 else SMALL)
            assert len(ds) == n, f"{name}/{split}: {len(ds)} samples, the fake holds {n}"
            if i == 0:  # the default transform: CLIP's 224 px input, RGB, in [0, 1]
                x = ds[0][0]
                assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
            classes = real_class_names(name, ds)
            assert len(classes) == layout.n_classes and all(isinstance(c, str) and c for c in classes)
            if layout.classes is not None:
                assert classes == layout.classes
            labels = _labels(ds)
            assert all(isinstance(y, int) for y in labels), f"{name}: targets are not class indices: {labels[:3]}"
            assert min(labels) == 0 and max(labels) < len(classes) and len(set(labels)) > 1, f"{name}/{split}: {labels}"


@pytest.mark.parametrize("name", sorted(REAL_TASKS))
def test_real_splits_carve_disjoint_deterministic_validation(fakes, name):
    root, layout = fakes[name]
    with accept_fake_checksums() if layout.md5_checked else nullcontext():
        train, val, test, spec = real_splits(name, seed=3, root=root, transform=SMALL)
        again = real_splits(name, seed=3, root=root, transform=SMALL)
        other = real_splits(name, seed=4, root=root, transform=SMALL)
    assert spec.name == name and len(spec.classes) == layout.n_classes and spec.templates == REAL_TASKS[name].templates
    assert train.dataset is val.dataset, "validation must be carved from the training data"
    assert not set(train.indices) & set(val.indices) and len(val) >= 1 and len(train) >= 1
    assert train.indices == again[0].indices and val.indices == again[1].indices
    assert (train.indices, val.indices) != (other[0].indices, other[1].indices)
    if "all" in layout.sizes:  # one split: 70/10/20 of it, all three disjoint
        assert test.dataset is train.dataset and not set(test.indices) & (set(train.indices) | set(val.indices))
        assert len(train) + len(val) + len(test) == layout.sizes["all"]
    else:
        assert len(train) + len(val) == layout.sizes["train"]
        assert len(test) == layout.sizes[REAL_TASKS[name].test_split]


def test_md5_checked_fakes_fail_without_the_patch_and_it_is_undone(fakes):
    import torchvision.datasets.cifar as cifar

    original = cifar.check_integrity
    root, layout = fakes["CIFAR10"]
    assert layout.md5_checked
    with pytest.raises(DatasetNotAvailable, match="CIFAR10"):
        load_real_task("CIFAR10", root, "train")
    with accept_fake_checksums():
        assert len(load_real_task("CIFAR10", root, "train", transform=SMALL)) == layout.sizes["train"]
    assert cifar.check_integrity is original


def test_label_conventions_are_undone(fakes):
    """SVHN stores digit 0 as 10, CLEVR counts 3..10 objects, EMNIST letters start at 1, CelebA has 40 attributes."""
    with accept_fake_checksums():
        svhn = load_real_task("SVHN", fakes["SVHN"][0], "train", transform=SMALL)
        celeba = load_real_task("CelebASmiling", fakes["CelebASmiling"][0], "train", transform=SMALL)
    assert _labels(svhn)[:10] == list(range(10))  # the fake writes digits 0..9 in order (0 stored as 10)
    smiling = celeba.attr_names.index("Smiling")
    assert _labels(celeba) == [int(a) for a in celeba.attr[:, smiling]]
    clevr = load_real_task("CLEVRCount", fakes["CLEVRCount"][0], "train", transform=SMALL)
    assert _labels(clevr) == [i % 8 for i in range(len(clevr))]  # the fake's scene i holds 3 + i % 8 objects
    emnist = load_real_task("EMNIST", fakes["EMNIST"][0], "train", transform=SMALL)
    assert _labels(emnist)[:3] == [0, 1, 2] and real_class_names("EMNIST")[:3] == ("a", "b", "c")


def test_datasets_torchvision_cannot_download_say_so_fast(tmp_path):
    for name in ("Cars", "FER2013", "LFWPeople"):
        assert not REAL_TASKS[name].downloadable
        t0 = time.perf_counter()
        with pytest.raises(DatasetNotAvailable, match="cannot download") as err:
            load_real_task(name, tmp_path, REAL_TASKS[name].splits[0], download=True)
        assert time.perf_counter() - t0 < 1.0 and str(tmp_path) in str(err.value)


def test_unlabelled_test_splits_are_not_used():
    for name in ("CLEVRCount", "Places365", "Imagenette"):
        assert REAL_TASKS[name].test_split == "val"


def test_transforms_and_target_transforms_pickle_for_dataloader_workers(fakes):
    with accept_fake_checksums():
        for name in ("CLEVRCount", "CelebASmiling", "EMNIST"):
            ds = load_real_task(name, fakes[name][0], REAL_TASKS[name].splits[0])
            clone = pickle.loads(pickle.dumps(ds))
            assert clone[0][1] == ds[0][1] and torch.equal(clone[0][0], ds[0][0])


def test_clean_class_name():
    assert clean_class_name("/a/apartment_building/outdoor") == "apartment building outdoor"
    assert clean_class_name("253.faces-easy-101") == "faces easy"
    assert clean_class_name("apple_pie") == "apple pie"
    assert clean_class_name("707-320") == "707-320"
