"""``diffusion_prior``: an image loss that pulls a picture towards what a pixel-space diffusion model makes of it.

CLIP guidance of free parameters (``pixels``, ``fourier``, ``vqgan``) has nothing that says what a picture of the
domain looks like: a small CLIP rates blobs, fringes and colour fields as highly as a clean shape. A denoiser knows.
For each image x (resized to the model's size, in its [-1, 1] units) this loss draws a timestep t from
``t_range`` and noise e, forms x_t = sqrt(a_t) x + sqrt(1 - a_t) e, and asks the model for its clean estimate
x0(x_t); averaged over ``copies`` draws, the loss is

    mean over pixels of (x - stop_gradient(x0))^2

so its gradient, 2 (x - x0) / N, is score distillation (DreamFusion's SDS, written in x0 form): at low noise the
model still sees what is drawn and moves only what it takes for noise, an edge off its two colours' blend, a fill
that is not flat, a stray blob. The value is how far the picture is from the model's reading of it. The model sees
the picture resized to its own size (area-averaged when larger): detail that averages out within one of its pixels is
invisible to it, so pair it with a parameterisation no finer than that (``pixels`` on a 16-cell grid, say).

    guide("a red circle on a blue background", backend="pixels",
          backend_options={"colors": 2, "palette": "shapes"}, regularisers={"border": 5, "diffusion_prior": 20})

The registered ``diffusion_prior`` uses the shipped ``shapes`` model (``diffusion_prior_deep`` the same with
``t_range=(0.01, 0.2)``); another pixel-space model or other settings
are one registration away::

    IMAGE_LOSSES.register("my_prior")(DiffusionPrior(model="path/to/pipeline", t_range=(0.02, 0.2)))

Its draws come from the ``generator`` that :class:`clipguide.CLIPGuidance` passes to stochastic image losses, so a
seed reproduces the run.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .diffusion import predict_x0
from .errors import ClipguideError
from .generators.diffusion import DiffusionModel, _whole, load_diffusion
from .losses import IMAGE_LOSSES, check_images


@functools.lru_cache(maxsize=4)
def _cached(model: Union[str, os.PathLike], device: str) -> DiffusionModel:
    return load_diffusion(model, device)


def pixel_model(model: Union[str, os.PathLike, DiffusionModel], device: torch.device) -> DiffusionModel:
    """The model on ``device`` (names and folders are loaded once per device); ClipguideError for a latent model."""
    loaded = load_diffusion(model, device) if isinstance(model, DiffusionModel) else _cached(model, str(device))
    if loaded.vae is not None:
        raise ClipguideError("a diffusion prior or denoise judge needs a pixel-space diffusion model, got a latent "
                             f"one (with a {type(loaded.vae).__name__})")
    return loaded


@dataclass(frozen=True)
class DiffusionPrior:
    """Score-distillation image loss of a pixel-space diffusion model (see the module docstring).

    Attributes:
        model: a shipped diffusion model name, a local diffusers pipeline folder or a
            :class:`~clipguide.generators.diffusion.DiffusionModel`, in pixel space (no vae).
        t_range: (low, high) fractions of the model's training timesteps to draw t from, 0 <= low < high <= 1. Low
            noise keeps what the picture shows and cleans its details; high noise redraws it.
        copies: noise draws per image and call, averaged (less variance, ``copies`` times the UNet work).
    """

    model: Union[str, os.PathLike, DiffusionModel] = "shapes"
    t_range: tuple[float, float] = (0.01, 0.1)
    copies: int = 2

    def __post_init__(self):
        pair = isinstance(self.t_range, (tuple, list)) and len(self.t_range) == 2
        if not pair or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.t_range):
            raise ClipguideError(f"diffusion_prior t_range must be two numbers (low, high), got {self.t_range!r}")
        low, high = self.t_range
        if not 0 <= low < high <= 1:
            raise ClipguideError(f"diffusion_prior t_range needs 0 <= low < high <= 1, got {self.t_range}")
        _whole("diffusion_prior copies", self.copies, 1)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """images [B, 3, H, W] in [0, 1] (differentiable) -> [B] mean squared distance, in the model's [-1, 1]
        units, of each image from the model's x0 estimates of its noised copies (the estimates carry no gradient).
        Resized by area averaging (or bilinearly, when smaller) to the model's native size."""
        check_images(images)
        model = pixel_model(self.model, images.device)
        x = to_model_pixels(images, model)
        batch = len(x)
        with torch.no_grad():
            t = draw_timesteps(model, self.t_range, self.copies * batch, generator, x.device)
            clean = x.detach().float().repeat(self.copies, 1, 1, 1)
            noise = torch.randn(clean.shape, generator=generator, device=x.device)
            x0 = estimate_x0(model, clean, t, noise).view(self.copies, batch, *x.shape[1:]).mean(0).to(x.dtype)
        return (x - x0).pow(2).mean(dim=(1, 2, 3))


def to_model_pixels(images: Tensor, model: DiffusionModel) -> Tensor:
    """images [B, 3, H, W] in [0, 1] -> [B, 3, h, w] in [-1, 1] at the model's native size (area-averaged when
    larger, bilinear when smaller); differentiable."""
    width, height = model.native_size
    mode = "area" if images.shape[2] >= height and images.shape[3] >= width else "bilinear"
    return F.interpolate(images, size=(height, width), mode=mode) * 2 - 1


def draw_timesteps(model: DiffusionModel, t_range: tuple[float, float], n: int, generator: torch.Generator,
                   device: torch.device) -> Tensor:
    """n timesteps [n] drawn uniformly from the ``t_range`` fractions of the model's training timesteps."""
    steps = len(model.scheduler.alphas_cumprod)
    low = int(t_range[0] * (steps - 1))
    high = max(int(t_range[1] * (steps - 1)), low + 1)     # at least one timestep to draw
    return torch.randint(low, high, (n,), generator=generator, device=device)


def estimate_x0(model: DiffusionModel, clean: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """The model's x0 estimate [N, 3, h, w] (float32, clamped to [-1, 1]) of ``clean`` [N, 3, h, w] in [-1, 1]
    noised with ``noise`` to timesteps ``t`` [N]; no gradient."""
    with torch.no_grad():
        a = model.scheduler.alphas_cumprod.to(clean.device, torch.float32)[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * clean + (1 - a).sqrt() * noise
        out = model.unet(x_t.to(model.unet.dtype), t).sample.float()
        return predict_x0(out, x_t, a, model.scheduler.config.prediction_type).clamp(-1, 1)


IMAGE_LOSSES.register("diffusion_prior")(DiffusionPrior())
# The shapes/vqgan recipe's prior, measured only as part of that recipe (README, "Quality today").
IMAGE_LOSSES.register("diffusion_prior_deep")(DiffusionPrior(t_range=(0.01, 0.2)))
