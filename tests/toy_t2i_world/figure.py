"""Labelled PNG grids of toy images (rows: prompts or strengths, columns: seeds or strengths)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(text: str, width: int, font: ImageFont.ImageFont, draw: ImageDraw.ImageDraw) -> str:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    return "\n".join(lines)


def grid(
    rows: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    *,
    scale: int = 3,
    label_width: int = 220,
    title: str | None = None,
) -> Path:
    """Write a labelled grid PNG: rows[i][j] is the image of row i, column j."""
    cell = rows[0][0].shape[0] * scale
    pad = 4
    font = _font(12)
    top = 20 + (18 if title else 0)
    width = label_width + len(col_labels) * (cell + pad) + pad
    height = top + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0), font=font)
    for j, label in enumerate(col_labels):
        draw.text(
            (label_width + pad + j * (cell + pad), top - 16), label, fill=(0, 0, 0), font=font
        )
    for i, (row, label) in enumerate(zip(rows, row_labels, strict=True)):
        y = top + pad + i * (cell + pad)
        text = _wrap(label, label_width - 2 * pad, font, draw)
        draw.multiline_text((pad, y + 2), text, fill=(0, 0, 0), font=font, spacing=2)
        for j, img in enumerate(row):
            tile = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + j * (cell + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
