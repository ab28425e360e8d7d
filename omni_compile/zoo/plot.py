"""Small PIL-only figures (no matplotlib needed): the loss curve and captioned image grids."""

from __future__ import annotations

import csv
import math
from typing import List, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font():
    return ImageFont.load_default()


def plot_loss(csv_path: str, png_path: str, title: str = "training loss", width: int = 720, height: int = 420) -> None:
    """Loss (log scale) vs step from ``loss.csv`` (columns ``step``, ``loss``)."""
    steps, losses = [], []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row["loss"] and math.isfinite(float(row["loss"])) and float(row["loss"]) > 0:
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    left, right, top, bottom = 70, 20, 30, 45
    d.text((left, 8), title, fill="black", font=font)
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    d.rectangle([x0, y0, x1, y1], outline="black")
    if len(steps) >= 1:
        lmin, lmax = math.log10(min(losses)), math.log10(max(losses))
        if lmax - lmin < 1e-6:
            lmin, lmax = lmin - 0.5, lmax + 0.5
        smax = max(max(steps), 1)
        sx = lambda s: x0 + (x1 - x0) * s / smax  # noqa: E731
        sy = lambda v: y1 - (y1 - y0) * (math.log10(v) - lmin) / (lmax - lmin)  # noqa: E731
        # y grid at decades and halves
        for e in range(math.floor(lmin), math.ceil(lmax) + 1):
            for m in (1, 2, 5):
                v = m * 10 ** e
                if lmin <= math.log10(v) <= lmax:
                    y = sy(v)
                    d.line([x0, y, x1, y], fill=(225, 225, 225))
                    d.text((5, y - 6), f"{v:g}", fill="black", font=font)
        for i in range(6):
            s = smax * i / 5
            d.text((sx(s) - 10, y1 + 6), f"{int(s)}", fill="black", font=font)
        pts = [(sx(s), sy(v)) for s, v in zip(steps, losses)]
        if len(pts) > 1:
            d.line(pts, fill=(31, 119, 180), width=2)
        else:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=(31, 119, 180))
    d.text(((x0 + x1) // 2 - 15, height - 18), "step", fill="black", font=font)
    d.text((5, y0 - 20), "loss (log)", fill="black", font=font)
    img.save(png_path)


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
