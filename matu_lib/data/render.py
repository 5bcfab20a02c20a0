"""Procedural 32x32 renderers shared by the offline task suite and the captioned pretraining corpus.

Sharing one set of renderers is what makes zero-shot transfer possible: the corpus shows a "red triangle on a
striped background" drawn by exactly the code that later draws the `shapes` task. Everything is drawn on a
64x64 canvas and box-reduced to 32x32, which is a cheap form of anti-aliasing (PIL polygons have none).

Every function takes an explicit ``numpy.random.Generator``; nothing here touches global random state.
"""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

S = 64  # supersampled canvas side; reduced 2x to the final 32 px
OUT = 32

# Named colours with plain caption words. Values are centres; `colour_rgb` jitters them so that a colour
# class is a region of RGB space, not a single point.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 25),
    "yellow": (240, 220, 40),
    "green": (45, 165, 60),
    "blue": (35, 75, 215),
    "purple": (125, 45, 175),
    "pink": (245, 135, 195),
    "brown": (125, 75, 35),
    "white": (242, 242, 242),
    "black": (18, 18, 18),
}
COLOUR_NAMES = tuple(COLOURS)

TEXTURES = ("striped", "dotted", "checkered", "wavy", "grid", "noisy", "zigzag")
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
SIZES = ("small", "medium", "large")
DIRECTIONS = ("up", "right", "down", "left")
STRIPE_ORIENTATIONS = ("horizontal", "vertical", "diagonal")
LAND_COVER = ("forest", "sea", "farmland", "city", "highway", "desert")
SIGNS = ("stop", "yield", "warning", "no entry", "parking", "turn left", "turn right", "speed limit")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = tuple("abcdefghkr")
COUNT_WORDS = DIGIT_WORDS[1:7]  # "one" .. "six"
POSITIVE_WORDS = ("good", "great", "happy", "love", "best", "nice", "fun", "win", "joy", "calm", "kind", "wow")
NEGATIVE_WORDS = ("bad", "awful", "sad", "hate", "worst", "ugly", "dull", "lose", "pain", "fear", "mean", "boo")

_FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
# Fonts used for printed glyphs in training and in the corpus; HELDOUT_FONT is never used by the corpus or by
# other tasks, so `printed_digits_heldout_font` measures a genuine font shift.
TRAIN_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif-Bold.ttf",
)
HELDOUT_FONT = "STIXGeneralBolIta.ttf"

_YY, _XX = np.mgrid[0:S, 0:S].astype(np.float32)


@functools.lru_cache(maxsize=512)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """Load a bundled matplotlib font once per (name, size): truetype loading costs ~1 ms."""
    return ImageFont.truetype(str(_FONT_DIR / name), size)


# ----------------------------------------------------------------------------------------------- colours
def colour_rgb(rng: np.random.Generator, name: str, jitter: int = 22) -> tuple[int, int, int]:
    """A jittered instance of a named colour."""
    c = np.array(COLOURS[name], dtype=np.int32) + rng.integers(-jitter, jitter + 1, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def random_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def far_rgb(rng: np.random.Generator, other: tuple[int, int, int], min_dist: float = 140.0) -> tuple[int, int, int]:
    """A random colour far enough from `other` that a glyph on it stays visible."""
    for _ in range(20):
        c = random_rgb(rng)
        if np.linalg.norm(np.subtract(c, other)) >= min_dist:
            return c
    return tuple(255 - v for v in other)  # fall back to the complement


# ---------------------------------------------------------------------------------------------- textures
def _rotated_coords(rng: np.random.Generator, angle: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    a = rng.uniform(0, np.pi) if angle is None else angle
    ox, oy = rng.uniform(0, S, 2)
    c, s = np.cos(a), np.sin(a)
    return (_XX - ox) * c + (_YY - oy) * s, -(_XX - ox) * s + (_YY - oy) * c


def texture_mask(rng: np.random.Generator, kind: str, angle: float | None = None) -> np.ndarray:
    """A binary-ish [S,S] float mask of a texture class; period, phase and angle are random."""
    u, v = _rotated_coords(rng, angle)
    if kind == "striped":
        p = rng.uniform(9, 18)
        return (np.sin(2 * np.pi * u / p) > 0).astype(np.float32)
    if kind == "dotted":
        p = rng.uniform(11, 18)
        r = p * rng.uniform(0.2, 0.32)
        du, dv = (u % p) - p / 2, (v % p) - p / 2
        return (du * du + dv * dv < r * r).astype(np.float32)
    if kind == "checkered":
        p = rng.uniform(8, 16)
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    if kind == "wavy":
        p, amp, q = rng.uniform(10, 16), rng.uniform(3, 6), rng.uniform(18, 30)
        return (np.sin(2 * np.pi * (u + amp * np.sin(2 * np.pi * v / q)) / p) > 0).astype(np.float32)
    if kind == "grid":
        p = rng.uniform(10, 18)
        w = rng.uniform(2, 3.5)
        return (((u % p) < w) | ((v % p) < w)).astype(np.float32)
    if kind == "noisy":
        k = int(rng.integers(2, 4))
        n = rng.random((-(-S // k), -(-S // k))) > 0.5
        return np.kron(n, np.ones((k, k), dtype=bool))[:S, :S].astype(np.float32)
    if kind == "zigzag":
        p, q = rng.uniform(10, 16), rng.uniform(10, 18)
        tri = np.abs((v / q) % 2 - 1) * q * 0.8
        return (np.sin(2 * np.pi * (u + tri) / p) > 0).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}; valid: {TEXTURES}")


def blend(mask: np.ndarray, fg: tuple[int, int, int], bg: tuple[int, int, int]) -> np.ndarray:
    """Colour a [S,S] mask: fg where mask=1, bg where 0. Returns uint8 [S,S,3]."""
    m = mask[..., None]
    return (m * np.array(fg, np.float32) + (1 - m) * np.array(bg, np.float32)).astype(np.uint8)


def smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth value noise in [0,1] at SxS: low-res random grid, bilinear upsampled."""
    small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(small.resize((S, S), Image.BILINEAR), dtype=np.float32) / 255.0


def background(rng: np.random.Generator, kind: str | None = None, contrast: float = 1.0) -> tuple[np.ndarray, str]:
    """A random background canvas [S,S,3] uint8 and its caption word ("plain", a texture, or "noise").

    `contrast` < 1 pulls texture colours together, so clutter distracts without hiding the foreground.
    """
    if kind is None:
        kind = str(rng.choice(["plain", "plain", "gradient", "smooth"] + list(TEXTURES)))
    a = random_rgb(rng)
    if kind == "plain":
        return np.broadcast_to(np.array(a, np.uint8), (S, S, 3)).copy(), "plain"
    b = random_rgb(rng)
    b = tuple(int(x + (y - x) * contrast) for x, y in zip(a, b))
    if kind == "gradient":
        u, _ = _rotated_coords(rng)
        return blend(np.clip(u / S + 0.5, 0, 1), a, b), "plain"
    if kind == "smooth":
        return blend(smooth_noise(rng, int(rng.integers(3, 7))), a, b), "plain"
    return blend(texture_mask(rng, kind), a, b), kind


def land_cover(rng: np.random.Generator, kind: str) -> np.ndarray:
    """EuroSAT-like aerial texture [S,S,3] for a land-cover class; palettes jittered per image."""
    j = lambda c, d=18: tuple(int(np.clip(v + rng.integers(-d, d + 1), 0, 255)) for v in c)  # noqa: E731
    if kind == "forest":
        img = blend(smooth_noise(rng, int(rng.integers(10, 18))), j((20, 70, 25)), j((60, 120, 45)))
    elif kind == "sea":
        u, v = _rotated_coords(rng)
        m = 0.5 + 0.5 * np.sin(2 * np.pi * (u + 3 * np.sin(v / 7)) / rng.uniform(10, 20))
        img = blend(0.35 * m + 0.65 * smooth_noise(rng, 4), j((20, 50, 110)), j((40, 100, 160)))
    elif kind == "farmland":
        img = np.empty((S, S, 3), np.uint8)
        cut_x, cut_y = rng.integers(16, 48, 2)
        for y0, y1, x0, x1 in ((0, cut_y, 0, cut_x), (0, cut_y, cut_x, S), (cut_y, S, 0, cut_x), (cut_y, S, cut_x, S)):
            base = j(((110, 150, 50), (170, 150, 70), (90, 120, 40), (150, 110, 60))[rng.integers(4)], 20)
            rows = (np.sin(2 * np.pi * _rotated_coords(rng)[0] / rng.uniform(4, 7)) > 0).astype(np.float32)
            img[y0:y1, x0:x1] = blend(rows, base, tuple(max(0, v - 35) for v in base))[y0:y1, x0:x1]
    elif kind == "city":
        img = blend(smooth_noise(rng, 6), j((120, 120, 120)), j((90, 90, 95)))
        pim = Image.fromarray(img)
        d = ImageDraw.Draw(pim)
        p = int(rng.integers(9, 14))
        for y in range(-int(rng.integers(0, p)), S, p):
            for x in range(-int(rng.integers(0, p)), S, p):
                if rng.random() < 0.8:
                    g = int(rng.integers(140, 230))
                    tint = (g, g - int(rng.integers(0, 40)), g - int(rng.integers(0, 60)))
                    d.rectangle([x + 2, y + 2, x + p - 2, y + p - 2], fill=tint)
        img = np.asarray(pim).copy()
    elif kind == "highway":
        img = blend(smooth_noise(rng, 5), j((95, 125, 60)), j((140, 130, 90)))
        pim = Image.fromarray(img)
        d = ImageDraw.Draw(pim)
        for _ in range(int(rng.integers(1, 3))):
            a = rng.uniform(0, np.pi)
            cx, cy = rng.uniform(16, 48, 2)
            dx, dy = 60 * np.cos(a), 60 * np.sin(a)
            d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=j((70, 70, 72), 10), width=int(rng.integers(7, 11)))
            d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=(225, 225, 200), width=1)
        img = np.asarray(pim).copy()
    elif kind == "desert":
        u, _ = _rotated_coords(rng)
        dunes = 0.5 + 0.5 * np.sin(2 * np.pi * u / rng.uniform(14, 30) + 2 * smooth_noise(rng, 3))
        img = blend(0.6 * dunes + 0.4 * smooth_noise(rng, 8), j((225, 195, 140)), j((190, 150, 95)))
    else:
        raise ValueError(f"unknown land cover {kind!r}; valid: {LAND_COVER}")
    return img


# ------------------------------------------------------------------------------------------------ shapes
def shape_points(shape: str, cx: float, cy: float, r: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """Polygon vertices of a named shape (radius r, rotated by `angle` radians)."""
    if shape == "square":
        k, radii, a0 = 4, [r * 0.95], np.pi / 4
    elif shape == "triangle":
        k, radii, a0 = 3, [r * 1.1], -np.pi / 2
    elif shape == "hexagon":
        k, radii, a0 = 6, [r], 0.0
    elif shape == "octagon":
        k, radii, a0 = 8, [r], np.pi / 8
    elif shape == "star":
        k, radii, a0 = 10, [r * 1.15, r * 0.47], -np.pi / 2
    elif shape == "cross":
        w = r * 0.36
        pts = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        c, s = np.cos(angle), np.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    elif shape == "arrow":  # points right at angle 0
        pts = [
            (-r, -0.28 * r),
            (0.1 * r, -0.28 * r),
            (0.1 * r, -0.75 * r),
            (r, 0),
            (0.1 * r, 0.75 * r),
            (0.1 * r, 0.28 * r),
            (-r, 0.28 * r),
        ]
        c, s = np.cos(angle), np.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [
        (
            cx + radii[i % len(radii)] * np.cos(a0 + angle + 2 * np.pi * i / k),
            cy + radii[i % len(radii)] * np.sin(a0 + angle + 2 * np.pi * i / k),
        )
        for i in range(k)
    ]


def draw_shape(
    d: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill,
    angle: float = 0.0,
    outline=None,
    width: int = 0,
) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        d.polygon(shape_points(shape, cx, cy, r, angle), fill=fill, outline=outline, width=width)


def draw_text(
    img: Image.Image, text: str, cx: float, cy: float, size: int, fill, font_name: str, angle: float = 0.0
) -> None:
    """Draw `text` centred at (cx, cy); rotated text goes through a mask so the background stays intact."""
    f = font(font_name, size)
    if abs(angle) < 0.5:
        ImageDraw.Draw(img).text((cx, cy), text, fill=fill, font=f, anchor="mm")
        return
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).text((cx, cy), text, fill=255, font=f, anchor="mm")
    mask = mask.rotate(angle, resample=Image.BILINEAR, center=(cx, cy))
    img.paste(fill, (0, 0), mask)


def finish(img: Image.Image | np.ndarray) -> np.ndarray:
    """Reduce the 64 px canvas to the final uint8 [32,32,3] array."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    return np.asarray(img.reduce(S // OUT), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- scenes
def position_centre(rng: np.random.Generator, position: str, margin: float) -> tuple[float, float]:
    """A random centre inside the named region (quadrants, or a central box)."""
    if position == "center":
        return tuple(S / 2 + rng.uniform(-4, 4, 2))
    lo, hi = margin, S / 2 - 4
    x, y = rng.uniform(lo, hi, 2)
    if "right" in position:
        x = S - x
    if "bottom" in position:
        y = S - y
    return x, y


def scene_shape(
    rng: np.random.Generator,
    shape: str | None = None,
    colour: str | None = None,
    bg_kind: str | None = None,
    size: str | None = None,
    position: str | None = None,
    contrast: float = 0.5,
) -> tuple[np.ndarray, dict]:
    """One shape on a background; returns the image and every attribute actually used (for captions)."""
    shape = shape or str(rng.choice(SHAPES))
    bg, bg_word = background(rng, bg_kind, contrast)
    if colour is None:
        fill = far_rgb(rng, tuple(int(v) for v in bg[S // 2, S // 2]))
    else:
        fill = colour_rgb(rng, colour)
    size = size or str(rng.choice(SIZES))
    r = {"small": rng.uniform(6, 9), "medium": rng.uniform(11, 15), "large": rng.uniform(18, 24)}[size]
    if position is None:
        cx, cy = rng.uniform(r + 2, S - r - 2, 2)
    else:
        cx, cy = position_centre(rng, position, r + 2)
    img = Image.fromarray(bg)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, fill, angle=rng.uniform(-0.3, 0.3))
    return finish(img), {"shape": shape, "colour": colour, "background": bg_word, "size": size, "position": position}


def scene_count(rng: np.random.Generator, count: int, shape: str | None = None) -> np.ndarray:
    """`count` non-overlapping small objects (CLEVR-count stand-in); mixed shapes unless `shape` is given."""
    bg, _ = background(rng, str(rng.choice(["plain", "smooth", "gradient"])), 0.35)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    centres: list[tuple[float, float, float]] = []
    for _ in range(count):
        r = rng.uniform(4.5, 7.5)
        for _try in range(60):  # rejection sampling; at most 6 objects of r<=7.5 always fit in 64 px
            x, y = rng.uniform(r + 1, S - r - 1, 2)
            if all((x - a) ** 2 + (y - b) ** 2 > (r + c + 2) ** 2 for a, b, c in centres):
                break
        centres.append((x, y, r))
        draw_shape(
            d,
            shape or str(rng.choice(SHAPES)),
            x,
            y,
            r,
            far_rgb(rng, tuple(int(v) for v in bg[int(y), int(x)])),
            angle=rng.uniform(0, np.pi),
        )
    return finish(img)


def scene_glyph(
    rng: np.random.Generator,
    text: str,
    fonts: tuple[str, ...] = TRAIN_FONTS,
    colour: str | None = None,
    bg_kind: str | None = None,
    contrast: float = 0.45,
    size_range: tuple[int, int] = (30, 46),
    max_angle: float = 12.0,
    neighbours: str = "",
) -> tuple[np.ndarray, dict]:
    """Printed text (a digit, letter or word) on a background; `neighbours` adds partial distractor glyphs
    left and right, as in SVHN crops."""
    bg, bg_word = background(rng, bg_kind, contrast)
    fill = colour_rgb(rng, colour) if colour else far_rgb(rng, tuple(int(v) for v in bg[S // 2, S // 2]))
    img = Image.fromarray(bg)
    fname = str(rng.choice(fonts))
    size = int(rng.integers(*size_range))
    cx, cy = S / 2 + rng.uniform(-5, 5), S / 2 + rng.uniform(-4, 4)
    if neighbours:
        gap = size * rng.uniform(0.62, 0.8)
        for side in (-1, 1):
            if rng.random() < 0.8:
                draw_text(img, str(rng.choice(list(neighbours))), cx + side * gap, cy, size, fill, fname)
    draw_text(img, text, cx, cy, size, fill, fname, angle=rng.uniform(-max_angle, max_angle))
    return finish(img), {"colour": colour, "background": bg_word, "font": fname}


def scene_word(rng: np.random.Generator, word: str, ink: tuple[int, int, int] | None = None) -> np.ndarray:
    """A short word, size fitted to the canvas (RenderedSST2 / typographic stand-in)."""
    bg = np.broadcast_to(
        np.array(colour_rgb(rng, "white", 12) if rng.random() < 0.6 else random_rgb(rng), np.uint8), (S, S, 3)
    ).copy()
    ink = ink or far_rgb(rng, tuple(int(v) for v in bg[0, 0]))
    img = Image.fromarray(bg)
    fname = str(rng.choice(TRAIN_FONTS))
    size = int(min(40, 86 / max(len(word), 2) * rng.uniform(1.0, 1.25)))
    draw_text(
        img, word, S / 2 + rng.uniform(-3, 3), S / 2 + rng.uniform(-6, 6), size, ink, fname, angle=rng.uniform(-10, 10)
    )
    return finish(img)


def scene_sign(rng: np.random.Generator, sign: str, dark: bool = False) -> np.ndarray:
    """GTSRB-like traffic sign: a coloured shape with a glyph, on a street-ish background."""
    bg, _ = background(rng, str(rng.choice(["smooth", "gradient", "noisy", "grid"])), 0.4)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(17, 26)
    cx, cy = S / 2 + rng.uniform(-5, 5, 2)
    red, white, blue = colour_rgb(rng, "red", 18), colour_rgb(rng, "white", 10), colour_rgb(rng, "blue", 18)
    black = colour_rgb(rng, "black", 10)
    bw = max(2, int(r * 0.2))
    if sign == "stop":
        draw_shape(d, "octagon", cx, cy, r, red)
        draw_text(img, "STOP", cx, cy, int(r * 0.62), white, "DejaVuSans-Bold.ttf")
    elif sign == "yield":
        draw_shape(d, "triangle", cx, cy, r, red, angle=np.pi)
        draw_shape(d, "triangle", cx, cy, r * 0.55, white, angle=np.pi)
    elif sign == "warning":
        draw_shape(d, "triangle", cx, cy, r, red)
        draw_shape(d, "triangle", cx, cy + r * 0.08, r * 0.6, white)
        draw_text(img, "!", cx, cy + r * 0.12, int(r * 0.75), black, "DejaVuSans-Bold.ttf")
    elif sign == "no entry":
        draw_shape(d, "circle", cx, cy, r, red)
        d.rectangle([cx - r * 0.7, cy - r * 0.18, cx + r * 0.7, cy + r * 0.18], fill=white)
    elif sign == "parking":
        draw_shape(d, "square", cx, cy, r, blue)
        draw_text(img, "P", cx, cy, int(r * 1.2), white, "DejaVuSans-Bold.ttf")
    elif sign in ("turn left", "turn right"):
        draw_shape(d, "circle", cx, cy, r, blue)
        draw_shape(d, "arrow", cx, cy, r * 0.65, white, angle=np.pi if sign == "turn left" else 0.0)
    elif sign == "speed limit":
        draw_shape(d, "circle", cx, cy, r, red)
        draw_shape(d, "circle", cx, cy, r - bw, white)
        draw_text(img, str(rng.choice(["30", "50", "60", "80"])), cx, cy, int(r * 0.8), black, "DejaVuSans-Bold.ttf")
    else:
        raise ValueError(f"unknown sign {sign!r}; valid: {SIGNS}")
    out = finish(img)
    if dark:  # low light + sensor noise: same classes, shifted domain
        gain = rng.uniform(0.25, 0.5)
        noise = rng.normal(0, 8, out.shape)
        out = np.clip(out * gain + noise, 0, 255).astype(np.uint8)
    return out


def scene_face(rng: np.random.Generator) -> np.ndarray:
    """A cartoon face: lets corpus captions ground the word "face" without any real photograph."""
    bg, _ = background(rng, None, 0.4)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(16, 26)
    cx, cy = S / 2 + rng.uniform(-6, 6, 2)
    skin = tuple(int(v) for v in np.clip(np.array((225, 185, 150)) * rng.uniform(0.45, 1.1), 0, 255))
    d.ellipse([cx - r * 0.85, cy - r, cx + r * 0.85, cy + r], fill=skin)
    eye = colour_rgb(rng, "black", 10)
    for sx in (-1, 1):
        ex, ey, er = cx + sx * r * 0.33, cy - r * 0.2, r * 0.1
        d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=eye)
    d.arc([cx - r * 0.4, cy + r * 0.05, cx + r * 0.4, cy + r * 0.55], 20, 160, fill=eye, width=2)
    return finish(img)


def place_mask(
    rng: np.random.Generator, mask28: np.ndarray, scale: tuple[float, float] = (0.75, 1.0), angle: float = 0.0
) -> np.ndarray:
    """Put a 28x28 grayscale source (an MNIST digit, an animal silhouette) on the 64 px canvas as a float mask,
    with random scale and offset."""
    side = int(S * rng.uniform(*scale))
    m = Image.fromarray(mask28).resize((side, side), Image.BILINEAR)
    if angle:
        m = m.rotate(angle, resample=Image.BILINEAR)
    canvas = Image.new("L", (S, S), 0)
    off = rng.integers(0, S - side + 1, 2)
    canvas.paste(m, (int(off[0]), int(off[1])))
    return np.asarray(canvas, dtype=np.float32) / 255.0
