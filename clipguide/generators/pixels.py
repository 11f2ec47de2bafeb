"""``pixels``: the image's RGB values are the parameters, optionally on a coarser grid that is upsampled."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipguideError
from .base import GENERATORS, OptimisedGenerator, check_init, check_size, clamp_with_grad


@GENERATORS.register("pixels")
class Pixels(OptimisedGenerator):
    """Direct RGB parameters [B, 3, h, w], bilinearly upsampled to [B, 3, H, W] when ``resolution`` is set.

    Args:
        batch, height, width: output images [batch, 3, height, width].
        generator: draws the random start (a grey field with small noise) when there is no ``init``.
        init: optional float [1 or B, 3, H, W] in [0, 1] to start from (area-downsampled to the parameter grid).
        resolution: parameter grid's shorter side (None: full resolution). A coarse grid cannot hold the pixel-level
            texture that fools a CLIP, so its optimum is a picture rather than an adversarial pattern.
        lr: Adam learning rate.
    """

    def __init__(self, batch: int, height: int, width: int, *, generator: torch.Generator,
                 init: Optional[torch.Tensor] = None, resolution: Optional[int] = 16, lr: float = 0.05):
        super().__init__()
        check_size(batch, height, width)
        check_init(init, batch, height, width)
        if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
            raise ClipguideError(f"pixels resolution must be a positive integer or None, got {resolution!r}")
        self.size = (height, width)
        scale = 1.0 if resolution is None else min(1.0, resolution / min(height, width))
        grid = (max(1, round(height * scale)), max(1, round(width * scale)))
        device = generator.device
        if init is None:
            start = 0.5 + 0.1 * torch.randn(batch, 3, *grid, generator=generator, device=device)
        else:
            start = F.interpolate(init.to(device).float(), size=grid, mode="area").expand(batch, -1, -1, -1)
        self.rgb = nn.Parameter(start.contiguous())
        self.lr = lr

    def decode(self) -> torch.Tensor:
        x = self.rgb
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return clamp_with_grad(x)
