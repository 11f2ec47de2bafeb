"""Axis-aligned bilinear resampling as two small matrix products: deterministic on CUDA, forward and backward.

``grid_sample`` (which crops, resizes and warps go through elsewhere) back-propagates on CUDA with atomic adds, so
two runs with the same seed drift apart in their last bits and then visibly. A resampling whose source coordinates
along x depend only on the output column, and along y only on the output row (crops, zooms, shifts, flips), is
instead ``out = Wy @ image @ Wx^T`` with one bilinear weight matrix per axis, whose products and their gradients are
plain batched matmuls: fixed summation order, the same bits every run.

Coordinates are in pixel units with pixel centres at integers (pixel j covers [j - 0.5, j + 0.5]).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import ClipguideError

PADDING_MODES = ("zeros", "border", "reflection")


def _reflect(coords: Tensor, low: float, high: float) -> Tensor:
    """Fold ``coords`` into [low, high] by mirroring at both ends (any number of times)."""
    span = high - low
    if span <= 0:
        return torch.full_like(coords, low)
    folded = torch.remainder(coords - low, 2 * span)
    return low + torch.where(folded > span, 2 * span - folded, folded)


def axis_weights(coords: Tensor, size: int, padding_mode: str, align_corners: bool) -> Tensor:
    """Bilinear weights [N, M, size] of M output samples along one axis of ``size`` input pixels.

    coords: float [N, M, k], source positions (pixel centres at integers); each output averages its k samples (an
    area filter when k > 1). padding_mode as in ``grid_sample``: "zeros" (taps outside read 0), "border" (positions
    clamped to the edge pixels) or "reflection" (positions mirrored at the borders: at the edge pixels' centres when
    ``align_corners``, else at the image's edges, then clamped).
    """
    if padding_mode not in PADDING_MODES:
        raise ClipguideError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
    if padding_mode == "reflection":
        coords = (_reflect(coords, 0.0, size - 1.0) if align_corners else _reflect(coords, -0.5, size - 0.5))
    if padding_mode != "zeros":
        coords = coords.clamp(0, size - 1)
    taps = torch.arange(size, device=coords.device, dtype=coords.dtype)
    hat = (1 - (coords[..., None] - taps).abs()).clamp(min=0)     # [N, M, k, size]: the two nearest taps
    return hat.mean(dim=2)


def resample(images: Tensor, xs: Tensor, ys: Tensor, padding_mode: str = "border",
             align_corners: bool = False) -> Tensor:
    """Sample ``images`` [B, C, H, W] on separable grids: output n [C, Hout, Wout] reads image n % B at
    (xs[n, j, :], ys[n, i, :]) for pixel (i, j), averaging the k samples per axis.

    xs: float [N, Wout, k] and ys: float [N, Hout, k] with N a multiple of B (cut-major: cut c of image b is n =
    c * B + b). Returns [N, C, Hout, Wout] in the images' dtype.
    """
    batch, channels, height, width = images.shape
    n = xs.shape[0]
    if n % batch or ys.shape[0] != n:
        raise ClipguideError(f"resample: {n} x-grids and {ys.shape[0]} y-grids for {batch} images")
    wx = axis_weights(xs, width, padding_mode, align_corners).to(images.dtype)    # [N, Wout, W]
    wy = axis_weights(ys, height, padding_mode, align_corners).to(images.dtype)   # [N, Hout, H]
    cuts = n // batch
    wx = wx.view(cuts, batch, 1, -1, width)
    wy = wy.view(cuts, batch, 1, -1, height)
    out = wy @ images[None] @ wx.transpose(-1, -2)                                  # [cuts, B, C, Hout, Wout]
    return out.reshape(n, channels, out.shape[-2], out.shape[-1])
