"""The per-frame identity plot (Pillow only): score per frame, frames without a face marked.

Shared by the FaceSimilarity node (shown on the node) and the `score` command (one PNG per video).
Pure drawing: the same numbers give the same pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 768, 320
MARGIN = (56, 40, 16, 40)  # left, top, right, bottom
BACKGROUND, GRID, TEXT = (255, 255, 255), (225, 225, 225), (40, 40, 40)
NO_FACE = (214, 39, 40)  # red: frames without a face
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]  # one per series


@dataclass(frozen=True)
class Series:
    """One line: a value per frame, None (or NaN) where the frame has no value."""

    label: str
    values: Sequence[float | None]


def _missing(value: float | None) -> bool:
    return value is None or not math.isfinite(value)


def plot_scores(series: Sequence[Series], title: str, no_face: Sequence[int] = (),
                frames: Sequence[int] | None = None, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """(height, width, 3) uint8 RGB chart: one line per series over the frames, y from
    min(0, lowest value) to 1, a dashed line at each series' mean, red marks under frames in
    `no_face` (positions in `frames`, which defaults to 0..n-1)."""
    count = max((len(s.values) for s in series), default=0)
    frames = list(range(count)) if frames is None else list(frames)
    finite = [v for s in series for v in s.values if not _missing(v)]
    low = min([0.0] + finite)
    low = math.floor(low * 4) / 4  # grid lines every 0.25
    left, top, right, bottom = MARGIN
    plot_w, plot_h = width - left - right, height - top - bottom
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(13)

    def x_at(position: int) -> float:
        return left + (plot_w * (position + 0.5) / max(count, 1))

    def y_at(value: float) -> float:
        return top + plot_h * (1.0 - (value - low) / (1.0 - low))

    level = low
    while level <= 1.0 + 1e-9:
        y = y_at(level)
        draw.line([(left, y), (left + plot_w, y)], fill=GRID)
        draw.text((left - 6, y), f"{level:.2f}", fill=TEXT, font=font, anchor="rm")
        level += 0.25
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=TEXT)
    step = max(1, math.ceil(count / 16))
    for position in range(0, count, step):
        draw.text((x_at(position), top + plot_h + 4), str(frames[position]), fill=TEXT, font=font, anchor="mt")
    draw.text((left, 8), title, fill=TEXT, font=font)

    missing = set(no_face)
    for position, frame in enumerate(frames):
        if frame in missing:  # a red tick under the frame and a pale band over it
            x = x_at(position)
            half = max(1.0, plot_w / max(count, 1) / 2 - 1)
            draw.rectangle([x - half, top + 1, x + half, top + plot_h - 1], fill=(251, 228, 228))
            draw.line([(x - 4, top + plot_h - 8), (x + 4, top + plot_h)], fill=NO_FACE, width=2)
            draw.line([(x - 4, top + plot_h), (x + 4, top + plot_h - 8)], fill=NO_FACE, width=2)

    legend_x = left + plot_w
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        points = [(x_at(p), y_at(v)) for p, v in enumerate(line.values) if not _missing(v)]
        values = [v for v in line.values if not _missing(v)]
        if values:
            mean_y = y_at(float(np.mean(values)))
            for x in range(left, left + plot_w, 12):
                draw.line([(x, mean_y), (min(x + 6, left + plot_w), mean_y)], fill=colour)
        # a gap where a frame has no value: consecutive frames only are joined
        run: list[tuple[float, float]] = []
        for p, v in enumerate(line.values):
            if _missing(v):
                if len(run) > 1:
                    draw.line(run, fill=colour, width=2)
                run = []
            else:
                run.append((x_at(p), y_at(v)))
        if len(run) > 1:
            draw.line(run, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        label = line.label
        legend_x -= draw.textlength(label, font=font) + 24
        draw.rectangle([legend_x, 12, legend_x + 10, 22], fill=colour)
        draw.text((legend_x + 14, 10), label, fill=TEXT, font=font)
    if missing:
        text = f"x = no face ({len(missing)})"
        draw.text((left + plot_w, height - 4), text, fill=NO_FACE, font=font, anchor="rb")
    return np.asarray(image, dtype=np.uint8).copy()
