"""Pixel-statistics detectors for the toy world, calibrated on the dataset's ground truth.

All detectors take uint8 RGB arrays of shape (32, 32, 3) (or PIL images).

- **pink square** (`pink_pixels`, `has_pink`): a pixel is "magenta" when min(R, B) - G > 100
  (the pink square is (245, 50, 215), and stays magenta under the stripes; no other colour of
  the palette comes close, a red/blue edge blend reaches about 70). The mask is eroded with a
  3x3 window, so thin blends along edges vanish and only solid patches count; an image shows
  the pink square when at least PINK_MIN_PIXELS eroded pixels remain (the smallest square,
  6x6, leaves 16).
- **stripes** (`stripe_score`): for every column, the amplitude of the luminance's Fourier
  component at the stripe frequency (32 / 8 = 4 cycles per image height), in grey levels; the
  score is the 10th percentile over columns: the stripes run through every column, an object's
  edges only through the columns it spans, so objects do not count. Clean stripes score about
  40 (at least 9 when objects cover most columns), plain images exactly 0; an image is
  "striped" above STRIPE_THRESHOLD. The score is continuous, for strength sweeps.
- **background / main object** (`background`, `main_object`): every pixel takes the name of
  the nearest palette colour (RGB distance). The background is the most common name on the
  2-pixel border; the main object's colour is the most common other non-pink name after a 3x3
  erosion, and its shape the template (square, circle, triangle drawn in the object's bounding
  box) with the highest IoU with the largest connected patch of that colour.
- **kept** (`kept`): two images of the same prompt and seed (strength 0 and 1) keep "the rest
  of the image" when their background and main-object colour agree.

`calibrate` measures the accuracy of every detector against the generator's ground truth.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from . import dataset as ds

MAGENTA_MARGIN = 100
PINK_MIN_PIXELS = 6
STRIPE_THRESHOLD = 5.0
_NAMES = list(ds.COLOURS)
_PALETTE = np.array([ds.COLOURS[n] for n in _NAMES], dtype=np.float32)


def as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """A (32, 32, 3) uint8 array from a PIL image or an array."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 RGB, got {arr.dtype}")
    return arr


def erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion (pixels outside the image count as False)."""
    return ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)


def magenta_mask(image: np.ndarray | Image.Image) -> np.ndarray:
    """Pixels with min(R, B) - G > MAGENTA_MARGIN."""
    arr = as_array(image).astype(np.int16)
    return np.minimum(arr[..., 0], arr[..., 2]) - arr[..., 1] > MAGENTA_MARGIN


def pink_pixels(image: np.ndarray | Image.Image) -> int:
    """Number of magenta pixels left after a 3x3 erosion (solid pink area)."""
    return int(erode(magenta_mask(image)).sum())


def has_pink(image: np.ndarray | Image.Image, threshold: int = PINK_MIN_PIXELS) -> bool:
    """Whether the image shows the pink square."""
    return pink_pixels(image) >= threshold


def stripe_score(image: np.ndarray | Image.Image) -> float:
    """Amplitude (grey levels) of the dataset's horizontal stripes; 10th percentile of columns."""
    arr = as_array(image).astype(np.float32)
    lum = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)
    k = lum.shape[0] // ds.STRIPE_PERIOD
    amp = np.abs(np.fft.rfft(lum, axis=0)[k]) * 2.0 / lum.shape[0]  # (W,)
    return float(np.percentile(amp, 10))


def is_striped(image: np.ndarray | Image.Image, threshold: float = STRIPE_THRESHOLD) -> bool:
    """Whether the image carries the striped style."""
    return stripe_score(image) > threshold


def colour_names(image: np.ndarray | Image.Image) -> np.ndarray:
    """(32, 32) array of palette indices into `list(dataset.COLOURS)` (nearest colour)."""
    arr = as_array(image).astype(np.float32)
    dist = ((arr[..., None, :] - _PALETTE) ** 2).sum(-1)
    return dist.argmin(-1)


def background(image: np.ndarray | Image.Image) -> str:
    """The background colour's name: the most common palette colour on the 2-pixel border."""
    idx = colour_names(image)
    border = np.concatenate(
        [idx[:2].ravel(), idx[-2:].ravel(), idx[:, :2].ravel(), idx[:, -2:].ravel()]
    )
    return _NAMES[np.bincount(border, minlength=len(_NAMES)).argmax()]


@dataclass(frozen=True)
class MainObject:
    """The detected main object (colour None when nothing but background and pink is drawn)."""

    colour: str | None
    shape: str | None
    pixels: int


def _template(shape: str, box: tuple[int, int, int, int]) -> np.ndarray:
    img = Image.new("L", (ds.SIZE, ds.SIZE), 0)
    ds._draw(ImageDraw.Draw(img), shape, box, 255)
    return np.asarray(img) > 0


def classify_shape(mask: np.ndarray) -> str | None:
    """The shape template (drawn in the mask's bounding box) with the highest IoU."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    best, best_iou = None, -1.0
    for shape in ds.SHAPES:
        t = _template(shape, box)
        iou = (t & mask).sum() / max((t | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def main_object(image: np.ndarray | Image.Image, bg: str | None = None) -> MainObject:
    """Colour and shape of the largest non-background, non-pink object."""
    idx = colour_names(image)
    bg = background(image) if bg is None else bg
    skip = {_NAMES.index(bg), _NAMES.index(ds.PINK)}
    counts = {i: int(erode(idx == i).sum()) for i in range(len(_NAMES)) if i not in skip}
    best = max(counts, key=counts.__getitem__)
    if counts[best] == 0:
        return MainObject(None, None, 0)
    labels, n = ndimage.label(idx == best)
    sizes = ndimage.sum(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    mask = labels == (int(np.argmax(sizes)) + 1)
    return MainObject(_NAMES[best], classify_shape(mask), int(mask.sum()))


def kept(a: np.ndarray | Image.Image, b: np.ndarray | Image.Image) -> dict[str, bool]:
    """Whether image b keeps a's background colour and main-object colour (and both)."""
    bg_a, bg_b = background(a), background(b)
    obj_a, obj_b = main_object(a, bg_a), main_object(b, bg_b)
    same_bg = bg_a == bg_b
    same_obj = obj_a.colour is not None and obj_a.colour == obj_b.colour
    return {"background": same_bg, "object": same_obj, "both": same_bg and same_obj}


def describe(image: np.ndarray | Image.Image) -> dict[str, object]:
    """Every detector's reading of one image."""
    bg = background(image)
    obj = main_object(image, bg)
    return {
        "background": bg,
        "colour": obj.colour,
        "shape": obj.shape,
        "pink_pixels": pink_pixels(image),
        "pink": has_pink(image),
        "stripe_score": stripe_score(image),
        "striped": is_striped(image),
    }


def _best_threshold(pos: Sequence[float], neg: Sequence[float]) -> tuple[float, float]:
    """Threshold t (predict positive when value >= t) maximising accuracy, and that accuracy."""
    values = np.array(list(pos) + list(neg), dtype=np.float64)
    truth = np.array([True] * len(pos) + [False] * len(neg))
    best_t, best_acc = 0.0, -1.0
    for t in np.unique(values):
        acc = float(((values >= t) == truth).mean())
        if acc > best_acc:
            best_t, best_acc = float(t), acc
    return best_t, best_acc


def calibrate(samples: Iterable[ds.Sample]) -> dict[str, float]:
    """Accuracy of every detector against ground truth, and the best separating thresholds."""
    samples = list(samples)
    pink_pos = [pink_pixels(s.image) for s in samples if s.pink]
    pink_neg = [pink_pixels(s.image) for s in samples if not s.pink]
    stripe_pos = [stripe_score(s.image) for s in samples if s.striped]
    stripe_neg = [stripe_score(s.image) for s in samples if not s.striped]
    single = [s for s in samples if s.second is None]
    found = [describe(s.image) for s in single]
    n = len(samples)
    return {
        "samples": n,
        "pink_accuracy": (
            sum(p >= PINK_MIN_PIXELS for p in pink_pos) + sum(p < PINK_MIN_PIXELS for p in pink_neg)
        )
        / n,
        "pink_best_threshold": _best_threshold(pink_pos, pink_neg)[0],
        "pink_min_positive": float(min(pink_pos, default=0)),
        "pink_max_negative": float(max(pink_neg, default=0)),
        "stripe_accuracy": (
            sum(v > STRIPE_THRESHOLD for v in stripe_pos)
            + sum(v <= STRIPE_THRESHOLD for v in stripe_neg)
        )
        / n,
        "stripe_best_threshold": _best_threshold(stripe_pos, stripe_neg)[0],
        "stripe_min_positive": float(min(stripe_pos, default=0)),
        "stripe_max_negative": float(max(stripe_neg, default=0)),
        "background_accuracy": float(
            np.mean([f["background"] == s.background for f, s in zip(found, single, strict=True)])
        ),
        "colour_accuracy": float(
            np.mean([f["colour"] == s.colour for f, s in zip(found, single, strict=True)])
        ),
        "shape_accuracy": float(
            np.mean([f["shape"] == s.shape for f, s in zip(found, single, strict=True)])
        ),
    }


if __name__ == "__main__":
    import json

    _, _, samples = ds.make_dataset(3000, seed=12345)
    print(json.dumps(calibrate(samples), indent=2))
