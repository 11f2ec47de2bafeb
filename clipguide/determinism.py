"""Same seed, same image on CUDA: the library settings that a guided run needs, switched on for its duration.

CLIP guidance back-propagates through resampling, attention and convolutions every step, and several of their CUDA
kernels sum with atomic adds in whatever order threads finish, so two runs drift apart bit by bit and then visibly.
clipguide's own crops and zoom/shift augmentations avoid those kernels on CUDA (:mod:`clipguide.resample`); for the
rest, :func:`deterministic` asks PyTorch for its deterministic algorithms (cuDNN convolutions, index and scatter
ops). An op that has none still runs, with PyTorch's warning naming it (``warn_only``), rather than failing: the
general ``grid_sample`` warp (rotate / perspective augmentations), and in warn-only mode the cuDNN and
memory-efficient attention backward passes. Those sum across key blocks, so with few tokens (the shipped models,
ViT-B-32) runs still repeat bit for bit (seen on an H200: benchmarks/cuda_paths.py); long sequences may not.

guide() runs inside it; a script driving ``CLIPGuidance.gradient`` or ``clipguide.diffusion.attach`` itself can wrap
its loop in it. It is re-entrant and thread-safe: the settings are switched on by the first holder and back to what
they were when the last one leaves, so concurrent jobs (the app's) never turn them off under each other.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Union

import torch

_lock = threading.Lock()
_holders = 0
_saved: tuple = ()


def _enter() -> None:
    global _holders, _saved
    with _lock:
        if _holders == 0:
            _saved = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled(),
                      torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                      torch.utils.deterministic.fill_uninitialized_memory)
            # cuBLAS needs a fixed workspace layout to promise determinism; PyTorch checks for this setting.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            # deterministic mode would also NaN-fill every new empty tensor: a debugging aid that costs every step
            torch.utils.deterministic.fill_uninitialized_memory = False
        _holders += 1


def _exit() -> None:
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0:
            enabled, warn_only, cudnn_deterministic, cudnn_benchmark, fill = _saved
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
            torch.backends.cudnn.deterministic = cudnn_deterministic
            torch.backends.cudnn.benchmark = cudnn_benchmark
            torch.utils.deterministic.fill_uninitialized_memory = fill


@contextlib.contextmanager
def deterministic(device: Union[str, torch.device, None] = "cuda") -> Iterator[None]:
    """Deterministic CUDA kernels while inside (nothing changes for a CPU ``device``, whose kernels already are)."""
    if torch.device(device or "cpu").type != "cuda":
        yield
        return
    _enter()
    try:
        yield
    finally:
        _exit()
