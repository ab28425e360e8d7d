"""Small PIL-only figures (no matplotlib needed): the loss curve (:mod:`omni_compile.charts`) and captioned
image grids."""

from __future__ import annotations

import csv
import math
from typing import List, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font():
    return ImageFont.load_default()


def plot_loss(csv_path: str, png_path: str, title: str = "training loss", width: int = 720, height: int = 420) -> None:
    """Loss (log scale) vs step from ``loss.csv`` (columns ``step``, ``loss``); non-positive or non-finite
    losses are left out."""
    from ..charts import Chart, Series, save

    steps, losses = [], []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row["loss"] and math.isfinite(float(row["loss"])) and float(row["loss"]) > 0:
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
    chart = Chart(title, [Series("loss", steps, losses, "line")], xlabel="step", ylabel="loss (log)", log_y=True)
    save([chart], png_path, cols=1, size=(width, height))


def caption_grid(images, captions: Sequence[str], png_path: str, cols: int = 4, scale: int = 4,
                 extra_lines: Sequence[str] = ()) -> None:
    """Images ``[N, 3, H, W]`` in [0, 1] (tensor or array) with each caption under its image (split at the
    comma, one object per line); ``extra_lines`` per image (e.g. detector verdicts) go below."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    n, _, h, w = arr.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    tile_w, img_h = w * scale, h * scale
    text_h = 14 * (2 + (1 if extra_lines else 0)) + 6
    pad = 6
    canvas = Image.new("RGB", (cols * (tile_w + pad) + pad, rows * (img_h + text_h + pad) + pad), "white")
    d = ImageDraw.Draw(canvas)
    font = _font()
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = pad + c * (tile_w + pad), pad + r * (img_h + text_h + pad)
        tile = Image.fromarray((np.clip(arr[i].transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8))
        canvas.paste(tile.resize((tile_w, img_h), Image.NEAREST), (x, y))
        lines: List[str] = [p.strip() for p in captions[i].split(",")] or [""]
        if extra_lines:
            lines = lines + [extra_lines[i]]
        for j, line in enumerate(lines):
            d.text((x + 2, y + img_h + 3 + 14 * j), line, fill="black", font=font)
    canvas.save(png_path)


__all__ = ["plot_loss", "caption_grid"]
