"""``vqgan``: CLIP steers the continuous latents of a taming-transformers VQGAN (VQGAN+CLIP).

The parameters are latents z [B, D, H/f, W/f]; each decode snaps them to their nearest codebook entries with a
straight-through gradient, runs the VQGAN decoder, and maps [-1, 1] to [0, 1]. After every step z is clamped to the
codebook's per-channel range, so it never drifts where no code is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import nn

from ..errors import ClipguideError
from .base import GENERATORS, OptimisedGenerator, check_init, check_size, clamp_with_grad

if TYPE_CHECKING:
    from ..vqgan_model import VQGAN


STARTS = ("codes", "flat")


@GENERATORS.register("vqgan")
class VQGANGenerator(OptimisedGenerator):
    """Latents of ``model`` (a shipped VQGAN name such as "shapes", or a .safetensors path with its .json).

    Args:
        batch, height, width: output images [batch, 3, height, width]; height and width must be multiples of the
            VQGAN's downsampling factor f.
        generator: draws the random start when there is no init.
        init: optional float [1 or B, 3, H, W] in [0, 1], encoded to start from.
        start: the random start without an init: "codes" (a uniformly random code at every latent position, the
            VQGAN+CLIP scripts' start) or "flat" (the encoding of a picture of one random colour per image, uniform
            in RGB: guidance paints onto one field instead of clearing a mosaic). The VQGAN renders that colour as
            well as its codes allow; the shipped ShapesWorld VQGAN, which knows its 8 palette colours, renders
            others as a tinted, faintly textured field.
        model: the VQGAN to steer: a name or path for :func:`clipguide.vqgan_model.load_vqgan`, or a VQGAN (frozen).
        lr: Adam learning rate on the latents.
    """

    def __init__(self, batch: int, height: int, width: int, *, generator: torch.Generator,
                 init: Optional[torch.Tensor] = None, model: Union[str, "VQGAN"] = "shapes", lr: float = 0.1,
                 start: str = "codes"):
        from ..vqgan_model import VQGAN, load_vqgan  # taming is imported only when this backend is used

        super().__init__()
        check_size(batch, height, width)
        check_init(init, batch, height, width)
        if start not in STARTS:
            raise ClipguideError(f"vqgan start must be one of {', '.join(STARTS)}, got {start!r}")
        device = generator.device
        self.vqgan = model.to(device).eval().requires_grad_(False) if isinstance(model, VQGAN) else load_vqgan(
            model, device=device)
        f = self.vqgan.config.factor
        if height % f or width % f:
            raise ClipguideError(f"vqgan output size must be a multiple of {f} (its downsampling factor), "
                                 f"got {width}x{height}")
        codes = self.vqgan.codebook.detach()
        if init is None and start == "flat":
            colour = torch.rand(batch, 3, 1, 1, generator=generator, device=device)
            init = colour.expand(batch, 3, height, width)
        if init is None:
            index = torch.randint(len(codes), (batch, height // f, width // f), generator=generator, device=device)
            z = codes[index].permute(0, 3, 1, 2)
        else:
            with torch.no_grad():
                z = self.vqgan.encode(init.to(device).float() * 2 - 1).expand(batch, -1, -1, -1)
        self.z = nn.Parameter(z.contiguous())
        self.register_buffer("z_min", codes.min(dim=0).values.view(1, -1, 1, 1))
        self.register_buffer("z_max", codes.max(dim=0).values.view(1, -1, 1, 1))
        self.lr = lr

    def shared_options(self) -> dict:
        """The loaded (frozen) VQGAN, for another instance to steer."""
        return {"model": self.vqgan}

    def decode(self) -> torch.Tensor:
        z_q = self.vqgan.quantize_st(self.z)[0]
        # the decoder runs under bf16 autocast on CUDA (code lookup stays fp32: argmin over near-equal distances)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.z.device.type == "cuda"):
            x = self.vqgan.decode(z_q)
        return clamp_with_grad((x.float() + 1) / 2)

    def constrain(self) -> None:
        self.z.clamp_(self.z_min, self.z_max)
