"""torch.compile for the hot paths of guidance (CLIP image towers, generator decoders), one policy everywhere.

A guidance step is a few hundred small kernels (a ViT over a few dozen cutouts, a decoder, their backward passes)
whose arithmetic takes about a millisecond on a modern GPU: eager PyTorch spends most of the step launching them.
On CUDA the compiled function is therefore captured as CUDA graphs ("reduce-overhead"); elsewhere it is fused by
the default inductor mode. Compilation takes tens of seconds, so it pays only for long runs or many runs.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def compiled(fn: F, device: torch.device) -> F:
    """``fn`` compiled for fixed input shapes (a new shape compiles again) on ``device``."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(fn, mode=mode, dynamic=False)
