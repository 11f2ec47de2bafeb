"""The losses of CLIP guidance, in two registries, plus the stop threshold as a gradient switch.

- ``EMBEDDING_LOSSES``: ``(image_emb [N, D], target_emb [N, D] | [1, D] | [D]) -> [N]``, how far each image
  embedding is from its target. Both inputs are L2-normalised here, so callers may pass raw CLIP features.
- ``IMAGE_LOSSES``: ``(images [B, 3, H, W]) -> [B]``, regularisers on the generator's output (nominally in [0, 1]).
  A stochastic one takes a keyword ``generator`` too, and :class:`clipguide.CLIPGuidance` passes it its own seeded
  ``torch.Generator`` (``diffusion_prior``, in its own module, is one).

All losses keep the input's floating dtype and device. A new loss is one decorated function, in this module or any
other::

    @EMBEDDING_LOSSES.register("dot")
    def dot(image_emb: Tensor, target_emb: Tensor) -> Tensor: ...

Inputs are checked. The checks that read tensor values (an all-zero embedding, a NaN stop) copy a flag from the
device to the host, which on a GPU waits for all queued work and then leaves the GPU idle while the host launches
what follows; :func:`without_value_checks` turns them off for inputs that are valid by construction.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ClipguideError
from .registry import Registry

__all__ = ["EMBEDDING_LOSSES", "IMAGE_LOSSES", "EmbeddingLoss", "ImageLoss", "stop_below", "without_value_checks"]

EmbeddingLoss = Callable[[Tensor, Tensor], Tensor]
ImageLoss = Callable[[Tensor], Tensor]

EMBEDDING_LOSSES: Registry[EmbeddingLoss] = Registry("embedding loss")
IMAGE_LOSSES: Registry[ImageLoss] = Registry("image loss")

_VALUE_CHECKS: ContextVar[bool] = ContextVar("clipguide_loss_value_checks", default=True)


@contextmanager
def without_value_checks() -> Iterator[None]:
    """Inside the block, the losses and :func:`stop_below` skip the checks that read tensor values (all-zero
    embeddings, NaN stops); type and shape checks stay. For callers whose inputs are valid by construction, such as
    :class:`clipguide.CLIPGuidance` (CLIP embeddings, unit targets, stops checked when the prompts were parsed) in
    a sampler's inner loop. The switch is a ContextVar, so other threads and tasks keep their checks."""
    token = _VALUE_CHECKS.set(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def _unit_pair(image_emb: Tensor, target_emb: Tensor) -> tuple[Tensor, Tensor]:
    """Validate an embedding loss's inputs (dtype, shapes, no all-zero rows); L2-normalise both along the last dim."""
    if not (isinstance(image_emb, Tensor) and isinstance(target_emb, Tensor)):
        raise ClipguideError("embedding losses take two tensors")
    if not (image_emb.is_floating_point() and target_emb.is_floating_point()):
        raise ClipguideError(f"embeddings must be floating point, got {image_emb.dtype} and {target_emb.dtype}")
    if image_emb.ndim != 2:
        raise ClipguideError(f"image_emb must be [N, D], got {list(image_emb.shape)}")
    n, d = image_emb.shape
    if target_emb.shape not in ((d,), (1, d), (n, d)):
        raise ClipguideError(
            f"target_emb must be [{n}, {d}], [1, {d}] or [{d}] to match image_emb [{n}, {d}], "
            f"got {list(target_emb.shape)}"
        )
    if _VALUE_CHECKS.get():
        for name, emb in (("image_emb", image_emb), ("target_emb", target_emb)):
            if bool((emb == 0).all(dim=-1).any()):
                raise ClipguideError(f"{name} holds an all-zero vector, which has no direction")
    return F.normalize(image_emb, dim=-1), F.normalize(target_emb, dim=-1)


def _norm(v: Tensor) -> Tensor:
    """``|v|`` along the last dim with a finite gradient at ``v = 0`` (there it is 0, the minimum-norm subgradient).

    Squared norms below the dtype's smallest normal number are raised to it, which moves the norm by at most
    ``sqrt(tiny)`` (1.1e-19 in float32) and zeroes the gradient inside that ball, where sqrt's infinite slope
    times the zero gradient of ``v^2`` would give NaN.
    """
    return v.pow(2).sum(dim=-1).clamp_min(torch.finfo(v.dtype).tiny).sqrt()


@EMBEDDING_LOSSES.register("spherical")
def spherical(image_emb: Tensor, target_emb: Tensor) -> Tensor:
    """Squared great-circle distance of the VQGAN+CLIP notebooks, ``2 * arcsin(|a - b| / 2)^2`` for unit ``a, b``.

    That equals ``theta^2 / 2`` with ``theta`` the angle between the vectors, so the value is in ``[0, pi^2 / 2]``:
    0 for the same direction, ``pi^2 / 8`` for orthogonal vectors, ``pi^2 / 2`` for opposite ones.

    It is computed as ``2 * atan2(|a - b|, |a + b|)^2``, the same value for unit vectors (``|a + b|`` is
    ``sqrt(4 - |a - b|^2)``), but without arcsin's infinite slope at ``|a - b| = 2`` (atan2's gradient is bounded
    away from the origin, which two unit vectors never reach) and without arcsin's NaN when rounding pushes
    ``|a - b| / 2`` above 1. Both norms use :func:`_norm`, finite at ``a == b`` and ``a == -b``; it changes the
    value by at most ``pi * sqrt(tiny)`` (below 1e-18 in float32).

    ``image_emb [N, D]``, ``target_emb [N, D]``, ``[1, D]`` or ``[D]``, any floating dtype and scale -> ``[N]``.
    """
    a, b = _unit_pair(image_emb, target_emb)
    return 2 * torch.atan2(_norm(a - b), _norm(a + b)).pow(2)


@EMBEDDING_LOSSES.register("cosine")
def cosine(image_emb: Tensor, target_emb: Tensor) -> Tensor:
    """Cosine distance ``1 - cos(a, b)``, in ``[0, 2]`` (up to rounding).

    ``image_emb [N, D]``, ``target_emb [N, D]``, ``[1, D]`` or ``[D]``, any floating dtype and scale -> ``[N]``.
    """
    a, b = _unit_pair(image_emb, target_emb)
    return 1 - (a * b).sum(dim=-1)


def check_images(images: Tensor) -> None:
    """ClipguideError unless ``images`` is a floating-point tensor [B, 3, H, W] (what every image loss takes)."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise ClipguideError("images must be a floating-point tensor [B, 3, H, W]")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ClipguideError(f"images must be [B, 3, H, W], got {list(images.shape)}")


@IMAGE_LOSSES.register("tv")
def tv(images: Tensor) -> Tensor:
    """Total variation: mean squared difference between horizontal neighbours plus that between vertical ones.

    Per image ``x [3, H, W]``::

        tv = sum_{c, i, j < W-1} (x[c, i, j+1] - x[c, i, j])^2 / (3 * H * (W-1))
           + sum_{c, i < H-1, j} (x[c, i+1, j] - x[c, i, j])^2 / (3 * (H-1) * W)

    ``images [B, 3, H, W]`` floating, ``H, W >= 2`` -> ``[B]``, ``>= 0``; 0 exactly for constant images.
    """
    check_images(images)
    if images.shape[2] < 2 or images.shape[3] < 2:
        raise ClipguideError(f"tv needs images at least 2x2 pixels, got {images.shape[2]}x{images.shape[3]}")
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return dx.pow(2).mean(dim=(1, 2, 3)) + dy.pow(2).mean(dim=(1, 2, 3))


@IMAGE_LOSSES.register("range")
def range_(images: Tensor) -> Tensor:
    """Mean over elements of ``(x - clamp(x, 0, 1))^2``: the squared distance of each value from ``[0, 1]``.

    ``images [B, 3, H, W]`` floating -> ``[B]``, ``>= 0``; 0 exactly when every value is in ``[0, 1]``.
    """
    check_images(images)
    return (images - images.clamp(0, 1)).pow(2).mean(dim=(1, 2, 3))


def frame_width(height: int, width: int) -> int:
    """Width in pixels of the frame :func:`border` judges: 1/16 of the shorter side, at least 1."""
    return max(1, min(height, width) // 16)


@IMAGE_LOSSES.register("border")
def border(images: Tensor) -> Tensor:
    """Border uniformity: the variance of the colours in the image's frame (its outer :func:`frame_width` pixels on
    all four sides), per channel, averaged over the 3 channels.

    0 exactly when the frame is one colour; it pulls what the picture shows off the edges, the prior of a centred
    subject on a plain background. ``images [B, 3, H, W]`` floating, ``H, W >= 2`` -> ``[B]``, ``>= 0``.
    """
    return images[..., _frame(images, "border")].var(dim=-1, correction=0).mean(dim=1)


def _frame(images: Tensor, loss: str) -> Tensor:
    """Bool [H, W]: the outer :func:`frame_width` pixels of ``images`` [B, 3, H, W] (checked; ``loss`` names the
    caller in the error for pictures under 2x2)."""
    check_images(images)
    height, width = images.shape[2], images.shape[3]
    if height < 2 or width < 2:
        raise ClipguideError(f"{loss} needs images at least 2x2 pixels, got {height}x{width}")
    w = frame_width(height, width)
    frame = torch.ones(height, width, dtype=torch.bool, device=images.device)
    frame[w:height - w, w:width - w] = False
    return frame


def segment_position(images: Tensor, start: Tensor, axis: Tensor, eps: float = 1e-12) -> Tensor:
    """Where each pixel lies along the line ``start + t * axis``: the least-squares t, unclamped.

    ``images [B, C, H, W]``; ``start`` and ``axis`` broadcastable to it (``[B, C, 1, 1]``) -> ``[B, 1, H, W]``;
    t = 0 at ``start``, 1 at ``start + axis``. ``|axis|^2`` is floored at ``eps``, so a zero axis gives t = 0.
    """
    return ((images - start) * axis).sum(1, keepdim=True) / axis.pow(2).sum(1, keepdim=True).clamp(min=eps)


@IMAGE_LOSSES.register("two_colour")
def two_colour(images: Tensor) -> Tensor:
    """Two-colour flatness: the mean over pixels of the squared RGB distance from each pixel to the segment between
    the picture's two colours.

    The two colours are the centres of a 2-means clustering of the picture's pixels, started from the median colour
    of its :func:`border` frame and the pixel farthest from that, after 5 Lloyd steps; no gradient flows
    through them. 0 for a picture of two flat colours and their blends (anti-aliased edges included); a fringe of a
    third colour along an edge, a tint, a texture or a third colour costs. The loss form of ``pixels``'
    ``colors=2`` for a backend that cannot be built that way (``vqgan``).

    ``images [B, 3, H, W]`` floating, ``H, W >= 2`` -> ``[B]``, ``>= 0``.
    """
    frame = _frame(images, "two_colour")
    with torch.no_grad():
        pixels = images.detach().flatten(2).transpose(1, 2)                        # [B, N, 3]
        first = images.detach()[..., frame].median(dim=-1).values                  # [B, 3]
        farthest = (pixels - first[:, None]).pow(2).sum(-1).argmax(dim=1)
        second = pixels[torch.arange(len(pixels), device=pixels.device), farthest]
        for _ in range(5):
            nearer_second = ((pixels - second[:, None]).pow(2).sum(-1)
                             < (pixels - first[:, None]).pow(2).sum(-1)).to(pixels.dtype)[..., None]
            second = (pixels * nearer_second).sum(1) / nearer_second.sum(1).clamp(min=1)
            first = (pixels * (1 - nearer_second)).sum(1) / (1 - nearer_second).sum(1).clamp(min=1)
    start, axis = first[:, :, None, None], (second - first)[:, :, None, None]
    along = segment_position(images, start, axis)
    return (images - start - along.clamp(0, 1) * axis).pow(2).sum(dim=1).mean(dim=(1, 2))


@IMAGE_LOSSES.register("saturation")
def saturation(images: Tensor) -> Tensor:
    """Mean over pixels of the population variance of the pixel's 3 channels (its channel std, squared).

    0 for grey images, at most ``2/9`` for images in ``[0, 1]`` (reached by pure primaries and secondaries). With a
    positive weight it pulls towards grey, with a negative one towards vivid colour.

    ``images [B, 3, H, W]`` floating -> ``[B]``, ``>= 0``.
    """
    check_images(images)
    return images.var(dim=1, correction=0).mean(dim=(1, 2))


def stop_below(loss: Tensor, stop: float | Tensor) -> Tensor:
    """The stop threshold as a gradient switch: the same values as ``loss``, with gradient only where ``loss > stop``.

    ``loss`` floating, typically ``[N]`` (any shape works, e.g. ``[P, B]`` per prompt and image); ``stop`` a float
    or a tensor that broadcasts to ``loss``'s shape (``[N]`` per element, ``[P, 1]`` per prompt), not NaN; ``-inf``
    leaves the gradient always on. Returns ``loss``'s shape, equal to ``loss`` bit for bit; elements with
    ``loss <= stop`` are detached, so they add nothing to the gradient.
    """
    if not isinstance(loss, Tensor) or not loss.is_floating_point():
        raise ClipguideError("loss must be a floating-point tensor")
    if not isinstance(stop, (float, int, Tensor)):
        raise ClipguideError(f"stop must be a float or a tensor, got {type(stop).__name__}")
    stop = torch.as_tensor(stop, dtype=loss.dtype, device=loss.device)
    try:
        broadcasts = torch.broadcast_shapes(stop.shape, loss.shape) == loss.shape
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ClipguideError(f"stop {list(stop.shape)} does not broadcast to loss {list(loss.shape)}")
    if _VALUE_CHECKS.get() and bool(stop.isnan().any()):
        raise ClipguideError("stop is NaN; use -inf to keep the gradient always on")
    return torch.where(loss > stop, loss, loss.detach())
