"""Deterministic synthetic captioned images: coloured shapes, a striped style, a pink square.

Every image is 32x32 RGB: a flat background, one main object (circle, square or triangle) at a
random position and size, and optionally

- a second ordinary object ("a red circle and a yellow triangle on a blue background"),
- the pink square, the toy's "pink elephant" ("a red circle and a pink square on ..."),
- the *negation* caption "..., no pink square" paired with an image that DOES show the pink
  square: the toy model is taught the failure the paper observes in real diffusion models
  (they draw what a negation mentions), so that activation transport has something to remove,
- the "striped style": horizontal stripes of period 8 px (rows alternately lightened and
  darkened by 40 levels, random phase) over the whole image, captioned ", striped style".

Captions mention exactly what is drawn (except the negation, by design). Colours never collide:
pink is used only for the pink square, an object never has its background's colour.

Sample `i` of a dataset with seed `s` depends only on `(s, i)` (numpy's default_rng), so any
slice can be regenerated anywhere, in any order.

The experiments this supports (issue 5):
- concept negation: source = prompts that mention the pink square ("X, no pink square" or
  "X and a pink square"), target = the same prompts without it ("X"); at strength 1 the pink
  square's presence for the mentioning prompts should drop to the rate of "X";
- style control: source = plain captions "X", target = "X, striped style"; the stripe score
  should rise with the strength.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "pink": (245, 50, 215),
}
BACKGROUNDS: tuple[str, ...] = ("blue", "green", "black", "white")
OBJECT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PINK = "pink"
PINK_SHAPE = "square"
STYLE = "striped"
STRIPE_PERIOD = 8
STRIPE_AMPLITUDE = 40
NEGATION_SUFFIX = ", no pink square"
STYLE_SUFFIX = ", striped style"


@dataclass(frozen=True)
class Config:
    """Probabilities of the caption kinds (the remainder are plain one-object captions)."""

    p_pink: float = 0.15  # "X and a pink square" with the square drawn
    p_negation: float = 0.15  # "X, no pink square" ...
    negation_shows_pink: float = 1.0  # ... drawn with the square with this probability
    p_second: float = 0.15  # "a red circle and a yellow triangle on ..." (never with pink)
    p_style: float = 0.3  # ", striped style", independent of the rest


@dataclass
class Sample:
    """One image with its caption and ground truth."""

    caption: str
    image: np.ndarray  # (32, 32, 3) uint8
    background: str
    colour: str
    shape: str
    second: tuple[str, str] | None = None  # (colour, shape) of an ordinary second object
    pink: bool = False  # the pink square is drawn
    mentions_pink: bool = False  # the caption says "pink square" (with or without "no")
    negation: bool = False  # the caption is of the form "..., no pink square"
    striped: bool = False
    extra: dict[str, int] = field(default_factory=dict)  # geometry, for tests

    def labels(self) -> dict[str, object]:
        """Ground truth without the image (JSON-friendly)."""
        out = asdict(self)
        out.pop("image")
        return out


def base_caption(colour: str, shape: str, background: str, second: tuple[str, str] | None) -> str:
    """'a red circle on a blue background' or 'a red circle and a yellow square on ...'."""
    head = f"a {colour} {shape}"
    if second is not None:
        head += f" and a {second[0]} {second[1]}"
    return f"{head} on a {background} background"


def caption_for(
    colour: str,
    shape: str,
    background: str,
    *,
    second: tuple[str, str] | None = None,
    pink: bool = False,
    negation: bool = False,
    striped: bool = False,
) -> str:
    """The caption grammar in one place (used by the generator and by evaluation prompts)."""
    if pink and negation:
        raise ValueError("a caption either shows or negates the pink square")
    if pink:
        second = (PINK, PINK_SHAPE)
    text = base_caption(colour, shape, background, second)
    if striped:
        text += STYLE_SUFFIX
    if negation:
        text += NEGATION_SUFFIX
    return text


def _box(rng: np.random.Generator, half_lo: int, half_hi: int) -> tuple[int, int, int, int]:
    half = int(rng.integers(half_lo, half_hi + 1))
    cx = int(rng.integers(half, SIZE - half))
    cy = int(rng.integers(half, SIZE - half))
    return cx - half, cy - half, cx + half - 1, cy + half - 1


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    return max(w, 0) * max(h, 0)


def _area(a: tuple[int, int, int, int]) -> int:
    return (a[2] - a[0] + 1) * (a[3] - a[1] + 1)


def _place_apart(
    rng: np.random.Generator, other: tuple[int, int, int, int], half_lo: int, half_hi: int
) -> tuple[int, int, int, int]:
    """A box that overlaps `other` by at most 10% of its own area (best of 50 tries)."""
    best, best_frac = None, 2.0
    for _ in range(50):
        box = _box(rng, half_lo, half_hi)
        frac = _overlap(box, other) / _area(box)
        if frac < best_frac:
            best, best_frac = box, frac
        if frac <= 0.1:
            break
    assert best is not None
    return best


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def stripe(image: np.ndarray, phase: int) -> np.ndarray:
    """Horizontal stripes: rows lightened/darkened by STRIPE_AMPLITUDE, period STRIPE_PERIOD."""
    rows = (np.arange(SIZE) + phase) % STRIPE_PERIOD < STRIPE_PERIOD // 2
    delta = np.where(rows, STRIPE_AMPLITUDE, -STRIPE_AMPLITUDE)[:, None, None]
    return np.clip(image.astype(np.int16) + delta, 0, 255).astype(np.uint8)


def render(
    colour: str,
    shape: str,
    background: str,
    rng: np.random.Generator,
    *,
    second: tuple[str, str] | None = None,
    pink: bool = False,
    striped: bool = False,
) -> tuple[np.ndarray, dict[str, int]]:
    """Draw one image; positions, sizes and the stripe phase come from `rng`."""
    img = Image.new("RGB", (SIZE, SIZE), COLOURS[background])
    draw = ImageDraw.Draw(img)
    main = _box(rng, 4, 8)
    _draw(draw, shape, main, COLOURS[colour])
    extra = {"x0": main[0], "y0": main[1], "x1": main[2], "y1": main[3]}
    if second is not None:
        box = _place_apart(rng, main, 3, 6)
        _draw(draw, second[1], box, COLOURS[second[0]])
    if pink:
        box = _place_apart(rng, main, 3, 5)
        _draw(draw, PINK_SHAPE, box, COLOURS[PINK])
        extra.update(px0=box[0], py0=box[1], px1=box[2], py1=box[3])
    arr = np.asarray(img, dtype=np.uint8).copy()
    if striped:
        extra["phase"] = int(rng.integers(0, STRIPE_PERIOD))
        arr = stripe(arr, extra["phase"])
    return arr, extra


def make_sample(index: int, seed: int = 0, config: Config = Config()) -> Sample:
    """Sample number `index` of the dataset with `seed` (a pure function of both)."""
    rng = np.random.default_rng([seed, index])
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    colours = [c for c in OBJECT_COLOURS if c != background]
    colour = colours[rng.integers(len(colours))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    striped = bool(rng.random() < config.p_style)
    kind = rng.random()
    second = None
    pink = negation = False
    if kind < config.p_pink:
        pink = True
    elif kind < config.p_pink + config.p_negation:
        negation = True
        pink = bool(rng.random() < config.negation_shows_pink)
    elif kind < config.p_pink + config.p_negation + config.p_second:
        others = [c for c in colours if c != colour]
        second = (others[rng.integers(len(others))], SHAPES[rng.integers(len(SHAPES))])
    image, extra = render(colour, shape, background, rng, second=second, pink=pink, striped=striped)
    caption = caption_for(
        colour,
        shape,
        background,
        second=second,
        pink=pink and not negation,
        negation=negation,
        striped=striped,
    )
    return Sample(
        caption=caption,
        image=image,
        background=background,
        colour=colour,
        shape=shape,
        second=second,
        pink=pink,
        mentions_pink=(pink and not negation) or negation,
        negation=negation,
        striped=striped,
        extra=extra,
    )


def make_dataset(
    n: int, seed: int = 0, start: int = 0, config: Config = Config()
) -> tuple[np.ndarray, list[str], list[Sample]]:
    """Samples start..start+n-1: images (n, 32, 32, 3) uint8, captions, and the samples."""
    samples = [make_sample(i, seed, config) for i in range(start, start + n)]
    images = np.stack([s.image for s in samples]) if samples else np.zeros((0, SIZE, SIZE, 3))
    return images.astype(np.uint8), [s.caption for s in samples], samples


def vocabulary() -> list[str]:
    """Every word a caption can contain (the tokenizer's vocabulary, special tokens aside)."""
    words = {"a", "and", "on", "background", "no", "style", ",", STYLE, PINK, PINK_SHAPE}
    words.update(COLOURS, SHAPES)
    return sorted(words)


def base_prompts() -> list[tuple[str, str, str]]:
    """All (colour, shape, background) combinations the generator can draw."""
    return [(c, s, b) for b in BACKGROUNDS for c in OBJECT_COLOURS if c != b for s in SHAPES]
