"""Flawed ShapesWorld pictures: a scene drawn with one thing wrong, so that the oracle does not read it.

A CLIP trained on clean pictures only has to tell eight palette colours and three outlines apart; it rates what
lies between them (a brown circle as "a yellow circle", a lumpy blob as "a circle", a speckled field as "a blue
background") about as highly as the real thing, and CLIP guidance, which climbs that rating, stops there. Shown to
the CLIP as pictures that match only a null caption ("an unclear picture"), flawed pictures mark where a colour
name or a shape name ends, so guidance is pushed on to palette colours, flat fills and clean outlines.

Each flaw breaks one thing the oracle (:func:`core_clip.shapes.read`) checks:

- ``shape_color`` / ``background_color``: that colour moved off the palette (more than 50 RGB units from every
  palette colour; the oracle names colours within 30).
- ``uneven``: the shape or the background filled with a smooth colour field instead of one colour.
- ``outline``: a blob (a circle whose radius wobbles with the angle, or a stretched ellipse) in place of the shape.
- ``texture``: the clean picture under fine per-pixel noise.
- ``extra``: a second, smaller shape beside the first.

A drawn picture that the oracle still reads as its scene (a faint wobble, a field that happens to be almost
flat) is drawn again, so a flawed picture is never a true picture of any caption of its scene.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import shapes

FLAWS: tuple[str, ...] = ("shape_color", "background_color", "uneven", "outline", "texture", "extra")
_OFF_PALETTE = 50.0   # min RGB distance of an off-palette colour from every palette colour
_MAX_TRIES = 20


def off_palette_color(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random RGB colour float32 [3] in 0..255 at least 50 units from every palette colour."""
    while True:
        rgb = rng.uniform(0, 255, 3).astype(np.float32)
        if np.linalg.norm(shapes.PALETTE - rgb, axis=1).min() > _OFF_PALETTE:
            return rgb


def _smooth_field(size: int, rng: np.random.Generator, std: float) -> np.ndarray:
    """Zero-mean colour variation float32 [size, size, 3]: Gaussian values (std per channel) on a random coarse grid
    of 3 to 8 cells a side, upsampled bilinearly."""
    cells = int(rng.integers(3, 9))
    coarse = torch.from_numpy(rng.normal(0, std, (cells, cells, 3)).astype(np.float32))
    field = F.interpolate(coarse.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False)
    return field[0].permute(1, 2, 0).numpy()


def _blob(lay: shapes.Layout, area: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage float32 [size, size] of a star-shaped blob of the given area (pixels) centred at the layout's
    centroid: an ellipse of aspect 1.6-2.5 at a random angle, or a circle whose radius wobbles by 15-35% with
    2 to 5 lobes."""
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    if rng.random() < 0.5:
        aspect, tilt = rng.uniform(1.6, 2.5), rng.uniform(0, np.pi)
        radius = 1 / np.sqrt(np.cos(angles - tilt) ** 2 * aspect + np.sin(angles - tilt) ** 2 / aspect)
    else:
        lobes, depth, phase = int(rng.integers(2, 6)), rng.uniform(0.15, 0.35), rng.uniform(0, 2 * np.pi)
        radius = 1 + depth * np.cos(lobes * angles + phase)
    radius *= np.sqrt(area / (0.5 * np.mean(radius**2) * 2 * np.pi))      # polar area = 1/2 integral of r^2
    ss = 4
    at = (np.arange(size * ss) + 0.5) / ss
    dx, dy = at[None, :] - lay.cx, at[:, None] - lay.cy
    theta = np.mod(np.arctan2(dy, dx), 2 * np.pi)
    bound = np.interp(theta, np.append(angles, 2 * np.pi), np.append(radius, radius[0]))
    inside = (dx**2 + dy**2 <= bound**2).astype(np.float32)
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3))


class Flawed(NamedTuple):
    """A flawed picture: image uint8 [S, S, 3]; kind: its flaw (one of FLAWS); facts: the (attribute, value) pairs
    of its scene that still hold (a wrong background leaves "a red circle" true, a blob leaves no shape or size)."""

    image: np.ndarray
    kind: str
    facts: frozenset[tuple[str, str]]


def _draw(scene: shapes.Scene, size: int, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """One picture of ``scene`` with flaw ``kind`` and the attributes the flaw falsifies."""
    lay = shapes.layout(scene, size, rng)
    alpha = shapes.coverage(scene.shape, lay.cx, lay.cy, lay.extent, size)
    fg, bg = lay.fg, lay.bg
    if kind == "shape_color":
        return shapes.compose(alpha, off_palette_color(rng), bg), ("color",)
    if kind == "background_color":
        return shapes.compose(alpha, fg, off_palette_color(rng)), ("background",)
    if kind == "uneven":
        field = _smooth_field(size, rng, std=rng.uniform(25, 60))
        if rng.random() < 0.5:
            return shapes.compose(alpha, fg + field, bg), ("color",)
        return shapes.compose(alpha, fg, bg + field), ("background",)
    if kind == "outline":
        return shapes.compose(_blob(lay, float(alpha.sum()), size, rng), fg, bg), ("shape", "size")
    if kind == "texture":
        noise = rng.normal(0, rng.uniform(8, 25), (size, size, 3)).astype(np.float32)
        return shapes.compose(alpha, fg + noise, bg + noise), ("color", "background")
    if kind == "extra":
        other = shapes.Scene(str(rng.choice(shapes.SHAPES)),
                             str(rng.choice([c for c in shapes.COLORS if c != scene.background])), scene.background,
                             "small", str(rng.choice([p for p in shapes.POSITIONS if p != scene.position])))
        small = shapes.layout(other, size, rng)
        extra = shapes.coverage(other.shape, small.cx, small.cy, small.extent * 0.7, size)
        picture = shapes.compose(alpha, fg, bg).astype(np.float32)
        return shapes.compose(extra, small.fg, picture), ("shape", "color", "size", "position")
    raise shapes.ShapesError(f"unknown flaw {kind!r}; expected one of {FLAWS}")


def render_flawed(scene: shapes.Scene, size: int = 64, rng: np.random.Generator | None = None,
                  kind: str | None = None) -> Flawed:
    """``scene`` drawn with one flaw.

    kind: one of FLAWS, or None to draw one uniformly. Every random choice comes from ``rng`` (default: a fresh
    unseeded one). Pictures that the oracle still reads as ``scene`` (shape, colour and background all right) are
    drawn again, up to 20 times; a ShapesError says so if none of them was flawed enough.
    """
    rng = np.random.default_rng() if rng is None else rng
    if kind is None:
        kind = FLAWS[int(rng.integers(len(FLAWS)))]
    for _ in range(_MAX_TRIES):
        image, lost = _draw(scene, size, rng, kind)
        if not shapes.matches(shapes.read(image), scene):
            return Flawed(image, kind, frozenset(f for f in shapes.scene_facts(scene) if f[0] not in lost))
    raise shapes.ShapesError(f"{_MAX_TRIES} {kind} pictures of {scene} in a row were read as the scene")
