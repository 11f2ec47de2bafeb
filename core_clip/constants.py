"""Small constant tensors made from host data once per device and dtype, then shared.

``torch.tensor(values, device="cuda")`` reaches the GPU by a blocking copy, which makes the host wait for all queued
work. Inside a training or guidance step that stalls the queue between host and GPU: the GPU runs dry while the host
launches what follows. :func:`constant` pays that copy once.
"""
from __future__ import annotations

from typing import Union

import torch

Values = Union[float, tuple]   # a number, or (nested) tuples of numbers: hashable

_CACHE: dict[tuple, torch.Tensor] = {}


def constant(values: Values, device: Union[str, torch.device], dtype: torch.dtype) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device`` in ``dtype``, the same tensor on every call: never modify it in place.

    It is made outside inference mode, so that autograd can save it even when the first call came from inside it.
    Compiled code makes its own (the compiler keeps it on the device) and never reads the cache, whose contents it
    would otherwise guard on.
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, device=device, dtype=dtype)
    key = (values, torch.device(device), dtype)
    if key not in _CACHE:
        with torch.inference_mode(False):
            _CACHE[key] = torch.tensor(values, device=device, dtype=dtype)
    return _CACHE[key]
