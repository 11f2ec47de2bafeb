"""Palettes: small fixed sets of colours that a backend paints with or starts from, and the ``palette`` image loss.

A palette is a name from :data:`PALETTES` ("shapes": the 8 colours ShapesWorld draws with), a string
"#rrggbb,#rrggbb,..." or a sequence of "#rrggbb" / (r, g, b) 0-255 items; :func:`parse_palette` turns any of them
into float [M, 3] in [0, 1].
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from core_clip import shapes

from .errors import ClipguideError
from .losses import IMAGE_LOSSES, check_images

# Named fixed palettes, RGB 0-255. "shapes": the 8 colours ShapesWorld draws with.
PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "shapes": tuple(shapes.COLORS.values()),
}

PaletteLike = Union[str, Sequence[Union[str, Sequence[int]]]]


def _colour(item) -> tuple[int, int, int]:
    """"#rrggbb" / "rrggbb" or an (r, g, b) triple of integers 0-255 -> (r, g, b)."""
    if isinstance(item, str):
        if not re.fullmatch(r"#?[0-9a-fA-F]{6}", item.strip()):
            raise ClipguideError(f"palette colour {item!r} is not #rrggbb")
        code = item.strip().lstrip("#")
        return tuple(int(code[i:i + 2], 16) for i in (0, 2, 4))
    if (not isinstance(item, Sequence) or len(item) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in item)):
        raise ClipguideError(f"palette colour {item!r} is neither #rrggbb nor three integers 0-255")
    return tuple(item)


def parse_palette(palette: PaletteLike) -> Tensor:
    """A palette name (:data:`PALETTES`), "#rrggbb,#rrggbb,..." or a sequence of "#rrggbb" / (r, g, b) 0-255 items
    -> float [M, 3] in [0, 1], M >= 2 distinct colours. ClipguideError names a bad item or an unknown name."""
    if isinstance(palette, str):
        if palette in PALETTES:
            palette = PALETTES[palette]
        elif "#" in palette or "," in palette:
            palette = [p for p in palette.split(",") if p.strip()]
        else:
            raise ClipguideError(f"unknown palette {palette!r}; named palettes: {', '.join(sorted(PALETTES))} "
                                 f"(or give colours as '#rrggbb,#rrggbb,...')")
    colours = list(dict.fromkeys(_colour(c) for c in palette))
    if len(colours) < 2:
        raise ClipguideError(f"a palette needs at least 2 distinct colours, got {len(colours)}")
    return torch.tensor(colours, dtype=torch.float32) / 255


@dataclass(frozen=True)
class PaletteLoss:
    """Mean over pixels of the squared RGB distance from each pixel to its nearest palette colour.

    Per image ``x [3, H, W]`` and palette colours ``p_1 .. p_M``::

        palette = sum_{i, j} min_m ||x[:, i, j] - p_m||^2 / (H * W)

    0 exactly for a picture of palette colours only; at most 3. Its gradient pulls every pixel straight towards its
    nearest colour, so it holds colours that the picture already has (a backend started from palette colours, say)
    instead of choosing them: from a picture far from every palette colour it snaps regions to whichever is nearest.
    Edges between two palette colours cost a little, in proportion to their width.

    ``images [B, 3, H, W]`` floating, in [0, 1] -> ``[B]``, ``>= 0``.
    """

    palette: PaletteLike = "shapes"

    def __post_init__(self):
        parse_palette(self.palette)  # a bad palette fails at registration, not at the first step

    def __call__(self, images: Tensor) -> Tensor:
        check_images(images)
        colours = parse_palette(self.palette).to(images)                           # [M, 3]
        distances = (images[:, None] - colours[None, :, :, None, None]).pow(2).sum(dim=2)   # [B, M, H, W]
        return distances.min(dim=1).values.mean(dim=(1, 2))


IMAGE_LOSSES.register("palette")(PaletteLoss())
