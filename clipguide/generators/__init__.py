"""Generator backends, one file each, registered by name in :data:`GENERATORS` (see base.py for the contract)."""
from .base import GENERATORS, OptimisedGenerator, StepCallback, check_options, clamp_with_grad
from . import diffusion, fourier, pixels, vqgan  # noqa: F401  (register the built-in backends)

__all__ = ["GENERATORS", "OptimisedGenerator", "StepCallback", "check_options", "clamp_with_grad"]
