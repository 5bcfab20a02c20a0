"""The real 224 px benchmark datasets (GPU users only; nothing here downloads unless asked).

The paper evaluates on 30 datasets; its list is not available, so this is the project's choice: the 20-task
CLIP benchmark of the task-vector literature plus 10 more that torchvision can load. RESISC45 is NOT in
torchvision; it is listed in `NOT_IN_TORCHVISION` and the offline `land_cover` task (and EuroSAT) stands in
for it. Offline, `load_real_task(..., download=False)` fails in milliseconds with `DatasetNotAvailable`, which
names the dataset and the folder it looked in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DIGITS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
NOT_IN_TORCHVISION = {"RESISC45": "not in torchvision; use EuroSAT or the offline `land_cover` task instead"}


class DatasetNotAvailable(FileNotFoundError):
    """A real dataset's files are missing and download=False."""


@dataclass(frozen=True)
class RealTaskInfo:
    """How to build one torchvision dataset. `expect` is the path (relative to root, `{split}` filled in)
    whose absence means the data is not there; checked before torchvision is called so offline failure is fast.
    `classes=None` means: read them from the dataset object (`.classes`/`.categories`) at load time."""

    constructor: Callable  # (root, split, transform, download) -> torchvision Dataset
    expect: str
    classes: tuple[str, ...] | None
    templates: tuple[str, ...]
    splits: tuple[str, ...] = ("train", "test")


def _tv(name: str):
    import torchvision.datasets as D

    return getattr(D, name)


def _train_flag(cls: str, **kw) -> Callable:
    return lambda root, split, transform, download: _tv(cls)(root, train=(split == "train"), transform=transform,
                                                             download=download, **kw)


def _split_arg(cls: str, rename: dict[str, str] | None = None, **kw) -> Callable:
    rename = rename or {}
    return lambda root, split, transform, download: _tv(cls)(root, split=rename.get(split, split), transform=transform,
                                                             download=download, **kw)


def _no_split(cls: str, **kw) -> Callable:
    """Datasets shipped without an official split; callers split indices themselves (seeded)."""
    return lambda root, split, transform, download: _tv(cls)(root, transform=transform, download=download, **kw)


_PHOTO = ("a photo of a {}.",)
TV = ("train", "val", "test")
REAL_TASKS: dict[str, RealTaskInfo] = {
    # --- the 20-task CLIP / task-arithmetic benchmark (RESISC45 replaced, see NOT_IN_TORCHVISION)
    "Cars": RealTaskInfo(_split_arg("StanfordCars"), "stanford_cars", None, ("a photo of a {}, a type of car.",)),
    "DTD": RealTaskInfo(_split_arg("DTD"), "dtd/dtd", None, ("a photo of a {} texture.", "a {} pattern."), TV),
    "EuroSAT": RealTaskInfo(_no_split("EuroSAT"), "eurosat/2750", None, ("a centered satellite photo of {}.",), ("all",)),
    "GTSRB": RealTaskInfo(_split_arg("GTSRB"), "gtsrb", None, ('a zoomed in photo of a "{}" traffic sign.',)),
    "MNIST": RealTaskInfo(_train_flag("MNIST"), "MNIST/raw", DIGITS, ('a photo of the number: "{}".',)),
    "SVHN": RealTaskInfo(_split_arg("SVHN"), "{split}_32x32.mat", DIGITS, ('a photo of the number: "{}".',)),
    "SUN397": RealTaskInfo(_no_split("SUN397"), "SUN397", None, ("a photo of a {}.",), ("all",)),
    "STL10": RealTaskInfo(_split_arg("STL10"), "stl10_binary", None, _PHOTO),
    "OxfordIIITPet": RealTaskInfo(_split_arg("OxfordIIITPet", {"train": "trainval"}), "oxford-iiit-pet", None,
                                  ("a photo of a {}, a type of pet.",)),
    "Flowers102": RealTaskInfo(_split_arg("Flowers102"), "flowers-102", None, ("a photo of a {}, a type of flower.",), TV),
    "CIFAR100": RealTaskInfo(_train_flag("CIFAR100"), "cifar-100-python", None, _PHOTO),
    "PCAM": RealTaskInfo(_split_arg("PCAM"), "pcam", ("lymph node", "lymph node containing metastatic tumor tissue"),
                         ("this is a photo of {}",), TV),
    "FER2013": RealTaskInfo(_split_arg("FER2013"), "fer2013",
                            ("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised"),
                            ("a photo of a {} looking face.",)),
    "CIFAR10": RealTaskInfo(_train_flag("CIFAR10"), "cifar-10-batches-py", CIFAR10, _PHOTO),
    "Food101": RealTaskInfo(_split_arg("Food101"), "food-101", None, ("a photo of {}, a type of food.",)),
    "FashionMNIST": RealTaskInfo(_train_flag("FashionMNIST"), "FashionMNIST/raw", FASHION, ("a photo of a {}.",)),
    "RenderedSST2": RealTaskInfo(_split_arg("RenderedSST2"), "rendered-sst2", ("negative", "positive"),
                                 ("a {} review of a movie.",), TV),
    "EMNIST": RealTaskInfo(_train_flag("EMNIST", split="letters"), "EMNIST/raw", None, ('a photo of the letter "{}".',)),
    "KMNIST": RealTaskInfo(_train_flag("KMNIST"), "KMNIST/raw",
                           ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), ("a photo of the character {}.",)),
    # --- 10 more that torchvision loads
    "Caltech101": RealTaskInfo(_no_split("Caltech101"), "caltech101/101_ObjectCategories", None, _PHOTO, ("all",)),
    "Caltech256": RealTaskInfo(_no_split("Caltech256"), "caltech256/256_ObjectCategories", None, _PHOTO, ("all",)),
    "Country211": RealTaskInfo(_split_arg("Country211", {"val": "valid"}), "country211", None,
                               ("a photo i took in {}.",), TV),
    "FGVCAircraft": RealTaskInfo(_split_arg("FGVCAircraft"), "fgvc-aircraft-2013b", None,
                                 ("a photo of a {}, a type of aircraft.",), TV),
    "USPS": RealTaskInfo(_train_flag("USPS"), "usps.bz2", DIGITS, ('a photo of the number: "{}".',)),
    "QMNIST": RealTaskInfo(_train_flag("QMNIST"), "QMNIST/raw", DIGITS, ('a photo of the number: "{}".',)),
    "CLEVRCount": RealTaskInfo(_split_arg("CLEVRClassification"), "clevr", tuple(str(i) for i in range(3, 11)),
                               ("a photo of {} objects.",), TV),
    "Places365": RealTaskInfo(_split_arg("Places365", {"train": "train-standard"}, small=True), "categories_places365.txt",
                              None, ("a photo of the {}.",), ("train", "val")),
    "Imagenette": RealTaskInfo(_split_arg("Imagenette", size="160px"), "imagenette2-160", None, _PHOTO, ("train", "val")),
    "SEMEION": RealTaskInfo(_no_split("SEMEION"), "semeion.data", DIGITS, ('a photo of the number: "{}".',), ("all",)),
    "CelebASmiling": RealTaskInfo(_split_arg("CelebA", {"val": "valid"}, target_type="attr"), "celeba",
                                  ("not smiling", "smiling"), ("a photo of a {} person.",), TV),
    "LFWPeople": RealTaskInfo(_split_arg("LFWPeople"), "lfw-py", None, ("a photo of {}.",)),
}


def default_transform(size: int = 224):
    """Resize + centre-crop to `size`, grey -> RGB, to a float tensor: CLIP's preprocessing minus the
    normalisation, which belongs to the model."""
    from torchvision import transforms as T

    return T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.Resize(size), T.CenterCrop(size), T.ToTensor()])


def load_real_task(name: str, root: str | Path, split: str = "train", download: bool = False, transform=None):
    """A torchvision Dataset for one of REAL_TASKS. Raises DatasetNotAvailable (fast, before torchvision runs)
    when its files are not under `root` and download is False."""
    if name in NOT_IN_TORCHVISION:
        raise KeyError(f"{name}: {NOT_IN_TORCHVISION[name]}")
    if name not in REAL_TASKS:
        raise KeyError(f"unknown real task {name!r}; valid: {', '.join(REAL_TASKS)}")
    info = REAL_TASKS[name]
    if split not in info.splits:
        raise ValueError(f"{name} has splits {info.splits}, not {split!r}")
    root = Path(root)
    expected = root / info.expect.format(split=split)
    hint = (f"{name} is not available: expected its files at {expected} (looked in {root}). "
            f"Pass download=True (needs network access) or place the dataset files there.")
    if not download and not expected.exists():
        raise DatasetNotAvailable(hint)
    try:
        return info.constructor(str(root), split, transform or default_transform(), download)
    except (RuntimeError, FileNotFoundError) as e:  # torchvision's "Dataset not found or corrupted"
        if download:
            raise
        raise DatasetNotAvailable(f"{hint} torchvision said: {e}") from e


def real_class_names(name: str, dataset=None) -> tuple[str, ...]:
    """Class names for zero-shot prompts: the static list when there is one, else read from the dataset object."""
    info = REAL_TASKS[name]
    if info.classes is not None:
        return info.classes
    if dataset is None:
        raise ValueError(f"{name}'s class names come from the dataset object; pass the loaded dataset")
    for attr in ("classes", "categories"):
        names = getattr(dataset, attr, None)
        if names:
            return tuple(n if isinstance(n, str) else n[0] for n in names)
    raise ValueError(f"{name}: the dataset object exposes no .classes or .categories")


@dataclass(frozen=True)
class RealSpec:
    """The part of TaskSpec that the runner needs for a real dataset (class names and prompt templates)."""

    name: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]


def default_real_root() -> Path:
    import os

    from .suite import default_data_dir

    return Path(os.environ.get("MATU_REAL_DATA_DIR", default_data_dir().parent / "real"))


def real_splits(name: str, seed: int = 0, root: str | Path | None = None, download: bool = False,
                val_fraction: float = 0.1):
    """(train, val, test, spec) for a real task; validation is carved from train with a seeded permutation.

    Datasets with a single split ("all", e.g. EuroSAT) are split 70/10/20 with the same permutation, so
    coefficients are always chosen on data disjoint from the test split.
    """
    import torch
    from torch.utils.data import Subset

    root = Path(root) if root is not None else default_real_root()
    info = REAL_TASKS[name] if name in REAL_TASKS else None
    if info is None:
        load_real_task(name, root)  # raises the informative KeyError
    gen = torch.Generator().manual_seed(seed)
    if "train" in info.splits:
        train = load_real_task(name, root, "train", download)
        test = load_real_task(name, root, "test", download)
        order = torch.randperm(len(train), generator=gen).tolist()
        n_val = max(1, int(val_fraction * len(train)))
        val, train_part = Subset(train, order[:n_val]), Subset(train, order[n_val:])
        source = train
    else:
        source = load_real_task(name, root, info.splits[0], download)
        order = torch.randperm(len(source), generator=gen).tolist()
        a, b = int(0.7 * len(order)), int(0.8 * len(order))
        train_part, val, test = Subset(source, order[:a]), Subset(source, order[a:b]), Subset(source, order[b:])
    spec = RealSpec(name, real_class_names(name, source), info.templates)
    return train_part, val, test, spec
