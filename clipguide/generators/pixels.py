"""``pixels``: the image's colours are the parameters, optionally on a coarser grid and from a small palette."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipguideError
from ..palettes import PaletteLike, parse_palette
from .base import GENERATORS, OptimisedGenerator, check_init, check_size, clamp_with_grad


def _grid(height: int, width: int, resolution: Optional[int]) -> tuple[int, int]:
    """Parameter grid for an output of height x width whose shorter side gets ``resolution`` cells (None: full)."""
    if resolution is None or resolution >= min(height, width):
        return height, width
    scale = resolution / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _kmeans(pixels: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 10) -> torch.Tensor:
    """k colour centres [k, 3] of pixels [N, 3] (Lloyd's algorithm from k distinct random pixels)."""
    centres = pixels[torch.randperm(len(pixels), generator=generator, device=pixels.device)[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(pixels, centres).argmin(dim=1)
        for j in range(k):
            members = pixels[assign == j]
            if len(members):
                centres[j] = members.mean(dim=0)
    return centres


@GENERATORS.register("pixels")
class Pixels(OptimisedGenerator):
    """Direct colour parameters on a grid, bilinearly upsampled to [B, 3, H, W].

    Free RGB (``colors=None``, ``palette=None``): parameters [B, 3, h, w] are the colours.

    Regions (``colors=K``): K colours per image and K logits [B, K, h, w] per grid cell; the logits are upsampled
    and each output pixel takes the softmax(sharpness * logits) mix of the K colours. Edges between regions stay
    crisp at any grid size and every region is one flat colour, which is what a poster, a logo or a ShapesWorld
    picture is made of; a CLIP cannot hide texture in it. The K colours are free parameters [B, K, 3], unless a
    fixed ``palette`` is given:

    Fixed palette (``palette=``): every colour comes from the palette's M colours. With ``colors=K`` each of the K
    regions chooses its colour among them (choice logits [B, K, M]; the choice is a softmax whose sharpness grows
    geometrically from ``choice_sharpness[0]`` to ``[1]`` over the run, so it starts as a blend the gradient can
    move and ends committed); with ``colors=None`` the regions are the M palette colours themselves. The final
    images make every choice hard (each region's most likely colour, each pixel's most likely region), so they hold
    palette colours only. A CLIP trained on a few flat colours rates colours between them almost as highly as its
    own; a fixed palette keeps guidance off them.

    Args:
        batch, height, width: output images [batch, 3, height, width].
        generator: draws the random start when there is no ``init``.
        init: optional float [1 or B, 3, H, W] in [0, 1] to start from (area-downsampled to the grid; with regions,
            the colours are its k-means centres, snapped to the nearest palette colour when there is one, and each
            cell starts on its nearest centre). A region's snapped palette colour is its likeliest choice, not a
            fixed one: guidance can recolour it.
        resolution: the grid's shorter side (None: full resolution). A coarse grid cannot hold pixel-level texture.
        colors: number of regions K, or None (free RGB, or one region per palette colour).
        palette: fixed colours: a name from :data:`~clipguide.palettes.PALETTES` ("shapes"), "#rrggbb,#rrggbb,...",
            or a sequence of "#rrggbb" / (r, g, b) 0-255 items.
        sharpness: how hard each pixel chooses among the regions (the softmax's inverse temperature).
        choice_sharpness: (start, end) inverse temperature of each region's choice of palette colour.
        lr: Adam learning rate (the logits are scaled by ``sharpness``, so in softmax units they move that many
            times further per step than the colours do).
    """

    def __init__(self, batch: int, height: int, width: int, *, generator: torch.Generator,
                 init: Optional[torch.Tensor] = None, resolution: Optional[int] = 16, colors: Optional[int] = None,
                 palette: Optional[PaletteLike] = None, sharpness: float = 10.0,
                 choice_sharpness: Sequence[float] = (2.0, 40.0), lr: float = 0.05):
        super().__init__()
        check_size(batch, height, width)
        check_init(init, batch, height, width)
        if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
            raise ClipguideError(f"pixels resolution must be a positive integer or None, got {resolution!r}")
        if colors is not None and (not isinstance(colors, int) or colors < 2):
            raise ClipguideError(f"pixels colors must be an integer >= 2 or None, got {colors!r}")
        if not sharpness > 0:
            raise ClipguideError(f"pixels sharpness must be > 0, got {sharpness}")
        if (not isinstance(choice_sharpness, Sequence) or len(choice_sharpness) != 2
                or not all(isinstance(v, (int, float)) and 0 < v < math.inf for v in choice_sharpness)):
            raise ClipguideError(f"pixels choice_sharpness must be (start, end), both > 0, got {choice_sharpness!r}")
        self.size = (height, width)
        self.sharpness = sharpness
        self.choice_schedule = tuple(float(v) for v in choice_sharpness)
        self.lr = lr
        grid = _grid(height, width, resolution)
        device = generator.device
        # a tensor, not a float: a compiled decode() reads it instead of being specialised on each step's value
        self.register_buffer("choice_sharpness", torch.tensor(self.choice_schedule[0], device=device))
        start = None if init is None else F.interpolate(init.to(device).float(), size=grid, mode="area")
        self.rgb = self.palette = self.logits = self.choice = None
        self.register_buffer("fixed", None if palette is None else parse_palette(palette).to(device))
        if colors is None and self.fixed is None:
            if start is None:
                start = 0.5 + 0.1 * torch.randn(batch, 3, *grid, generator=generator, device=device)
            self.rgb = nn.Parameter(start.expand(batch, -1, -1, -1).contiguous())
            return
        regions = len(self.fixed) if colors is None else colors
        if start is None:
            if colors is not None and self.fixed is None:
                self.palette = nn.Parameter(torch.rand(batch, colors, 3, generator=generator, device=device))
            elif colors is not None:
                choice = 0.1 * torch.randn(batch, colors, len(self.fixed), generator=generator, device=device)
                self.choice = nn.Parameter(choice)
            logits = torch.randn(batch, regions, *grid, generator=generator, device=device)
        else:
            cells = start[0].flatten(1).T                                       # [h * w, 3]
            centres = self.fixed if colors is None else _kmeans(cells, colors, generator)
            if colors is not None and self.fixed is not None:
                nearest_colour = torch.cdist(centres, self.fixed).argmin(dim=1)
                centres = self.fixed[nearest_colour]
                # the snapped colour leads by 2 logits: at the default starting sharpness (2) it holds 89% of an
                # 8-colour blend, and the choice is far from saturated, so the prompt can still recolour a region
                choice = 2.0 * F.one_hot(nearest_colour, len(self.fixed)).float()
                self.choice = nn.Parameter(choice[None].expand(batch, -1, -1).contiguous())
            elif colors is not None:
                self.palette = nn.Parameter(centres[None].expand(batch, -1, -1).contiguous())
            nearest = torch.cdist(cells, centres).argmin(dim=1)
            logits = F.one_hot(nearest, regions).T.reshape(1, regions, *grid).float().expand(batch, -1, -1, -1)
        self.logits = nn.Parameter(logits.contiguous())

    def _colours(self) -> torch.Tensor:
        """Region colours [B or 1, K, 3] in [0, 1]."""
        if self.fixed is None:
            return clamp_with_grad(self.palette)
        if self.choice is None:
            return self.fixed[None]
        return (self.choice_sharpness * self.choice).softmax(dim=-1) @ self.fixed

    def _region_logits(self) -> torch.Tensor:
        return F.interpolate(self.logits, size=self.size, mode="bilinear", align_corners=False)

    def decode(self) -> torch.Tensor:
        if self.rgb is not None:
            x = self.rgb
            if tuple(x.shape[-2:]) != self.size:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
            return clamp_with_grad(x)
        weights = (self.sharpness * self._region_logits()).softmax(dim=1)       # [B, K, H, W]
        return torch.einsum("bkhw,bkc->bchw", weights, self._colours().expand(len(weights), -1, -1))

    def anneal(self, progress: float) -> None:
        start, end = self.choice_schedule
        self.choice_sharpness.fill_(start * (end / start) ** progress)

    def finish(self) -> torch.Tensor:
        if self.fixed is None:
            return self.decode()
        colours = self.fixed[None] if self.choice is None else self.fixed[self.choice.argmax(dim=-1)]  # [B/1, K, 3]
        region = F.one_hot(self._region_logits().argmax(dim=1), colours.shape[1]).to(colours.dtype)  # [B, H, W, K]
        return torch.einsum("bhwk,bkc->bchw", region, colours.expand(len(region), -1, -1))
