"""Projected-gradient attack balls for adversarial training: where a perturbation starts and how it steps.

A ball answers ``start(shape, eps, generator)`` (a random perturbation inside it) and
``step(delta, grad, step_size, eps)`` (one ascent step along ``grad``, projected back into the ball). Perturbations
are [B, ...] per image; ``eps`` is in [0, 1] pixel units. The trainer runs ``steps`` steps of size ``eps / steps``.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Ball(Protocol):
    def start(self, shape: torch.Size, eps: float, generator: torch.Generator) -> torch.Tensor: ...

    def step(self, delta: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float) -> torch.Tensor: ...


def _per_image_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each image of [B, ...], shaped [B, 1, ...] to broadcast against x."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))


class LinfBall:
    """|delta_i| <= eps for every pixel: uniform start, signed-gradient steps of 1.25 x step_size (so that the
    steps together can cross the ball), clamped per pixel."""

    def start(self, shape: torch.Size, eps: float, generator: torch.Generator) -> torch.Tensor:
        return (torch.rand(shape, generator=generator, device=generator.device) * 2 - 1) * eps

    def step(self, delta: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float) -> torch.Tensor:
        return (delta + 1.25 * step_size * grad.sign()).clamp(-eps, eps)


class L2Ball:
    """||delta|| <= eps per image: a start in a random direction at a uniform radius, steps of 2.5 x step_size
    along the normalised gradient, rescaled onto the ball when they leave it. An L2 ball lets the attack spend its
    budget where it matters (a region's colour, an edge) instead of spreading it as texture over every pixel."""

    def start(self, shape: torch.Size, eps: float, generator: torch.Generator) -> torch.Tensor:
        direction = torch.randn(shape, generator=generator, device=generator.device)
        radius = eps * torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=generator, device=generator.device)
        return direction / _per_image_norm(direction) * radius

    def step(self, delta: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float) -> torch.Tensor:
        delta = delta + 2.5 * step_size * grad / _per_image_norm(grad).clamp_min(1e-12)
        return delta * (eps / _per_image_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


ATTACK_NORMS: dict[str, Ball] = {"linf": LinfBall(), "l2": L2Ball()}
