"""``pixels``: the image's colours are the parameters, optionally on a coarser grid and from a small palette."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipguideError
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

    Free RGB (``colors=None``): parameters [B, 3, h, w] are the colours.

    Palette (``colors=K``): K colour parameters [B, K, 3] per image and K logits [B, K, h, w] per grid cell; the
    logits are upsampled and each output pixel takes the softmax(sharpness * logits) mix of the K colours. Edges
    between regions stay crisp at any grid size and every region is one flat colour, which is what a poster, a
    logo or a ShapesWorld picture is made of; a CLIP cannot hide texture in it.

    Args:
        batch, height, width: output images [batch, 3, height, width].
        generator: draws the random start when there is no ``init``.
        init: optional float [1 or B, 3, H, W] in [0, 1] to start from (area-downsampled to the grid; with a
            palette, the colours are its k-means centres and each cell starts on its nearest centre).
        resolution: the grid's shorter side (None: full resolution). A coarse grid cannot hold pixel-level texture.
        colors: palette size K, or None for free RGB.
        sharpness: how hard each pixel chooses among the palette (the softmax's inverse temperature).
        lr: Adam learning rate (the logits are scaled by ``sharpness``, so in softmax units they move that many
            times further per step than the colours do).
    """

    def __init__(self, batch: int, height: int, width: int, *, generator: torch.Generator,
                 init: Optional[torch.Tensor] = None, resolution: Optional[int] = 16, colors: Optional[int] = None,
                 sharpness: float = 10.0, lr: float = 0.05):
        super().__init__()
        check_size(batch, height, width)
        check_init(init, batch, height, width)
        if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
            raise ClipguideError(f"pixels resolution must be a positive integer or None, got {resolution!r}")
        if colors is not None and (not isinstance(colors, int) or colors < 2):
            raise ClipguideError(f"pixels colors must be an integer >= 2 or None, got {colors!r}")
        if not sharpness > 0:
            raise ClipguideError(f"pixels sharpness must be > 0, got {sharpness}")
        self.size = (height, width)
        self.sharpness = sharpness
        self.lr = lr
        grid = _grid(height, width, resolution)
        device = generator.device
        start = None if init is None else F.interpolate(init.to(device).float(), size=grid, mode="area")
        if colors is None:
            if start is None:
                start = 0.5 + 0.1 * torch.randn(batch, 3, *grid, generator=generator, device=device)
            self.rgb = nn.Parameter(start.expand(batch, -1, -1, -1).contiguous())
            self.palette = self.logits = None
            return
        self.rgb = None
        if start is None:
            palette = torch.rand(batch, colors, 3, generator=generator, device=device)
            logits = torch.randn(batch, colors, *grid, generator=generator, device=device)
        else:
            cells = start[0].flatten(1).T                                       # [h * w, 3]
            palette = _kmeans(cells, colors, generator)[None].expand(batch, -1, -1)
            nearest = torch.cdist(cells, palette[0]).argmin(dim=1)
            logits = F.one_hot(nearest, colors).T.reshape(1, colors, *grid).float().expand(batch, -1, -1, -1)
        self.palette = nn.Parameter(palette.contiguous())
        self.logits = nn.Parameter(logits.contiguous())

    def decode(self) -> torch.Tensor:
        if self.rgb is not None:
            x = self.rgb
            if tuple(x.shape[-2:]) != self.size:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
            return clamp_with_grad(x)
        logits = F.interpolate(self.logits, size=self.size, mode="bilinear", align_corners=False)
        weights = (self.sharpness * logits).softmax(dim=1)                      # [B, K, H, W]
        return torch.einsum("bkhw,bkc->bchw", weights, clamp_with_grad(self.palette))
