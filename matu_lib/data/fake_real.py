"""Tiny fake copies of the `gpu` preset's torchvision datasets, written in each dataset's real on-disk format.

    layout = write_fake("DTD", root)                 # a few 10x10 images, DTD's folders and split files
    with accept_fake_checksums():                    # only for layouts with md5_checked=True
        train, val, test, spec = real_splits("DTD", root=root)

Why: the `gpu` preset's 31 loaders (`matu_lib.data.real`) cannot be exercised on the project's machines, which
have no network and no copy of the datasets. torchvision's own test suite fakes each dataset in its real format
(idx files, `.mat` files, pickled CIFAR batches, HDF5, CSV and split files, class folders); this module does the
same, so the tests and the `--dry-run` parse exactly the files torchvision would read. Images are random noise:
the fakes check parsing, splits and labels, never accuracy.

Some torchvision loaders verify the md5 sum of the real files; a fake cannot match it. For those
(`FakeLayout.md5_checked`), `accept_fake_checksums()` replaces torchvision's `check_integrity` by a file-exists
check while the block runs (what torchvision's own tests do by mocking). Everything else is read unpatched.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import json
import os
import pickle
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

N_CLASSES = 3  # per fake dataset, where the format lets the faker choose
N_TRAIN, N_VAL, N_TEST, N_ALL = 10, 4, 5, 20  # samples per split (N_ALL: datasets without an official split)


@dataclass(frozen=True)
class FakeLayout:
    """What a loader must report for a fake: samples per split (as `load_real_task` names splits), the class
    names `real_class_names` must return (None: fixed by torchvision, only `n_classes` is known) and whether
    torchvision checks md5 sums of these files (then load inside `accept_fake_checksums()`)."""

    sizes: dict[str, int]
    n_classes: int
    classes: tuple[str, ...] | None = None
    md5_checked: bool = False


# ------------------------------------------------------------------------------------------------ helpers


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _pixels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _image(path: Path, rng: np.random.Generator, size: int = 10, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(_pixels(rng, shape), mode=mode).save(path)


def _labels(n: int, k: int = N_CLASSES, start: int = 0) -> list[int]:
    """Every class appears (cyclic), so class lists derived from one split are complete."""
    return [start + i % k for i in range(n)]


def _text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _idx(path: Path, array: np.ndarray) -> None:
    """The MNIST idx format: magic (0, 0, type, ndim), big-endian int32 dims, big-endian data."""
    code = {np.dtype(np.uint8): 8, np.dtype(np.int32): 12}[array.dtype]
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def _savemat(path: Path, values: dict) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), values)


def _folders(base: Path, splits: dict[str, int], classes: tuple[str, ...], rng, ext: str = "jpg") -> None:
    """ImageFolder layout: base/<split>/<class>/<i>.<ext> (the split level omitted when the key is '')."""
    for split, n in splits.items():
        for i, y in enumerate(_labels(n, len(classes))):
            _image(base / split / classes[y] / f"{split or 'img'}_{i:04d}.{ext}", rng)


# ------------------------------------------------------------------------------------------------ fakers
# Each writes the files torchvision reads under `root` and returns the FakeLayout the loader must report.


def _mnist_family(
    folder: str, files: Callable[[str], tuple[str, str]], n_classes: int, label_start: int = 0, qmnist: bool = False
) -> Callable[[Path, int], FakeLayout]:
    def write(root: Path, seed: int) -> FakeLayout:
        rng = _rng(seed)
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            images, labels = files(split)
            _idx(root / folder / "raw" / images, _pixels(rng, (n, 28, 28)))
            y = np.array(_labels(n, N_CLASSES, label_start), dtype=np.uint8)
            if qmnist:  # QMNIST labels: int32 (n, 8), column 0 is the digit
                full = np.zeros((n, 8), dtype=np.int32)
                full[:, 0] = y
                _idx(root / folder / "raw" / labels, full)
            else:
                _idx(root / folder / "raw" / labels, y)
        return FakeLayout({"train": N_TRAIN, "test": N_TEST}, n_classes)

    return write


def _lecun(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _cifar(root: Path, seed: int, hundred: bool) -> FakeLayout:
    rng = _rng(seed)
    base = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    key = "fine_labels" if hundred else "labels"
    batches = [("train", N_TRAIN)] if hundred else [(f"data_batch_{i}", 2) for i in range(1, 6)]
    batches.append(("test" if hundred else "test_batch", N_TEST))
    base.mkdir(parents=True, exist_ok=True)
    for name, n in batches:  # CIFAR's real format is a pickled dict per batch
        with open(base / name, "wb") as f:
            pickle.dump({"data": _pixels(rng, (n, 3072)), key: _labels(n)}, f)
    names = ["apple", "aquarium_fish", "baby"] if hundred else ["airplane", "automobile", "bird"]
    with open(base / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump({"fine_label_names" if hundred else "label_names": names}, f)
    classes = ("apple", "aquarium fish", "baby") if hundred else None
    return FakeLayout({"train": N_TRAIN, "test": N_TEST}, N_CLASSES if hundred else 10, classes, md5_checked=True)


def fake_cars(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    base = root / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    _savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)})
    for split, n, mat in (
        ("train", N_TRAIN, base / "devkit" / "cars_train_annos.mat"),
        ("test", N_TEST, base / "cars_test_annos_withlabels.mat"),
    ):
        records = np.zeros(n, dtype=[("fname", object), ("class", object)])
        for i, y in enumerate(_labels(n)):
            records[i] = (f"{i + 1:05d}.jpg", np.uint8(y + 1))  # classes are 1-based in the .mat files
            _image(base / f"cars_{split}" / f"{i + 1:05d}.jpg", rng)
        _savemat(mat, {"annotations": records})
    return FakeLayout({"train": N_TRAIN, "test": N_TEST}, N_CLASSES, tuple(names))


def fake_dtd(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    data = root / "dtd" / "dtd"
    classes = ("banded", "blotchy", "braided")
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        lines = []
        for i, y in enumerate(_labels(n)):
            name = f"{classes[y]}_{split}_{i:04d}.jpg"
            _image(data / "images" / classes[y] / name, rng)
            lines.append(f"{classes[y]}/{name}")
        _text(data / "labels" / f"{split}1.txt", "\n".join(lines) + "\n")
    return FakeLayout({"train": N_TRAIN, "val": N_VAL, "test": N_TEST}, N_CLASSES, classes)


def fake_eurosat(root: Path, seed: int) -> FakeLayout:
    classes = ("AnnualCrop", "Forest", "HerbaceousVegetation")
    _folders(root / "eurosat" / "2750", {"": N_ALL}, classes, _rng(seed))
    return FakeLayout({"all": N_ALL}, N_CLASSES, classes)


def fake_gtsrb(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    base = root / "gtsrb"
    for i, y in enumerate(_labels(N_TRAIN)):
        _image(base / "GTSRB" / "Training" / f"{y:05d}" / f"00000_{i:05d}.ppm", rng)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, y in enumerate(_labels(N_TEST)):
        _image(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", rng)
        rows.append(f"{i:05d}.ppm;10;10;1;1;9;9;{y}")
    _text(base / "GT-final_test.csv", "\n".join(rows) + "\n")
    return FakeLayout({"train": N_TRAIN, "test": N_TEST}, 43)


def fake_svhn(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        y = np.array([[10 if d == 0 else d] for d in _labels(n, 10)], dtype=np.uint8)  # SVHN labels 0 as 10
        _savemat(root / f"{split}_32x32.mat", {"X": _pixels(rng, (32, 32, 3, n)), "y": y})
    return FakeLayout({"train": N_TRAIN, "test": N_TEST}, 10, md5_checked=True)


def fake_sun397(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    base = root / "SUN397"
    raw = ("/a/abbey", "/b/bakery/shop", "/c/canyon")
    _text(base / "ClassName.txt", "\n".join(raw) + "\n")
    for i, y in enumerate(_labels(N_ALL)):
        _image(base / raw[y].lstrip("/") / f"sun_{i:06d}.jpg", rng)
    return FakeLayout({"all": N_ALL}, N_CLASSES, ("abbey", "bakery shop", "canyon"))


def fake_stl10(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    base = root / "stl10_binary"
    base.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        (base / f"{split}_X.bin").write_bytes(_pixels(rng, (n, 3, 96, 96)).tobytes())
        (base / f"{split}_y.bin").write_bytes(np.array(_labels(n, 10, 1), dtype=np.uint8).tobytes())  # 1-based
    (base / "unlabeled_X.bin").write_bytes(_pixels(rng, (1, 3, 96, 96)).tobytes())
    names = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
    _text(base / "class_names.txt", "\n".join(names) + "\n")
    return FakeLayout({"train": N_TRAIN, "test": N_TEST}, 10, names, md5_checked=True)


def fake_pets(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    base = root / "oxford-iiit-pet"
    breeds = ("Abyssinian", "american_bulldog", "Bengal")
    for split, n in (("trainval", N_TRAIN), ("test", N_TEST)):
        lines = []
        for i, y in enumerate(_labels(n)):
            image_id = f"{breeds[y]}_{split}{i}"
            _image(base / "images" / f"{image_id}.jpg", rng)
            lines.append(f"{image_id} {y + 1} {1 if breeds[y][0].isupper() else 2} 1")  # id, class, species, breed
        _text(base / "annotations" / f"{split}.txt", "\n".join(lines) + "\n")
    (base / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    return FakeLayout({"train": N_TRAIN, "test": N_TEST}, N_CLASSES, ("Abyssinian", "American Bulldog", "Bengal"))


def fake_flowers(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    base = root / "flowers-102"
    n = N_TRAIN + N_VAL + N_TEST
    for i in range(1, n + 1):
        _image(base / "jpg" / f"image_{i:05d}.jpg", rng)
    _savemat(base / "imagelabels.mat", {"labels": np.array(_labels(n, N_CLASSES, 1), dtype=np.uint8)})
    ids = np.arange(1, n + 1)
    _savemat(
        base / "setid.mat",
        {"trnid": ids[:N_TRAIN], "valid": ids[N_TRAIN : N_TRAIN + N_VAL], "tstid": ids[N_TRAIN + N_VAL :]},
    )
    return FakeLayout({"train": N_TRAIN, "val": N_VAL, "test": N_TEST}, 102, md5_checked=True)


def fake_pcam(root: Path, seed: int) -> FakeLayout:
    import h5py

    rng = _rng(seed)
    base = root / "pcam"
    base.mkdir(parents=True, exist_ok=True)
    for _split, tag, n in (("train", "train", N_TRAIN), ("val", "valid", N_VAL), ("test", "test", N_TEST)):
        with h5py.File(base / f"camelyonpatch_level_2_split_{tag}_x.h5", "w") as f:
            f.create_dataset("x", data=_pixels(rng, (n, 96, 96, 3)))
        with h5py.File(base / f"camelyonpatch_level_2_split_{tag}_y.h5", "w") as f:
            f.create_dataset("y", data=np.array(_labels(n, 2), dtype=np.uint8).reshape(n, 1, 1, 1))
    return FakeLayout({"train": N_TRAIN, "val": N_VAL, "test": N_TEST}, 2)


def fake_fer2013(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    rows = [("emotion", "pixels", "Usage")]
    for usage, n in (("Training", N_TRAIN), ("PublicTest", 2), ("PrivateTest", N_TEST - 2)):
        for y in _labels(n, 7):
            rows.append((str(y), " ".join(map(str, _pixels(rng, (48 * 48,)))), usage))
    (root / "fer2013").mkdir(parents=True, exist_ok=True)
    with open(root / "fer2013" / "fer2013.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return FakeLayout({"train": N_TRAIN, "test": N_TEST}, 7, md5_checked=True)


def fake_food101(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    base = root / "food-101"
    classes = ("apple_pie", "baby_back_ribs", "baklava")
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        meta: dict[str, list[str]] = {c: [] for c in classes}
        for i, y in enumerate(_labels(n)):
            rel = f"{classes[y]}/{split}{i}"
            _image(base / "images" / f"{rel}.jpg", rng)
            meta[classes[y]].append(rel)
        _text(base / "meta" / f"{split}.json", json.dumps(meta))
    return FakeLayout({"train": N_TRAIN, "test": N_TEST}, N_CLASSES, ("apple pie", "baby back ribs", "baklava"))


def fake_sst2(root: Path, seed: int) -> FakeLayout:
    _folders(
        root / "rendered-sst2",
        {"train": N_TRAIN, "valid": N_VAL, "test": N_TEST},
        ("negative", "positive"),
        _rng(seed),
        ext="png",
    )
    return FakeLayout({"train": N_TRAIN, "val": N_VAL, "test": N_TEST}, 2)


def fake_caltech101(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    base = root / "caltech101" / "101_ObjectCategories"
    classes = ("Faces_easy", "accordion", "airplanes")  # sorted as os.listdir + sorted() orders them
    _image(base / "BACKGROUND_Google" / "image_0001.jpg", rng)  # not a class: torchvision drops it
    counts = [0] * len(classes)
    for y in _labels(N_ALL):
        counts[y] += 1
        _image(base / classes[y] / f"image_{counts[y]:04d}.jpg", rng)
    return FakeLayout({"all": N_ALL}, N_CLASSES, ("Faces easy", "accordion", "airplanes"))


def fake_caltech256(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    base = root / "caltech256" / "256_ObjectCategories"
    folders = ("001.ak47", "002.american-flag", "003.faces-easy-101")
    counts = [0] * len(folders)
    for y in _labels(N_ALL):
        counts[y] += 1
        _image(base / folders[y] / f"{y + 1:03d}_{counts[y]:04d}.jpg", rng)
    return FakeLayout({"all": N_ALL}, N_CLASSES, ("ak47", "american flag", "faces easy"))


def fake_country211(root: Path, seed: int) -> FakeLayout:
    classes = ("AD", "AE", "AF")
    _folders(root / "country211", {"train": N_TRAIN, "valid": N_VAL, "test": N_TEST}, classes, _rng(seed))
    return FakeLayout({"train": N_TRAIN, "val": N_VAL, "test": N_TEST}, N_CLASSES, classes)


def fake_aircraft(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    data = root / "fgvc-aircraft-2013b" / "data"
    classes = ("707-320", "727-200", "A300B4")
    _text(data / "variants.txt", "\n".join(classes) + "\n")
    image_id = 1000000
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        lines = []
        for y in _labels(n):
            image_id += 1
            _image(data / "images" / f"{image_id}.jpg", rng)
            lines.append(f"{image_id} {classes[y]}")
        _text(data / f"images_variant_{split}.txt", "\n".join(lines) + "\n")
    return FakeLayout({"train": N_TRAIN, "val": N_VAL, "test": N_TEST}, N_CLASSES, classes)


def fake_usps(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("usps.bz2", N_TRAIN), ("usps.t.bz2", N_TEST)):
        lines = []
        for y in _labels(n, 10):  # libsvm text: "<digit + 1> 1:v 2:v ... 256:v", v in [-1, 1]
            values = rng.uniform(-1, 1, 256)
            lines.append(f"{y + 1} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(values)))
        with bz2.open(root / name, "wt") as f:
            f.write("\n".join(lines) + "\n")
    return FakeLayout({"train": N_TRAIN, "test": N_TEST}, 10)


def fake_clevr(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    data = root / "clevr" / "CLEVR_v1.0"
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", 2)):
        scenes = []
        for i in range(n):
            name = f"CLEVR_{split}_{i:06d}.png"
            _image(data / "images" / split / name, rng)
            scenes.append({"image_filename": name, "objects": [{"shape": "cube"}] * (3 + i % 8)})  # 3..10 objects
        if split != "test":  # the official test split has no scene files, hence no labels
            _text(data / "scenes" / f"CLEVR_{split}_scenes.json", json.dumps({"scenes": scenes}))
    return FakeLayout({"train": N_TRAIN, "val": N_VAL}, 8)


def fake_places365(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    raw = ("/a/airfield", "/b/bakery/shop", "/c/canyon")
    _text(root / "categories_places365.txt", "".join(f"{c} {i}\n" for i, c in enumerate(raw)))
    train = []
    for i, y in enumerate(_labels(N_TRAIN)):
        rel = f"{raw[y]}/{i + 1:08d}.jpg"
        _image(root / "data_256_standard" / rel.lstrip("/"), rng)
        train.append(f"{rel} {y}")
    _text(root / "places365_train_standard.txt", "\n".join(train) + "\n")
    val = []
    for i, y in enumerate(_labels(N_VAL)):
        name = f"Places365_val_{i + 1:08d}.jpg"
        _image(root / "val_256" / name, rng)
        val.append(f"{name} {y}")
    _text(root / "places365_val.txt", "\n".join(val) + "\n")
    return FakeLayout(
        {"train": N_TRAIN, "val": N_VAL}, N_CLASSES, ("airfield", "bakery shop", "canyon"), md5_checked=True
    )


def fake_imagenette(root: Path, seed: int) -> FakeLayout:
    wnids = ("n01440764", "n02102040", "n02979186")
    _folders(root / "imagenette2-160", {"train": N_TRAIN, "val": N_VAL}, wnids, _rng(seed), ext="JPEG")
    return FakeLayout({"train": N_TRAIN, "val": N_VAL}, N_CLASSES, ("tench", "English springer", "cassette player"))


def fake_semeion(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    lines = []
    for y in _labels(N_ALL, 10):  # 256 binary pixels as floats, then the digit one-hot
        pixels = " ".join(f"{v:.4f}" for v in rng.integers(0, 2, 256))
        lines.append(pixels + " " + " ".join("1" if d == y else "0" for d in range(10)))
    _text(root / "semeion.data", "\n".join(lines) + "\n")
    return FakeLayout({"all": N_ALL}, 10, md5_checked=True)


CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male "
    "Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()


def fake_celeba(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    base = root / "celeba"
    parts = [0] * N_TRAIN + [1] * N_VAL + [2] * N_TEST
    names = [f"{i + 1:06d}.jpg" for i in range(len(parts))]
    for name in names:
        _image(base / "img_align_celeba" / name, rng)
    smiling = _labels(len(parts), 2)
    attrs = []
    for name, smile in zip(names, smiling):
        values = rng.choice([-1, 1], len(CELEBA_ATTRIBUTES))
        values[CELEBA_ATTRIBUTES.index("Smiling")] = 1 if smile else -1
        attrs.append(f"{name} " + " ".join(f"{v:2d}" for v in values))
    n = len(names)
    _text(base / "list_attr_celeba.txt", f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n" + "\n".join(attrs) + "\n")
    _text(base / "list_eval_partition.txt", "".join(f"{a} {p}\n" for a, p in zip(names, parts)))
    _text(base / "identity_CelebA.txt", "".join(f"{a} {i % 4 + 1}\n" for i, a in enumerate(names)))
    _text(
        base / "list_bbox_celeba.txt",
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{a} 95 71 226 313\n" for a in names),
    )
    marks = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    _text(
        base / "list_landmarks_align_celeba.txt",
        f"{n}\n{marks}\n" + "".join(f"{a} 69 109 106 113 77 142 73 152 108 154\n" for a in names),
    )
    return FakeLayout({"train": N_TRAIN, "val": N_VAL, "test": N_TEST}, 2, md5_checked=True)


def fake_lfw_people(root: Path, seed: int) -> FakeLayout:
    rng = _rng(seed)
    base = root / "lfw-py"
    people = (("Aaron_Eckhart", 6), ("Abdullah_Gul", 7), ("Ann_Veneman", 7))
    for person, count in people:
        for k in range(1, count + 1):
            _image(base / "lfw_funneled" / person / f"{person}_{k:04d}.jpg", rng)
    # people.txt (10-fold view): number of folds, then per fold its line count and "name<TAB>images" lines
    _text(base / "people.txt", f"{len(people)}\n" + "".join(f"1\n{p}\t{c}\n" for p, c in people))
    _text(base / "lfw-names.txt", "".join(f"{p}\t{c}\n" for p, c in people))
    with tarfile.open(base / "lfw-funneled.tgz", "w:gz") as tar:  # torchvision only checks that it is there
        tar.add(base / "lfw_funneled", arcname="lfw_funneled")
    return FakeLayout(
        {"all": sum(c for _, c in people)},
        len(people),
        ("Aaron Eckhart", "Abdullah Gul", "Ann Veneman"),
        md5_checked=True,
    )


FAKERS: dict[str, Callable[[Path, int], FakeLayout]] = {
    "Cars": fake_cars,
    "DTD": fake_dtd,
    "EuroSAT": fake_eurosat,
    "GTSRB": fake_gtsrb,
    "MNIST": _mnist_family("MNIST", _lecun, 10),
    "SVHN": fake_svhn,
    "SUN397": fake_sun397,
    "STL10": fake_stl10,
    "OxfordIIITPet": fake_pets,
    "Flowers102": fake_flowers,
    "CIFAR100": lambda root, seed: _cifar(root, seed, hundred=True),
    "PCAM": fake_pcam,
    "FER2013": fake_fer2013,
    "CIFAR10": lambda root, seed: _cifar(root, seed, hundred=False),
    "Food101": fake_food101,
    "FashionMNIST": _mnist_family("FashionMNIST", _lecun, 10),
    "RenderedSST2": fake_sst2,
    "EMNIST": _mnist_family(
        "EMNIST",
        lambda s: (f"emnist-letters-{s}-images-idx3-ubyte", f"emnist-letters-{s}-labels-idx1-ubyte"),
        26,
        label_start=1,
    ),
    "KMNIST": _mnist_family("KMNIST", _lecun, 10),
    "Caltech101": fake_caltech101,
    "Caltech256": fake_caltech256,
    "Country211": fake_country211,
    "FGVCAircraft": fake_aircraft,
    "USPS": fake_usps,
    "QMNIST": _mnist_family(
        "QMNIST", lambda s: (f"qmnist-{s}-images-idx3-ubyte", f"qmnist-{s}-labels-idx2-int"), 10, qmnist=True
    ),
    "CLEVRCount": fake_clevr,
    "Places365": fake_places365,
    "Imagenette": fake_imagenette,
    "SEMEION": fake_semeion,
    "CelebASmiling": fake_celeba,
    "LFWPeople": fake_lfw_people,
}


def write_fake(name: str, root: str | Path, seed: int = 0) -> FakeLayout:
    """Write a tiny fake of real dataset `name` under `root` (its real format) and return what it holds."""
    if name not in FAKERS:
        raise KeyError(f"no fake for {name!r}; fakes exist for: {', '.join(FAKERS)}")
    return FAKERS[name](Path(root), seed)


_MD5_MODULES = ("cifar", "stl10", "svhn", "semeion", "flowers102", "places365", "celeba", "lfw", "fer2013")


def _file_exists(fpath, md5=None) -> bool:
    return os.path.isfile(fpath)


@contextlib.contextmanager
def accept_fake_checksums() -> Iterator[None]:
    """While the block runs, torchvision's md5 checks only ask that the file exists (fakes cannot match the real
    sums). Restores the originals on exit; never use it around real data."""
    import importlib
    from unittest import mock

    with contextlib.ExitStack() as stack:
        for module in _MD5_MODULES:
            stack.enter_context(
                mock.patch.object(
                    importlib.import_module(f"torchvision.datasets.{module}"), "check_integrity", _file_exists
                )
            )
        yield
