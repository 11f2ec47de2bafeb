"""Gradient alignment: train the image tower so that guidance's gradient points at the picture its caption asks for.

CLIP guidance moves a picture ``x`` along ``d sim(x, caption) / dx``. Contrastive training says nothing about that
direction, and a CLIP that classifies perfectly can still send guidance into texture. ShapesWorld can draw where
a guidance step should head: an edit pair renders a scene ``x0`` and its counterfactual ``x1`` (colours swapped, or
the shape's colour, the shape or the background changed; :func:`core_clip.shapes.counterfactual`) with the same
jitter, so they differ only in what the edit changes. At points ``x`` on the way from ``x0`` to ``x1``, and at
points the model's own gradient leads to from there, the alignment loss is

    1 - cos(d sim(x, caption(x1)) / dx, x1 - x)

averaged over the pairs, where ``sim`` is the cosine of the image and text embeddings (guidance's similarity) and
the caption names what the edit changed. Training on it differentiates through an input gradient (double
backward), which costs about three forward passes of the edit pictures, and each walk step one forward and
backward; the model runs in eval mode (batch norms on their running statistics), as guidance runs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import shapes
from .errors import CoreClipError
from .model import ClipModel, eval_mode
from .preprocess import as_image_batch


@dataclass(frozen=True)
class AlignConfig:
    """How edit pairs are drawn and where on their way the gradient is trained.

    edits: edit pairs per optimiser step.
    reach: each point starts at ``x0 + t (x1 - x0)`` with t uniform in [0, reach].
    walk: then takes k normalised steps along the model's own gradient, k uniform in {0, ..., walk}, so that the
        points guidance strays to are trained as well as the straight way.
    walk_size: L2 length of one such step, in [0, 1] pixel units.
    """

    edits: int = 32
    reach: float = 0.9
    walk: int = 10
    walk_size: float = 2.0

    def __post_init__(self) -> None:
        if self.edits < 1:
            raise CoreClipError(f"alignment: edits must be >= 1, got {self.edits}")
        if not 0 <= self.reach < 1:
            raise CoreClipError(f"alignment: reach must be in [0, 1), got {self.reach}")
        if self.walk < 0 or self.walk_size <= 0:
            raise CoreClipError(f"alignment: walk must be >= 0 and walk_size > 0, got {self.walk}, {self.walk_size}")


@dataclass
class EditPairs:
    """``n`` edit pairs: the scenes before and after each edit, their pictures x0 and x1 (float [n, 3, S, S] in
    [0, 1], drawn with the same jitter) and a caption of each edited scene that names every attribute the edit
    changed."""

    sources: list[shapes.Scene]
    targets: list[shapes.Scene]
    x0: torch.Tensor
    x1: torch.Tensor
    captions: list[str]


def edit_pairs(n: int, size: int, rng: np.random.Generator, split: str = "train") -> EditPairs:
    """Draw ``n`` edit pairs of ``split`` scenes (a pair stays in its split: see ``counterfactual``) from ``rng``."""
    sources, targets, x0, x1, captions = [], [], [], [], []
    for _ in range(n):
        scene = shapes.sample_scenes(1, int(rng.integers(2**63)), split)[0]
        twin = shapes.counterfactual(scene, rng)
        jitter = int(rng.integers(2**63))  # one seed for both renders: same colour offsets, extent and centroid
        x0.append(shapes.render(scene, size, np.random.default_rng(jitter)))
        x1.append(shapes.render(twin, size, np.random.default_rng(jitter)))
        changed = shapes.scene_facts(twin) - shapes.scene_facts(scene)
        while True:  # every template names the shape; at least one names both colours
            caption, claims = shapes.caption_with_claims(twin, rng)
            if changed <= claims:
                break
        sources.append(scene)
        targets.append(twin)
        captions.append(caption)
    return EditPairs(sources, targets, as_image_batch(np.stack(x0)), as_image_batch(np.stack(x1)), captions)


def similarity(model: ClipModel, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Guidance's similarity: cos(image embedding, text) per image. images float [B, 3, S, S] in [0, 1] (S the
    model's size), text [B, D] (normalised or not) -> [B]. The math attention kernel keeps it twice differentiable
    (the fused ones have no double backward)."""
    with sdpa_kernel(SDPBackend.MATH):
        features = model.encode_image(model.preprocess.normalize(images), grad=True)
    return F.cosine_similarity(features.float(), text.float(), dim=-1)


def walk(model: ClipModel, x: torch.Tensor, text: torch.Tensor, steps: torch.Tensor, size: float) -> torch.Tensor:
    """Follow each image's own similarity gradient: image i takes ``steps[i]`` steps of L2 length ``size``, each
    clamped to [0, 1]. x float [B, 3, S, S], text [B, D], steps int [B] -> the walked images, detached."""
    x = x.detach().clone()
    for k in range(int(steps.max()) if len(steps) else 0):
        active = (steps > k).to(x.device)[:, None, None, None]
        point = x.requires_grad_(True)
        with torch.enable_grad():
            grad, = torch.autograd.grad(similarity(model, point, text).sum(), point)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        x = torch.where(active, (point + size * grad / norm).clamp(0, 1), point).detach()
    return x


def alignment_loss(model: ClipModel, x: torch.Tensor, target: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """mean over i of 1 - cos(d sim(x_i, captions[i]) / dx_i, target_i - x_i): 0 when every gradient points
    straight at its target, 1 for orthogonal ones. x, target float [B, 3, S, S] in [0, 1]. Differentiable with
    respect to the model's parameters (text tower included); the model is used in eval mode."""
    with eval_mode(model), torch.enable_grad():
        point = x.detach().requires_grad_(True)
        text = model.encode_text(captions, grad=True)
        grad, = torch.autograd.grad(similarity(model, point, text).sum(), point, create_graph=True)
        cos = F.cosine_similarity(grad.flatten(1), (target - x).detach().flatten(1), dim=1)
    return (1 - cos).mean()


class GradientAligner:
    """Draws the edit pairs and starting points of one optimiser step and returns their alignment loss.

    Everything random is a function of (seed, step, rank), so resumed runs draw the same pairs."""

    def __init__(self, cfg: AlignConfig, image_size: int, seed: int, rank: int = 0):
        self.cfg, self.image_size, self.seed, self.rank = cfg, image_size, seed, rank

    def loss(self, model: ClipModel, step: int) -> torch.Tensor:
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, step, self.rank, 0xA11])
        pairs = edit_pairs(cfg.edits, self.image_size, rng)
        x0, x1 = pairs.x0.to(model.device), pairs.x1.to(model.device)
        t = torch.from_numpy(rng.uniform(0, cfg.reach, cfg.edits)).float().to(model.device)[:, None, None, None]
        x = x0 + t * (x1 - x0)
        if cfg.walk:
            with eval_mode(model):
                with torch.no_grad():
                    text = model.encode_text(pairs.captions)
                x = walk(model, x, text, torch.from_numpy(rng.integers(0, cfg.walk + 1, cfg.edits)), cfg.walk_size)
        return alignment_loss(model, x, x1, pairs.captions)
