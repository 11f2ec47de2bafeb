"""The generator plugin contract and the optimisation loop that parameterised backends share.

A generator turns its own parameters into images [B, 3, H, W] in [0, 1]. Every backend exposes

    sample(guidance, steps, generator, callback) -> images [B, 3, H, W]

so ``guide()`` never branches on the kind of backend. Every backend class also answers
``native_size(**options) -> (width, height)`` (the size guide() uses when none is asked for), ``default_steps`` and
``default_retries(**options)`` (how often guide() redraws a picture that its CLIP scores below a true pair), and its
instances ``compile_decode()``, which compiles the differentiable map that guidance back-propagates through
(``guide(compile=True)`` calls it), and ``shared_options()``, the options that let a new instance use the models this
one loaded (guide() builds each retry's backend with them, so weights are read from disk once per call).
Optimisation backends (pixels, fourier, vqgan) subclass :class:`OptimisedGenerator`, which implements ``sample`` as
Adam on ``parameters()`` through ``decode()`` (with ``choose_start(guidance)`` before the first step, for starts that
depend on the prompts, ``constrain()`` and ``anneal(progress)`` after each step and ``finish()`` for the final
images); sampling backends (diffusion) implement ``sample`` themselves.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import nn

from ..compiling import compiled
from ..errors import ClipguideError, GuidanceError
from ..guidance import CLIPGuidance
from ..registry import Registry

GENERATORS: Registry[type] = Registry("generator")

# callback(step, losses, images): step counts from 1, losses are batch means, images [B, 3, H, W] in [0, 1] (detached)
StepCallback = Callable[[int, dict, torch.Tensor], None]


class _ClampWithGrad(torch.autograd.Function):
    """Clamp to [0, 1] whose gradient still flows where it would move a clipped value back into range (a hard clamp
    would freeze any parameter that overshoots)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, = ctx.saved_tensors
        # descending -grad moves x down when grad > 0: allowed unless already below 0, and vice versa
        return grad * ((x >= 0) & (x <= 1) | ((x < 0) & (grad < 0)) | ((x > 1) & (grad > 0))).to(grad.dtype)


def clamp_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x.clamp(0, 1)`` in value; the gradient passes wherever following it leads back into [0, 1]."""
    return _ClampWithGrad.apply(x)


def check_size(batch: int, height: int, width: int) -> None:
    for name, value in (("batch", batch), ("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ClipguideError(f"{name} must be a positive integer, got {value!r}")


def check_init(init: Optional[torch.Tensor], batch: int, height: int, width: int) -> None:
    """``init`` must be None or float [1 or B, 3, height, width] in [0, 1]."""
    if init is None:
        return
    if init.ndim != 4 or init.shape[0] not in (1, batch) or tuple(init.shape[1:]) != (3, height, width):
        raise ClipguideError(f"init image must be [1 or {batch}, 3, {height}, {width}], got {tuple(init.shape)}")


def check_options(factory: Callable, name: str, options: dict) -> None:
    """ClipguideError naming any key of ``options`` that backend ``factory`` does not take: its keyword-only
    parameters, plus the names in its ``extra_options`` attribute when it forwards ``**kwargs`` (a factory with
    ``**kwargs`` and no ``extra_options`` checks its own)."""
    params = inspect.signature(factory).parameters
    known = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in ("generator", "init")]
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        if not hasattr(factory, "extra_options"):
            return
        known += factory.extra_options
    known = sorted(known)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ClipguideError(f"backend {name!r} has no option {', '.join(map(repr, unknown))}; "
                             f"its options: {', '.join(known) or 'none'}")


class OptimisedGenerator(nn.Module):
    """A backend whose images are a differentiable function of its parameters, optimised with Adam.

    Subclasses set ``self.lr`` and implement :meth:`decode`.
    """

    lr: float
    default_steps = 100

    @classmethod
    def native_size(cls, **options) -> tuple[int, int]:
        """(width, height) used when guide() is given no size: ShapesWorld's 64 px."""
        return 64, 64

    @classmethod
    def default_retries(cls, **options) -> int:
        """0: optimisation reaches a high CLIP score whatever it draws, so a low score rarely flags a wrong picture,
        and each retry would cost a whole run."""
        return 0

    def decode(self) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1], differentiable with respect to ``parameters()``."""
        raise NotImplementedError

    def shared_options(self) -> dict:
        """Options that make another instance share the models this one loaded; {}: it loads none."""
        return {}

    def choose_start(self, guidance: CLIPGuidance) -> None:
        """Called without gradient before the first step: a backend whose start depends on the prompts (vqgan's
        palette starts) sets its parameters here from ``guidance``; by default nothing."""

    def constrain(self) -> None:
        """Called without gradient after every optimiser step, to project the parameters back where they are valid."""

    def anneal(self, progress: float) -> None:
        """Called after every optimiser step with ``progress`` = step / steps in (0, 1], for schedules over the run."""

    def finish(self) -> torch.Tensor:
        """The final images [B, 3, H, W] in [0, 1], called without gradient once optimisation ends; by default
        :meth:`decode`. A backend whose decode is a relaxation (soft choices) returns the choices made here."""
        return self.decode()

    def compile_decode(self) -> None:
        """Compile :meth:`decode` (see :func:`clipguide.compiling.compiled`); the parameters stay the same tensors.
        Calling it again changes nothing."""
        if "decode" not in vars(self):  # the compiled function is an instance attribute shadowing the method
            self.decode = compiled(self.decode, next(self.parameters()).device)

    def sample(self, guidance: CLIPGuidance, steps: int, generator: torch.Generator,
               callback: Optional[StepCallback] = None) -> torch.Tensor:
        """Minimise ``guidance.loss(decode())`` for ``steps`` Adam steps (fewer if every prompt reaches its stop) and
        return :meth:`finish`'s images.

        ``generator`` is unused here: the parameters were drawn at construction and the guidance owns the cutouts'
        randomness. Raises :class:`GuidanceError` naming the step if the loss or a gradient stops being finite.
        """
        if not isinstance(steps, int) or steps < 1:
            raise ClipguideError(f"steps must be a positive integer, got {steps!r}")
        with torch.no_grad():
            self.choose_start(guidance)
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        for step in range(1, steps + 1):
            images = self.decode()
            terms = guidance.per_image(images)
            loss = terms["total"].sum()
            if not torch.isfinite(loss):
                raise GuidanceError(f"guidance loss became {loss.item()} at step {step}; try a lower learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
                raise GuidanceError(f"non-finite gradient at step {step}; try a lower learning rate")
            optimizer.step()
            with torch.no_grad():
                self.constrain()
            self.anneal(step / steps)
            if callback is not None:
                callback(step, guidance.summary(terms), images.detach())
            if guidance.done():
                break
        with torch.no_grad():
            return self.finish()
