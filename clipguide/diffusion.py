"""CLIP guidance on a diffusion model's output, for any diffusers UNet and any scheduler with a noise table.

Guidance wraps the denoiser rather than the sampler (as k-diffusion does): at every UNet call the wrapper estimates
x0 from the UNet's output, decodes it to an image in [0, 1] (pixel models directly, latent models through their VAE
or VQ decoder), computes the clipguide loss, and corrects the output by the loss gradient with respect to the
UNet's input x_t. In the UNet's own (variance-preserving) frame,

    x_t = sqrt(a) * x0 + sqrt(1 - a) * eps,   v = sqrt(a) * eps - sqrt(1 - a) * x0,   a = alpha_bar(t),

and with g = -scale * dL/dx_t (the classifier-guidance score) the corrected outputs are

    epsilon:       eps - sqrt(1 - a) * g
    v_prediction:  v   - sqrt(1 - a) / sqrt(a) * g
    sample:        x0  + (1 - a) / sqrt(a) * g

which all move the x0 estimate by the same (1 - a) / sqrt(a) * g. Because only the model output changes, every
scheduler works unchanged, multistep ones included, and so does classifier-free guidance: the same correction is
added to both halves of the CFG batch, so it survives ``uncond + w * (cond - uncond)``.

Two ways in:
- :func:`attach` hooks a stock diffusers pipeline (DDPMPipeline, DDIMPipeline, StableDiffusionPipeline, ...) and
  returns a handle whose ``detach()`` undoes it.
- ``guide(..., backend="diffusion")`` runs clipguide's own sampling loop (clipguide/generators/diffusion.py) on the
  same wrapper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ClipguideError, GuidanceError
from .generators.base import clamp_with_grad
from .guidance import CLIPGuidance

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class DiffusionGuidanceConfig:
    """How CLIP steers a denoiser.

    Attributes:
        scale: multiplies the loss gradient (g = -scale * dL/dx_t). 0 turns guidance off (the UNet's output is
            returned untouched).
        grad_clamp: if set, the RMS of g per image is clamped to this value, so one noisy gradient cannot throw the
            sample off its manifold.
        x0_clamp: if set, the RMS per image of how far one guided call moves the x0 estimate, (1 - a) / sqrt(a) * g
            in the model's sample units ([-1, 1] pixels, or latents), is clamped to this value. At the noisiest
            steps that factor is about 30 (alpha_bar ~ 1e-3), so an ordinary gradient throws x0 across the colour
            space: unclamped, the shipped model's x0 estimates moved by an RMS of up to 180 per call in the first
            steps (still 1-60 a fifth of the way in) and jumped between palette colours from one step to the
            next. 1 bounds those jumps and leaves the later steps (moves well below 1) alone.
        start, end: guide only while the sampling progress 1 - t / (T - 1) lies in [start, end] (0 = pure noise,
            1 = clean), e.g. start=0.2 leaves the first fifth of the noise levels alone. By 0.6 (the default end)
            the layout and colours are settled: a guided call there moves x0 by an RMS of about 0.005 on the shipped
            model, and guiding the last 40% of 50 DDPM steps cost 4.7 s of 14 per picture on a 2-core CPU.
        through_unet: back-propagate through the UNet (the exact gradient of the loss of x0(x_t)); False treats the
            model output as constant (dx0/dx_t = 1/sqrt(a)), which costs no UNet backward pass.
        checkpointing: gradient checkpointing in the UNet and the VAE while guided (less memory, more compute).
        decode_scale: in (0, 1]: guidance decodes x0 area-averaged to this fraction of its height and width (latent
            models: fewer latents into the VAE decoder; pixel models: a smaller picture), so the decode and its
            backward cost about ``decode_scale ** 2`` as much. At 512 px, the decoder's backward is most of what a
            guided Stable Diffusion step adds; 0.5 decodes 32 x 32 latents into a 256 px picture, still larger than
            ViT-B/32's 224 px cutouts. The gradient still reaches every latent. 1 decodes at full size.
    """

    scale: float = 300.0
    grad_clamp: Optional[float] = None
    x0_clamp: Optional[float] = 1.0
    start: float = 0.0
    end: float = 0.6
    through_unet: bool = True
    checkpointing: bool = False
    decode_scale: float = 1.0

    def __post_init__(self):
        if not (self.scale >= 0):
            raise ClipguideError(f"guidance scale must be >= 0, got {self.scale}")
        for name in ("grad_clamp", "x0_clamp"):
            value = getattr(self, name)
            if value is not None and not (value > 0):
                raise ClipguideError(f"{name} must be positive or None, got {value}")
        if not (0 < self.decode_scale <= 1):
            raise ClipguideError(f"decode_scale must be in (0, 1], got {self.decode_scale}")
        if not (0 <= self.start <= self.end <= 1):
            raise ClipguideError(f"guided steps need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")


# ----------------------------------------------------------------------------------------------- noise-table maths

def check_scheduler(scheduler: Any) -> str:
    """The scheduler's prediction type, after checking that clipguide can estimate x0 under it.

    Raises ClipguideError for a scheduler without a discrete noise table (``alphas_cumprod``) or with a prediction
    type other than epsilon / v_prediction / sample.
    """
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ClipguideError(f"{type(scheduler).__name__} has no alphas_cumprod noise table, so clipguide cannot "
                             "estimate x0 from the model output; use a DDPM-family scheduler (DDPM, DDIM, Euler, "
                             "DPMSolverMultistep, ...)")
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ClipguideError(f"unknown prediction type {prediction!r} of {type(scheduler).__name__}; "
                             f"expected one of {', '.join(PREDICTION_TYPES)}")
    return prediction


def alpha_bar(alphas_cumprod: torch.Tensor, timestep: Any, batch: int) -> torch.Tensor:
    """alpha_bar at ``timestep`` (a number, or a tensor with 1 or ``batch`` elements) as float32 [batch, 1, 1, 1],
    on the device of the table ``alphas_cumprod`` [T].

    Fractional timesteps (Euler-family schedulers) are interpolated linearly in sigma = sqrt((1 - a) / a), as those
    schedulers do, so integer timesteps read the table exactly.
    """
    table = alphas_cumprod.float()
    if isinstance(timestep, torch.Tensor):
        t = timestep.to(table.device, torch.float32).reshape(-1)
    else:   # a fill on the table's device, not a copy from the host (which would wait for a GPU's queued work)
        t = torch.full((1,), float(timestep), device=table.device)
    if t.numel() == 1:
        t = t.expand(batch)
    elif t.numel() != batch:
        raise ClipguideError(f"got {t.numel()} timesteps for a batch of {batch}")
    t = t.clamp(0, len(table) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(table) - 1)
    sigmas = ((1 - table) / table).sqrt()
    sigma = torch.lerp(sigmas[lo], sigmas[hi], t - lo)
    return (1 / (1 + sigma ** 2)).view(-1, 1, 1, 1)


def predict_x0(output: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 estimated from the model ``output`` at input ``x_t`` [B, C, H, W] and alpha_bar ``a`` [B, 1, 1, 1]."""
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    if prediction_type == "sample":
        return output
    raise ClipguideError(f"unknown prediction type {prediction_type!r}")


def output_correction(g: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What to add to the model output so that its x0 estimate moves by (1 - a) / sqrt(a) * g (see the module doc)."""
    if prediction_type == "epsilon":
        return -(1 - a).sqrt() * g
    if prediction_type == "v_prediction":
        return -((1 - a) / a).sqrt() * g
    if prediction_type == "sample":
        return (1 - a) / a.sqrt() * g
    raise ClipguideError(f"unknown prediction type {prediction_type!r}")


def renoise(x_prev: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process's jump from a sample at an earlier (less noisy) step back to timestep t: a draw of
    q(x_t | x_prev) = N(sqrt(a_t / a_prev) x_prev, (1 - a_t / a_prev) I), using ``noise`` ~ N(0, I).

    x_prev, noise: [B, C, H, W]; a_t <= a_prev: alpha_bar at t and at the earlier step, [B, 1, 1, 1] (or scalars).
    """
    ratio = a_t / a_prev
    return ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise


# ------------------------------------------------------------------------------------------------------ decoders

def pipeline_vae(pipe: Any) -> Optional[nn.Module]:
    """A diffusers pipeline's latent decoder: its ``vae`` (AutoencoderKL) or ``vqvae`` (VQModel); None for pixel
    pipelines."""
    return getattr(pipe, "vae", None) or getattr(pipe, "vqvae", None)


def _latent_scaling(vae: nn.Module) -> tuple[float, float]:
    """(scaling_factor, shift_factor) between the VAE's latents and the model's: model = (vae - shift) * scaling."""
    return getattr(vae.config, "scaling_factor", 1.0) or 1.0, getattr(vae.config, "shift_factor", None) or 0.0


def decoder_for(vae: Optional[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """x0 in the model's space -> images [B, 3, H, W] in [0, 1], differentiable.

    ``vae`` None means a pixel-space model with data in [-1, 1]; an AutoencoderKL or VQModel decodes latents scaled
    by its ``scaling_factor`` (and ``shift_factor``), VQ latents without snapping to the codebook so the gradient
    reaches every latent.
    """
    if vae is None:
        return lambda x0: clamp_with_grad((x0.float() + 1) / 2)
    scaling, shift = _latent_scaling(vae)
    quantised = hasattr(vae, "quantize")

    def decode(x0: torch.Tensor) -> torch.Tensor:
        z = (x0 / scaling + shift).to(vae.dtype)
        out = vae.decode(z, force_not_quantize=True) if quantised else vae.decode(z)
        return clamp_with_grad((out.sample.float() + 1) / 2)

    return decode


def encoder_for(vae: Optional[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images [B, 3, H, W] in [0, 1] -> x0 in the model's space (the inverse of :func:`decoder_for`)."""
    if vae is None:
        return lambda images: images * 2 - 1
    scaling, shift = _latent_scaling(vae)

    def encode(images: torch.Tensor) -> torch.Tensor:
        out = vae.encode((images * 2 - 1).to(vae.dtype))
        z = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        return (z.float() - shift) * scaling

    return encode


# ------------------------------------------------------------------------------------------------- the wrapper

def _output_sample(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _with_sample(out: Any, sample: torch.Tensor) -> Any:
    return (sample,) + tuple(out[1:]) if isinstance(out, tuple) else type(out)(sample=sample)


def _rms_clamped(g: torch.Tensor, limit: float, gain: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """``g`` [B, C, H, W] scaled down per image so that the RMS of ``gain * g`` is at most ``limit``; ``gain`` is a
    number or [B, 1, 1, 1]."""
    rms = gain * g.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return g * (limit / rms.clamp(min=limit))


def _shrunk(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` [B, C, H, W] area-averaged to ``scale`` of its height and width (at least 1 x 1); as is at scale 1."""
    if scale == 1:
        return x
    size = [max(1, round(side * scale)) for side in x.shape[-2:]]
    return F.interpolate(x, size=size, mode="area")


class GuidedForward:
    """A UNet forward whose output carries CLIP guidance.

    Call it exactly like the UNet's forward; it returns the same kind of output. ``cfg_scale()`` returns the
    classifier-free guidance weight w when the batch is [uncond, cond] (None otherwise): the loss is then taken on
    x0 of ``uncond + w * (cond - uncond)``, and the same correction is added to both halves. After each guided call,
    ``last_images`` holds the decoded x0 [B, 3, H, W] (at ``decode_scale`` of full size) and ``last_terms`` the
    guidance's per-image loss terms.

    A call reads the timestep back to the host once, to check it against the guidance window; a sampling loop that
    knows each step's timestep on the host decides with :meth:`guided_at` itself and calls :meth:`steer`, which
    reads nothing back until the gradient's finiteness check at its end.
    """

    def __init__(self, forward: Callable, scheduler: Any, guidance: CLIPGuidance,
                 decode: Callable[[torch.Tensor], torch.Tensor], config: DiffusionGuidanceConfig,
                 cfg_scale: Callable[[], Optional[float]] = lambda: None):
        self.forward = forward
        self.prediction_type = check_scheduler(scheduler)
        self.alphas_cumprod = scheduler.alphas_cumprod
        self.guidance = guidance
        self.decode = decode
        self.config = config
        self.cfg_scale = cfg_scale
        self.last_images: Optional[torch.Tensor] = None
        self.last_terms: Optional[dict] = None
        self._tables: dict[torch.device, torch.Tensor] = {}

    def alpha_bar(self, timestep: Any, batch: int, device: torch.device) -> torch.Tensor:
        """:func:`alpha_bar` [batch, 1, 1, 1] on ``device``, from a copy of the noise table kept there, so that a
        timestep on the device never goes to the host and back."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self.alphas_cumprod.to(device)
        return alpha_bar(self._tables[device], timestep, batch)

    def guided_at(self, timestep: Any) -> bool:
        """Whether a call at ``timestep`` (a number, or a tensor whose first element is read) is steered (scale > 0
        and inside the [start, end] window)."""
        if self.config.scale == 0:
            return False
        progress = 1 - _first_value(timestep) / (len(self.alphas_cumprod) - 1)
        return self.config.start <= progress <= self.config.end

    def __call__(self, sample: torch.Tensor, timestep: Any, *args, **kwargs) -> Any:
        if not self.guided_at(timestep):
            return self.forward(sample, timestep, *args, **kwargs)
        return self.steer(sample, timestep, *args, **kwargs)

    def steer(self, sample: torch.Tensor, timestep: Any, *args, **kwargs) -> Any:
        """The UNet's output at (``sample``, ``timestep``) corrected by the CLIP guidance, whatever the window."""
        w = self.cfg_scale()
        half = len(sample) // 2 if w is not None else 0
        a = self.alpha_bar(timestep, len(sample), sample.device)
        x = sample.detach().requires_grad_(self.config.through_unet)
        with torch.set_grad_enabled(self.config.through_unet):
            out = self.forward(x, timestep, *args, **kwargs)
        pred = _output_sample(out)
        with torch.enable_grad():
            combined = pred[:half] + w * (pred[half:] - pred[:half]) if half else pred
            x_t, a_t = (x[half:], a[half:])
            if self.config.through_unet:
                x0 = predict_x0(combined.float(), x_t.float(), a_t, self.prediction_type)
                wrt = x
            else:
                x0 = predict_x0(combined.float(), x_t.float(), a_t, self.prediction_type).detach().requires_grad_()
                wrt = x0
            images = self.decode(_shrunk(x0, self.config.decode_scale))
            terms = self.guidance.per_image(images)
            grad, = torch.autograd.grad(terms["total"].sum(), wrt)
        grad = grad.float()
        if not self.config.through_unet:
            grad = grad / a_t.sqrt()   # d x0 / d x_t with the model output held fixed
        elif half:
            grad = grad[:half] + grad[half:]   # both halves are the same latents: total derivative
        if not torch.isfinite(grad).all():
            raise GuidanceError(f"CLIP guidance gradient is not finite at timestep {_first_value(timestep):g}")
        g = -self.config.scale * grad
        if self.config.grad_clamp is not None:
            g = _rms_clamped(g, self.config.grad_clamp)
        if self.config.x0_clamp is not None:
            g = _rms_clamped(g, self.config.x0_clamp, gain=(1 - a_t) / a_t.sqrt())
        delta = output_correction(g, a_t, self.prediction_type)
        if half:
            delta = torch.cat([delta, delta])
        self.last_images = images.detach()
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return _with_sample(out, (pred.detach().float() + delta).to(pred.dtype))


def _first_value(timestep: Any) -> float:
    """A timestep (a number, or a tensor whose first element is taken) as a host float: a tensor's is read back."""
    return float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)


# ------------------------------------------------------------------------------------------------------- attach

class AttachHandle:
    """Returned by :func:`attach`; ``detach()`` (or leaving a ``with`` block) restores the pipeline's UNet."""

    def __init__(self, unet: nn.Module, guided: GuidedForward, checkpointing: list[nn.Module]):
        self.unet = unet
        self.guided = guided
        self._checkpointing = checkpointing

    def detach(self) -> None:
        if self.unet.__dict__.get("forward") is self.guided:
            del self.unet.forward
        for module in self._checkpointing:
            module.disable_gradient_checkpointing()
        self._checkpointing = []

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(pipe: Any, guidance: CLIPGuidance, config: Optional[DiffusionGuidanceConfig] = None,
           **options) -> AttachHandle:
    """Steer a stock diffusers pipeline with ``guidance`` until the returned handle is detached.

    Works with any pipeline that has ``unet`` and ``scheduler`` components and calls ``pipe.unet(...)`` once per
    step: pixel pipelines (DDPMPipeline, DDIMPipeline) and latent ones (``vae`` AutoencoderKL or ``vqvae``
    VQModel: x0 is decoded with gradient). Classifier-free guidance is read from the pipeline
    (``do_classifier_free_guidance`` / ``guidance_scale``) at every call. ``options`` are
    :class:`DiffusionGuidanceConfig` fields. With ``scale=0`` the pipeline's output is bit-identical to an
    unattached run.

    >>> with clipguide.diffusion.attach(pipe, CLIPGuidance("a red circle"), scale=300):
    ...     image = pipe(generator=torch.Generator().manual_seed(0)).images[0]
    """
    config = config or DiffusionGuidanceConfig(**options)
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(pipe, "scheduler", None) is None:
        raise ClipguideError(f"{type(pipe).__name__} has no unet and scheduler to guide")
    if "forward" in unet.__dict__:
        raise ClipguideError("this pipeline's UNet is already guided; detach the first handle before attaching again")
    vae = pipeline_vae(pipe)

    def cfg_scale() -> Optional[float]:
        return float(pipe.guidance_scale) if getattr(pipe, "do_classifier_free_guidance", False) else None

    guided = GuidedForward(unet.forward, pipe.scheduler, guidance, decoder_for(vae), config, cfg_scale)
    checkpointing = enable_checkpointing(unet, vae) if config.checkpointing else []
    unet.forward = guided
    return AttachHandle(unet, guided, checkpointing)


def enable_checkpointing(*modules: Optional[nn.Module]) -> list[nn.Module]:
    """Turn on diffusers gradient checkpointing where a module supports it; returns the modules switched on."""
    switched = []
    for module in modules:
        if module is not None and getattr(module, "_supports_gradient_checkpointing", False) \
                and not module.is_gradient_checkpointing:
            module.enable_gradient_checkpointing()
            switched.append(module)
    return switched
