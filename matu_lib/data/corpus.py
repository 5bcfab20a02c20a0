"""A captioned corpus of rendered 32x32 images for CLIP-style pretraining of a tiny image/text model.

Zero-shot heads only work if the text tower has seen the class words next to matching pictures. The corpus
therefore draws with the suite's own renderers (`render.py`) and captions with the suite's class words
("the digit seven printed in blue", "a red triangle on a striped background", "three circles", "a wavy
texture"). It uses its own seed stream, never a task's split, and no real image at all: the handwritten,
animal and face tasks are reached only through printed digits, rendered words ("the word zebra") and cartoon
faces, so their zero-shot accuracy is expected to be low and fine-tuning has to do the work.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import render as R
from .suite import ANIMAL_CLASSES, INK_COLOURS, TASKS

CHUNK = 2500  # images per independently seeded chunk: results do not depend on the number of workers
Scene = Callable[[np.random.Generator], tuple[np.ndarray, str]]


def _pick(rng: np.random.Generator, options) -> str:
    return str(options[int(rng.integers(len(options)))])


def _art(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _maybe(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _digit(rng):
    c = int(rng.integers(10))
    colour = _pick(rng, R.COLOUR_NAMES) if _maybe(rng, 0.5) else None
    neighbours = "0123456789" if _maybe(rng, 0.2) else ""
    img, a = R.scene_glyph(rng, str(c), colour=colour, neighbours=neighbours)
    w = R.DIGIT_WORDS[c]
    cap = _pick(rng, [f"the digit {w}", f"the number {w}", f"a printed {w}", f"a photo of the number {w}"])
    if neighbours:
        cap = _pick(rng, [f"the house number {w}", f"the number {w} between other digits"])
    if colour and _maybe(rng, 0.5):
        cap += f" printed in {colour}"
    if _maybe(rng, 0.15):
        cap += f", an {'even' if c % 2 == 0 else 'odd'} number"
    if a["background"] != "plain" and _maybe(rng, 0.25):
        cap += f" on {_art(a['background'])} background"
    return img, cap


def _letter(rng):
    ch = _pick(rng, R.LETTERS)
    colour = _pick(rng, R.COLOUR_NAMES) if _maybe(rng, 0.4) else None
    img, _ = R.scene_glyph(rng, ch.upper() if _maybe(rng, 0.5) else ch, colour=colour)
    cap = _pick(rng, [f"the letter {ch}", f"a printed letter {ch}"])
    return img, cap + (f" in {colour}" if colour and _maybe(rng, 0.5) else "")


def _shape(rng):
    pos = _pick(rng, R.POSITIONS) if _maybe(rng, 0.35) else None
    colour = _pick(rng, R.COLOUR_NAMES)
    img, a = R.scene_shape(rng, colour=colour, position=pos)
    words = [a["shape"]]
    if _maybe(rng, 0.45):
        words.insert(0, colour)
    if _maybe(rng, 0.35):
        words.insert(0, a["size"])
    cap = _art(" ".join(words)) if _maybe(rng, 0.7) else f"a photo of {_art(' '.join(words))}"
    if pos and _maybe(rng, 0.8):
        cap += f" in the {pos}"
    if a["background"] != "plain" and _maybe(rng, 0.35):
        cap += f" on {_art(a['background'])} background"
    elif a["background"] == "plain" and _maybe(rng, 0.1):
        cap += " on a plain background"
    return img, cap


def _count(rng):
    n = int(rng.integers(1, 7))
    shape = "circle" if _maybe(rng, 0.4) else None
    img = R.scene_count(rng, n, shape=shape)
    w = R.COUNT_WORDS[n - 1]
    noun = ("circle" if shape else _pick(rng, ["object", "shape"])) + ("s" if n > 1 else "")
    if shape and _maybe(rng, 0.3):
        noun = "dots" if n > 1 else "dot"
    return img, _pick(rng, [f"{w} {noun}", f"a photo of {w} {noun}"])


def _texture(rng):
    kind = _pick(rng, R.TEXTURES)
    fg_name, bg_name = rng.choice(R.COLOUR_NAMES, 2, replace=False)
    img = R.finish(R.blend(R.texture_mask(rng, kind), R.colour_rgb(rng, str(fg_name)), R.colour_rgb(rng, str(bg_name))))
    noun = _pick(rng, ["texture", "pattern"])
    cap = f"{_art(str(fg_name) + ' ' + kind)} {noun}" if _maybe(rng, 0.3) else f"{_art(kind)} {noun}"
    if _maybe(rng, 0.15):
        cap = f"a {kind} background"
    return img, cap


def _stripes(rng):
    c = int(rng.integers(3))
    base = {0: np.pi / 2, 1: 0.0, 2: float(rng.choice([np.pi / 4, 3 * np.pi / 4]))}[c]
    fg = R.random_rgb(rng)
    img = R.finish(
        R.blend(R.texture_mask(rng, "striped", angle=base + rng.uniform(-0.15, 0.15)), fg, R.far_rgb(rng, fg, 110))
    )
    o = R.STRIPE_ORIENTATIONS[c]
    return img, _pick(rng, [f"{o} stripes", f"a {o} striped texture"])


def _arrow(rng):
    c = int(rng.integers(4))
    colour = _pick(rng, R.COLOUR_NAMES)
    bg, _ = R.background(rng, _pick(rng, ["plain", "smooth", "gradient"]), 0.4)
    img = Image.fromarray(bg)
    cx, cy = R.S / 2 + rng.uniform(-10, 10, 2)
    R.draw_shape(
        ImageDraw.Draw(img),
        "arrow",
        cx,
        cy,
        rng.uniform(11, 20),
        R.colour_rgb(rng, colour),
        angle=np.pi / 2 * (c - 1) + rng.uniform(-0.25, 0.25),
    )
    d = R.DIRECTIONS[c]
    return R.finish(img), (f"{_art(colour)} arrow pointing {d}" if _maybe(rng, 0.3) else f"an arrow pointing {d}")


def _land(rng):
    k = _pick(rng, R.LAND_COVER)
    return R.finish(R.land_cover(rng, k)), _pick(rng, [f"an aerial photo of {k}", f"a satellite image of {k}"])


def _sign(rng):
    s = _pick(rng, R.SIGNS)
    return R.scene_sign(rng, s, dark=_maybe(rng, 0.1)), _pick(rng, [f"a {s} sign", f"a traffic sign: {s}"])


_WORDS = ANIMAL_CLASSES + R.POSITIVE_WORDS + R.NEGATIVE_WORDS + ("face", "background") + R.SHAPES


def _word(rng):
    if _maybe(rng, 0.3):  # Stroop pairs ground "written in <ink colour>"
        word, ink = rng.choice(INK_COLOURS, 2)
        img = R.scene_word(rng, str(word), ink=R.colour_rgb(rng, str(ink)))
        return img, _pick(rng, [f"the word {word} written in {ink}", f"{ink} text"])
    word = _pick(rng, _WORDS)
    img = R.scene_word(rng, word)
    if word in R.POSITIVE_WORDS + R.NEGATIVE_WORDS and _maybe(rng, 0.5):
        tone = "positive" if word in R.POSITIVE_WORDS else "negative"
        return img, _pick(rng, [f"the word {word}, a {tone} word", f"text with a {tone} sentiment"])
    return img, f"the word {word}"


def _face(rng):
    return R.scene_face(rng), _pick(rng, ["a face", "a cartoon face", "a photo of a face", "a smiling face"])


# Mixture weights: textures are a caption subject often (so texture words get grounded), colour is one
# attribute among several rather than part of every caption.
SCENES: dict[str, tuple[Scene, float]] = {
    "digit": (_digit, 0.16),
    "letter": (_letter, 0.08),
    "shape": (_shape, 0.18),
    "count": (_count, 0.10),
    "texture": (_texture, 0.12),
    "stripes": (_stripes, 0.04),
    "arrow": (_arrow, 0.06),
    "land": (_land, 0.06),
    "sign": (_sign, 0.07),
    "word": (_word, 0.09),
    "face": (_face, 0.04),
}


def _chunk(seed: int, index: int, n: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng([seed, zlib.crc32(b"matu-corpus"), index])
    names = list(SCENES)
    p = np.array([SCENES[k][1] for k in names])
    kinds = rng.choice(len(names), size=n, p=p / p.sum())
    imgs, caps = [], []
    for k in kinds:
        img, cap = SCENES[names[k]][0](rng)
        imgs.append(img)
        caps.append(cap + ".")
    return np.stack(imgs), caps


def make_corpus(n: int, seed: int = 0, workers: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """`n` rendered images (uint8 [n,3,32,32]) with one caption each.

    Generated in fixed-size chunks, each seeded by (seed, chunk index), so the output is identical for any
    `workers` (default: up to 2 processes; 150,000 images take ~1 minute on 2 cores).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    sizes = [min(CHUNK, n - s) for s in range(0, n, CHUNK)]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    if workers > 1 and len(sizes) > 1:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_chunk, [seed] * len(sizes), range(len(sizes)), sizes))
    else:
        parts = [_chunk(seed, i, s) for i, s in enumerate(sizes)]
    if not parts:
        return torch.zeros((0, 3, 32, 32), dtype=torch.uint8), []
    x = np.concatenate([p[0] for p in parts])
    caps = [c for p in parts for c in p[1]]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), caps


def _class_pattern(task: str, cls: str) -> re.Pattern:
    # single letters ("a", "k") would match articles and stray words: require "letter k"
    phrase = f"letter {cls}" if len(cls) == 1 else cls
    return re.compile(rf"\b{re.escape(phrase)}\b")


def corpus_vocabulary_coverage(captions: list[str]) -> dict[str, float]:
    """task -> fraction of its class names that occur (as whole words) in at least one caption.

    A class word that never appears cannot be aligned by contrastive pretraining, so zero-shot on it is chance.
    """
    text = "\n".join(c.lower() for c in captions)
    return {
        name: float(np.mean([bool(_class_pattern(name, c).search(text)) for c in spec.classes]))
        for name, spec in TASKS.items()
    }
