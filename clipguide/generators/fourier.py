"""``fourier``: images parameterised by their 2-D spectrum in a decorrelated colour space (Olah et al., "Feature
Visualization", Distill 2017).

The image is ``sigmoid(C @ irfft2(spectrum * scale))`` where ``scale`` falls off as 1/f^decay, so Adam's equal
step size per coefficient becomes a natural-image-like 1/f prior, and ``C`` maps decorrelated channels to RGB using
the square root of natural images' RGB covariance, so a step moves luminance and colour independently.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ClipguideError
from .base import GENERATORS, OptimisedGenerator, check_init, check_size

# Square root of the RGB covariance of natural images (ImageNet), as used by Lucid; columns scaled to unit max norm.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                            [0.27, 0.00, -0.05],
                            [0.27, -0.09, 0.03]])
COLOR_CORRELATION = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


def _frequencies(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Radial frequency [height, width // 2 + 1] in cycles per pixel, matching ``torch.fft.rfft2``'s layout."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    return (fy ** 2 + fx ** 2).sqrt()


@GENERATORS.register("fourier")
class Fourier(OptimisedGenerator):
    """Spectrum parameters [B, 3, H, W // 2 + 1] (complex as a trailing real pair) -> images [B, 3, H, W] in (0, 1).

    Args:
        batch, height, width: output images [batch, 3, height, width].
        generator: draws the random start (small Gaussian spectrum) when there is no ``init``.
        init: optional float [1 or B, 3, H, W] in [0, 1]: the spectrum is set so that decode() returns it (values are
            clipped to [0.001, 0.999] first, where the sigmoid is invertible).
        decay: exponent of the 1/f^decay amplitude scaling (0: white, 1: natural-image-like).
        lr: Adam learning rate.
    """

    def __init__(self, batch: int, height: int, width: int, *, generator: torch.Generator,
                 init: Optional[torch.Tensor] = None, decay: float = 1.0, lr: float = 0.1):
        super().__init__()
        check_size(batch, height, width)
        check_init(init, batch, height, width)
        if not decay >= 0:
            raise ClipguideError(f"fourier decay must be >= 0, got {decay}")
        device = generator.device
        self.size = (height, width)
        freq = _frequencies(height, width, device).clamp(min=1.0 / max(height, width))
        # 1 at the lowest frequency times sqrt(H * W) / 4: with the orthonormal FFT a unit step of a low-frequency
        # coefficient then moves the logits by about as much as a unit step of a pixel would (Lucid's scaling).
        amplitude = (freq * max(height, width)) ** -decay * (height * width) ** 0.5 / 4
        self.register_buffer("scale", amplitude[..., None])
        self.register_buffer("color", COLOR_CORRELATION.to(device))
        if init is None:
            spectrum = 0.01 * torch.randn(batch, 3, height, width // 2 + 1, 2, generator=generator, device=device)
        else:
            spectrum = self._spectrum_of(init.to(device).float()).expand(batch, -1, -1, -1, -1)
        self.spectrum = nn.Parameter(spectrum.contiguous())
        self.lr = lr

    def _spectrum_of(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.logit(images.clamp(0.001, 0.999))
        decorrelated = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.color), logits)
        spectrum = torch.view_as_real(torch.fft.rfft2(decorrelated, norm="ortho"))
        return spectrum / self.scale

    def decode(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum * self.scale)
        decorrelated = torch.fft.irfft2(spectrum, s=self.size, norm="ortho")
        return torch.sigmoid(torch.einsum("ij,bjhw->bihw", self.color, decorrelated))
