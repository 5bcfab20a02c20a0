"""The real 224 px benchmark datasets (GPU users only; nothing here downloads unless asked).

The paper evaluates on 30 datasets; its list is not available, so this is the project's choice: the 20-task
CLIP benchmark of the task-vector literature plus 10 more that torchvision can load. RESISC45 is NOT in
torchvision; it is listed in `NOT_IN_TORCHVISION` and the offline `land_cover` task (and EuroSAT) stands in
for it. Offline, `load_real_task(..., download=False)` fails in milliseconds with `DatasetNotAvailable`, which
names the dataset and the folder it looked in.

Every loader here is tested offline on tiny fakes written in the dataset's real on-disk format
(`matu_lib.data.fake_real`, `tests/test_real_data.py`). Those tests found and this module fixes: datasets
torchvision cannot download (StanfordCars, FER2013, LFWPeople: a clear message instead of a crash under the
gpu preset's download=True), splits without labels (CLEVR's and Places365's test splits, Imagenette has none:
their validation split is the test split), targets that are not class indices (CelebA's 40 attributes,
CLEVR's object count 3..10, EMNIST letters 1..26), identity splits with disjoint classes (LFW DevTrain/DevTest)
and datasets that expose no class names (GTSRB, LFWPeople).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DIGITS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
# GTSRB ships class ids only; these are the names the CLIP / task-vector literature prompts with (ids 0..42).
GTSRB_CLASSES = (
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)
NOT_IN_TORCHVISION = {"RESISC45": "not in torchvision; use EuroSAT or the offline `land_cover` task instead"}


class DatasetNotAvailable(FileNotFoundError):
    """A real dataset's files are missing and download=False (or the dataset cannot be downloaded at all)."""


Constructor = Callable  # (root, split, transform, target_transform, download) -> torchvision Dataset


@dataclass(frozen=True)
class RealTaskInfo:
    """How to build one torchvision dataset. `expect` is the path (relative to root, `{split}` filled in)
    whose absence means the data is not there; checked before torchvision is called so offline failure is fast.
    `classes=None` means: read them from the dataset object (`.classes`/`.categories`/`.class_to_idx`) at load
    time. `test_split` is the split evaluated as "test" (a labelled one: CLEVR's and Places365's test splits
    have no labels). `downloadable=False`: torchvision cannot fetch it; the files must be placed by hand."""

    constructor: Constructor
    expect: str
    classes: tuple[str, ...] | None
    templates: tuple[str, ...]
    splits: tuple[str, ...] = ("train", "test")
    test_split: str = "test"
    downloadable: bool = True


class Shift:
    """Target transform: label - offset (CLEVR counts 3..10 -> 0..7, EMNIST letters 1..26 -> 0..25).
    A class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, label: int) -> int:
        return int(label) - self.offset


class PickAttribute:
    """Target transform: one binary attribute out of CelebA's 40 (a picklable class, see `Shift`)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, attributes) -> int:
        return int(attributes[self.index])


def _tv(name: str):
    import torchvision.datasets as D

    return getattr(D, name)


def _train_flag(cls: str, **kw) -> Constructor:
    return lambda root, split, transform, target_transform, download: _tv(cls)(
        root, train=(split == "train"), transform=transform, target_transform=target_transform, download=download, **kw
    )


def _split_arg(cls: str, rename: dict[str, str] | None = None, **kw) -> Constructor:
    rename = rename or {}
    return lambda root, split, transform, target_transform, download: _tv(cls)(
        root,
        split=rename.get(split, split),
        transform=transform,
        target_transform=target_transform,
        download=download,
        **kw,
    )


def _no_split(cls: str, **kw) -> Constructor:
    """Datasets shipped without an official split; callers split indices themselves (seeded)."""
    return lambda root, split, transform, target_transform, download: _tv(cls)(
        root, transform=transform, target_transform=target_transform, download=download, **kw
    )


def _fer2013(root, split, transform, target_transform, download):
    # torchvision's FER2013 takes no `download` (Kaggle only); its test labels exist only in fer2013.csv
    return _tv("FER2013")(root, split=split, transform=transform, target_transform=target_transform)


def _celeba_smiling(root, split, transform, target_transform, download):
    ds = _tv("CelebA")(
        root, split={"val": "valid"}.get(split, split), target_type="attr", transform=transform, download=download
    )
    if "Smiling" not in ds.attr_names:
        raise RuntimeError(f"list_attr_celeba.txt has no 'Smiling' column (columns: {ds.attr_names[:5]}...)")
    ds.target_transform = PickAttribute(ds.attr_names.index("Smiling"))
    return ds


_PHOTO = ("a photo of a {}.",)
TV = ("train", "val", "test")
REAL_TASKS: dict[str, RealTaskInfo] = {
    # --- the 20-task CLIP / task-arithmetic benchmark (RESISC45 replaced, see NOT_IN_TORCHVISION)
    "Cars": RealTaskInfo(
        _split_arg("StanfordCars"), "stanford_cars", None, ("a photo of a {}, a type of car.",), downloadable=False
    ),
    "DTD": RealTaskInfo(_split_arg("DTD"), "dtd/dtd", None, ("a photo of a {} texture.", "a {} pattern."), TV),
    "EuroSAT": RealTaskInfo(
        _no_split("EuroSAT"), "eurosat/2750", None, ("a centered satellite photo of {}.",), ("all",)
    ),
    "GTSRB": RealTaskInfo(_split_arg("GTSRB"), "gtsrb", GTSRB_CLASSES, ('a zoomed in photo of a "{}" traffic sign.',)),
    "MNIST": RealTaskInfo(_train_flag("MNIST"), "MNIST/raw", DIGITS, ('a photo of the number: "{}".',)),
    "SVHN": RealTaskInfo(_split_arg("SVHN"), "{split}_32x32.mat", DIGITS, ('a photo of the number: "{}".',)),
    "SUN397": RealTaskInfo(_no_split("SUN397"), "SUN397", None, ("a photo of a {}.",), ("all",)),
    "STL10": RealTaskInfo(_split_arg("STL10"), "stl10_binary", None, _PHOTO),
    "OxfordIIITPet": RealTaskInfo(
        _split_arg("OxfordIIITPet", {"train": "trainval"}),
        "oxford-iiit-pet",
        None,
        ("a photo of a {}, a type of pet.",),
    ),
    "Flowers102": RealTaskInfo(
        _split_arg("Flowers102"), "flowers-102", None, ("a photo of a {}, a type of flower.",), TV
    ),
    "CIFAR100": RealTaskInfo(_train_flag("CIFAR100"), "cifar-100-python", None, _PHOTO),
    "PCAM": RealTaskInfo(
        _split_arg("PCAM"),
        "pcam",
        ("lymph node", "lymph node containing metastatic tumor tissue"),
        ("this is a photo of {}",),
        TV,
    ),
    "FER2013": RealTaskInfo(
        _fer2013,
        "fer2013",
        ("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised"),
        ("a photo of a {} looking face.",),
        downloadable=False,
    ),
    "CIFAR10": RealTaskInfo(_train_flag("CIFAR10"), "cifar-10-batches-py", CIFAR10, _PHOTO),
    "Food101": RealTaskInfo(_split_arg("Food101"), "food-101", None, ("a photo of {}, a type of food.",)),
    "FashionMNIST": RealTaskInfo(_train_flag("FashionMNIST"), "FashionMNIST/raw", FASHION, ("a photo of a {}.",)),
    "RenderedSST2": RealTaskInfo(
        _split_arg("RenderedSST2"), "rendered-sst2", ("negative", "positive"), ("a {} review of a movie.",), TV
    ),
    "EMNIST": RealTaskInfo(
        _train_flag("EMNIST", split="letters"), "EMNIST/raw", LETTERS, ('a photo of the letter "{}".',)
    ),
    "KMNIST": RealTaskInfo(
        _train_flag("KMNIST"),
        "KMNIST/raw",
        ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        ("a photo of the character {}.",),
    ),
    # --- 10 more that torchvision loads
    "Caltech101": RealTaskInfo(_no_split("Caltech101"), "caltech101/101_ObjectCategories", None, _PHOTO, ("all",)),
    "Caltech256": RealTaskInfo(_no_split("Caltech256"), "caltech256/256_ObjectCategories", None, _PHOTO, ("all",)),
    "Country211": RealTaskInfo(
        _split_arg("Country211", {"val": "valid"}), "country211", None, ("a photo i took in {}.",), TV
    ),
    "FGVCAircraft": RealTaskInfo(
        _split_arg("FGVCAircraft"), "fgvc-aircraft-2013b", None, ("a photo of a {}, a type of aircraft.",), TV
    ),
    "USPS": RealTaskInfo(_train_flag("USPS"), "usps.bz2", DIGITS, ('a photo of the number: "{}".',)),
    "QMNIST": RealTaskInfo(_train_flag("QMNIST"), "QMNIST/raw", DIGITS, ('a photo of the number: "{}".',)),
    "CLEVRCount": RealTaskInfo(
        _split_arg("CLEVRClassification"),
        "clevr",
        tuple(str(i) for i in range(3, 11)),
        ("a photo of {} objects.",),
        ("train", "val"),
        test_split="val",
    ),
    "Places365": RealTaskInfo(
        _split_arg("Places365", {"train": "train-standard"}, small=True),
        "categories_places365.txt",
        None,
        ("a photo of the {}.",),
        ("train", "val"),
        test_split="val",
    ),
    "Imagenette": RealTaskInfo(
        _split_arg("Imagenette", size="160px"), "imagenette2-160", None, _PHOTO, ("train", "val"), test_split="val"
    ),
    "SEMEION": RealTaskInfo(_no_split("SEMEION"), "semeion.data", DIGITS, ('a photo of the number: "{}".',), ("all",)),
    "CelebASmiling": RealTaskInfo(
        _celeba_smiling, "celeba", ("not smiling", "smiling"), ("a photo of a {} person.",), TV
    ),
    # DevTrain/DevTest hold disjoint identities, so the classification task uses all people (10 folds) split by us
    "LFWPeople": RealTaskInfo(
        _split_arg("LFWPeople", {"all": "10fold"}), "lfw-py", None, ("a photo of {}.",), ("all",), downloadable=False
    ),
}
# Targets that are not 0-based class indices as torchvision returns them.
TARGET_TRANSFORMS: dict[str, Callable] = {"CLEVRCount": Shift(3), "EMNIST": Shift(1)}


def default_transform(size: int = 224):
    """Resize + centre-crop to `size`, grey -> RGB, to a float tensor: CLIP's preprocessing minus the
    normalisation, which belongs to the model."""
    from torchvision import transforms as T

    return T.Compose([T.Lambda(_to_rgb), T.Resize(size), T.CenterCrop(size), T.ToTensor()])


def _to_rgb(image):
    """Module-level (not a lambda) so DataLoader workers can pickle the transform."""
    return image.convert("RGB")


def load_real_task(name: str, root: str | Path, split: str = "train", download: bool = False, transform=None):
    """A torchvision Dataset for one of REAL_TASKS. Raises DatasetNotAvailable (fast, before torchvision runs)
    when its files are not under `root` and download is False (or the dataset cannot be downloaded)."""
    if name in NOT_IN_TORCHVISION:
        raise KeyError(f"{name}: {NOT_IN_TORCHVISION[name]}")
    if name not in REAL_TASKS:
        raise KeyError(f"unknown real task {name!r}; valid: {', '.join(REAL_TASKS)}")
    info = REAL_TASKS[name]
    if split not in info.splits and split != info.test_split:
        raise ValueError(f"{name} has splits {info.splits}, not {split!r}")
    root = Path(root)
    expected = root / info.expect.format(split=split)
    download = download and info.downloadable
    if info.downloadable:
        hint = (
            f"{name} is not available: expected its files at {expected} (looked in {root}). "
            f"Pass download=True (needs network access) or place the dataset files there."
        )
    else:
        hint = (
            f"{name} is not available: expected its files at {expected} (looked in {root}). torchvision cannot "
            f"download {name}; obtain it from its authors and place the files there."
        )
    if not download and not expected.exists():
        raise DatasetNotAvailable(hint)
    try:
        return info.constructor(
            str(root), split, transform or default_transform(), TARGET_TRANSFORMS.get(name), download
        )
    except (RuntimeError, FileNotFoundError) as e:  # torchvision's "Dataset not found or corrupted"
        if download:
            raise
        raise DatasetNotAvailable(f"{hint} torchvision said: {e}") from e


def clean_class_name(raw: str) -> str:
    """A folder or file class name as prompt text: '/a/apartment_building/outdoor' (Places365) ->
    'apartment building outdoor', '253.faces-easy-101' (Caltech256) -> 'faces easy', 'apple_pie' -> 'apple pie'."""
    name = re.sub(r"^/[a-z]/", "", raw)
    if re.match(r"^\d{3}\.", name):
        name = name[4:].removesuffix("-101").replace("-", " ")
    return re.sub(r"\s+", " ", name.replace("/", " ").replace("_", " ")).strip()


def real_class_names(name: str, dataset=None) -> tuple[str, ...]:
    """Class names for zero-shot prompts: the static list when there is one, else read from the dataset object
    (`.classes`, `.categories`, or `.class_to_idx` ordered by index) and cleaned (`clean_class_name`)."""
    info = REAL_TASKS[name]
    if info.classes is not None:
        return info.classes
    if dataset is None:
        raise ValueError(f"{name}'s class names come from the dataset object; pass the loaded dataset")
    while hasattr(dataset, "dataset") and not hasattr(dataset, "classes"):  # torch Subset
        dataset = dataset.dataset
    names = None
    for attr in ("classes", "categories"):
        names = getattr(dataset, attr, None) or names
    if not names and getattr(dataset, "class_to_idx", None):
        names = sorted(dataset.class_to_idx, key=dataset.class_to_idx.get)
    if not names:
        raise ValueError(f"{name}: the dataset object exposes no .classes, .categories or .class_to_idx")
    return tuple(clean_class_name(n if isinstance(n, str) else n[0]) for n in names)


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


def real_splits(
    name: str,
    seed: int = 0,
    root: str | Path | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    transform=None,
):
    """(train, val, test, spec) for a real task; validation is carved from train with a seeded permutation.

    Datasets with a single split ("all", e.g. EuroSAT) are split 70/10/20 with the same permutation, so
    coefficients are always chosen on data disjoint from the test split. The test split is
    `RealTaskInfo.test_split` (the labelled validation split where the official test split has no labels).
    """
    import torch
    from torch.utils.data import Subset

    root = Path(root) if root is not None else default_real_root()
    info = REAL_TASKS[name] if name in REAL_TASKS else None
    if info is None:
        load_real_task(name, root)  # raises the informative KeyError
    gen = torch.Generator().manual_seed(seed)
    if "train" in info.splits:
        train = load_real_task(name, root, "train", download, transform)
        test = load_real_task(name, root, info.test_split, download, transform)
        order = torch.randperm(len(train), generator=gen).tolist()
        n_val = max(1, int(val_fraction * len(train)))
        if n_val >= len(train):
            raise ValueError(f"{name}: its train split has {len(train)} sample(s), too few to carve a validation split")
        val, train_part = Subset(train, order[:n_val]), Subset(train, order[n_val:])
        source = train
    else:
        source = load_real_task(name, root, info.splits[0], download, transform)
        order = torch.randperm(len(source), generator=gen).tolist()
        a, b = int(0.7 * len(order)), int(0.8 * len(order))
        if not 0 < a < b < len(order):
            raise ValueError(f"{name}: {len(order)} sample(s) are too few for a 70/10/20 train/val/test split")
        train_part, val, test = Subset(source, order[:a]), Subset(source, order[a:b]), Subset(source, order[b:])
    spec = RealSpec(name, real_class_names(name, source), info.templates)
    return train_part, val, test, spec
