"""CLIPGuidance: prompts + perceptor(s) + cutouts + losses -> one differentiable loss of a batch of images.

Every backend calls this: optimisation backends minimise :meth:`CLIPGuidance.loss` over their parameters, sampling
backends steer with :meth:`CLIPGuidance.gradient`, and a user's own loop can call either.

For each perceptor model m and prompt p with weight w and stop s, the loss of image b is

    sum_m weight_m * sum_p |w| * stop(sign(w) * mean_k dist(E_m(cut_k(image_b)), T_m[p]), s)
      + sum_r weight_r * reg_r(image_b)

where cut_k are the augmented cutouts, dist the embedding loss (spherical distance by default), T_m[p] the prompt's
target embedding under model m, and stop(x, s) equals x but passes gradient only while x > s. Image losses are
summed over the batch, so an image's gradient does not depend on what else is in the batch.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from core_clip.preprocess import as_image_batch, open_image

from .cutouts import Augment, make_cutouts
from .errors import ClipguideError
from .losses import EMBEDDING_LOSSES, IMAGE_LOSSES, stop_below, without_value_checks
from .perceptor import ModelSpec, Perceptor
from .prompts import Prompt, noise_target, parse_prompts

PromptsLike = Union[str, Prompt, Sequence[Union[str, Prompt]]]


def default_augment() -> Augment:
    """Views shifted, scaled and noised about as much as the shipped CLIP's training images were."""
    return Augment(shift=0.05, scale=(0.9, 1.05), noise=0.03)


@dataclass
class GuidanceConfig:
    """How images are judged. Every field is also a keyword of :class:`CLIPGuidance` and of ``guide()``."""

    cutn: int = 16                      # cutouts per image and perceptor model
    cutouts: str = "classic"            # cutout scheme (clipguide.cutouts.CUTOUTS)
    cutout_options: dict = field(default_factory=dict)  # keyword options of the scheme (its dataclass fields)
    augment: Augment = field(default_factory=default_augment)
    loss: str = "spherical"             # embedding loss (clipguide.losses.EMBEDDING_LOSSES)
    regularisers: dict = field(default_factory=dict)  # image loss name -> weight (clipguide.losses.IMAGE_LOSSES)
    image_prompt_cutn: int = 0          # image prompts: 0 embeds the whole image, N > 0 the mean of N cutouts

    def __post_init__(self) -> None:
        if not isinstance(self.cutn, int) or self.cutn < 1:
            raise ClipguideError(f"cutn must be a positive integer, got {self.cutn!r}")
        if self.image_prompt_cutn < 0:
            raise ClipguideError(f"image_prompt_cutn must be >= 0, got {self.image_prompt_cutn}")
        EMBEDDING_LOSSES.get(self.loss)
        for name, weight in self.regularisers.items():
            IMAGE_LOSSES.get(name)
            if not math.isfinite(weight):
                raise ClipguideError(f"regulariser {name} needs a finite weight, got {weight}")
        make_cutouts(self.cutouts, **self.cutout_options)


def guidance_config(config: GuidanceConfig | None = None, **overrides) -> GuidanceConfig:
    """``config`` (default: :class:`GuidanceConfig`) with keyword overrides; unknown keywords -> ClipguideError."""
    known = {f.name for f in fields(GuidanceConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ClipguideError(f"unknown guidance option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return replace(config or GuidanceConfig(), **overrides)


def _with_generator(loss: Callable, generator: torch.Generator) -> Callable:
    """An image loss as ``images -> [B]``: a stochastic one (a ``generator`` keyword, such as ``diffusion_prior``)
    draws from ``generator``, the guidance's own stream, so that a seed reproduces the run."""
    if "generator" in inspect.signature(loss).parameters:
        return functools.partial(loss, generator=generator)
    return loss


def as_prompts(prompts: PromptsLike) -> list[Prompt]:
    """A prompt string ("a:1 | b:-0.5"), a :class:`Prompt`, or a sequence mixing both -> a list of Prompts."""
    if isinstance(prompts, (str, Prompt)):
        prompts = [prompts]
    out: list[Prompt] = []
    for item in prompts:
        out.extend([item] if isinstance(item, Prompt) else parse_prompts(item))
    return out


class CLIPGuidance:
    """A differentiable CLIP loss for images [B, 3, H, W] in [0, 1].

    >>> g = CLIPGuidance("a red circle on a blue background | blurry:-0.5", perceptor="shapes", cutn=16)
    >>> loss = g.loss(images)         # scalar, summed over the batch
    >>> loss, grad = g.gradient(images)  # for samplers and hooks: d loss / d images

    ``seed`` seeds the cutouts' and augmentations' own ``torch.Generator``, so a run is reproducible.
    """

    def __init__(self, prompts: PromptsLike, perceptor: Perceptor | ModelSpec | Sequence[ModelSpec] = "shapes", *,
                 config: GuidanceConfig | None = None, seed: int = 0, device: str | torch.device | None = None,
                 **options):
        self.config = guidance_config(config, **options)
        self.prompts = as_prompts(prompts)
        if not self.prompts:
            raise ClipguideError("guidance needs at least one prompt")
        self.perceptor = perceptor if isinstance(perceptor, Perceptor) else Perceptor(perceptor, device=device)
        self.device = self.perceptor.device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.cutouts = make_cutouts(self.config.cutouts, **self.config.cutout_options)
        self.distance = EMBEDDING_LOSSES.get(self.config.loss)
        self.regularisers = {name: (_with_generator(IMAGE_LOSSES.get(name), self.generator), w)
                             for name, w in self.config.regularisers.items()}
        self.weights = torch.tensor([p.weight for p in self.prompts], device=self.device)
        self.stops = torch.tensor([p.stop for p in self.prompts], device=self.device)
        image_prompts = {p.value: as_image_batch(open_image(p.value)).to(self.device)
                         for p in self.prompts if p.kind == "image"}  # read once, embedded by every member
        self.targets = [self._targets(i, image_prompts) for i in range(len(self.perceptor))]
        self.last_distances: torch.Tensor | None = None  # [P, B], signed by the prompt weights, from the last call

    # ---------------------------------------------------------------- targets

    def _targets(self, index: int, image_prompts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unit target embeddings [P, D] of every prompt under perceptor model ``index`` (``image_prompts``: path ->
        image [1, 3, H, W] in [0, 1] for the image prompts)."""
        texts = [p.value for p in self.prompts if p.kind == "text"]
        text_emb = iter(self.perceptor.encode_text(index, texts)) if texts else iter(())
        dim = self.perceptor.members[index].model.embed_dim
        rows = []
        for p in self.prompts:
            if p.kind == "text":
                rows.append(next(text_emb))
            elif p.kind == "noise":
                rows.append(noise_target(int(p.value), dim).to(self.device))
            else:
                rows.append(self._image_target(index, image_prompts[p.value]))
        return torch.stack(rows)

    def _image_target(self, index: int, image: torch.Tensor) -> torch.Tensor:
        model = self.perceptor.members[index].model
        with torch.no_grad():
            if self.config.image_prompt_cutn:
                generator = torch.Generator(self.device).manual_seed(0)
                views = self.cutouts(image, self.config.image_prompt_cutn, model.image_size, generator)
            else:
                views = model.preprocess.resize_crop(image)
            emb = self.perceptor.encode_views(index, views).mean(0)
        return emb / emb.norm()

    def reseed(self, seed: int) -> None:
        """Restart the cutouts' and augmentations' random stream from ``seed`` and forget the last distances: from
        here on it judges exactly as a new CLIPGuidance with that seed would, without encoding the prompts again."""
        self.generator.manual_seed(seed)
        self.last_distances = None

    # ------------------------------------------------------------------- loss

    def per_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms per image: {"total": [B], "prompts": [P, B] signed distances, <regulariser>: [B]}."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ClipguideError(f"guidance expects images [B, 3, H, W], got {tuple(images.shape)}")
        images = images.to(self.device)
        batch, cutn = images.shape[0], self.config.cutn
        sign = self.weights.sign()[:, None]
        total = images.new_zeros(batch)
        signed = images.new_zeros(len(self.prompts), batch)
        member_weights = sum(m.weight for m in self.perceptor.members)
        # CLIP embeddings, unit targets and parsed stops need no value checks, each a host sync on a GPU
        with without_value_checks():
            for index, member in enumerate(self.perceptor.members):
                views = self.config.augment(self.cutouts(images, cutn, member.model.image_size, self.generator),
                                            self.generator)
                emb = self.perceptor.encode_views(index, views)                                 # [cutn * B, D]
                dist = torch.stack([self.distance(emb, t[None]).view(cutn, batch).mean(0)
                                    for t in self.targets[index]])
                s = sign * dist                                                                 # [P, B]
                switched = stop_below(s, self.stops[:, None])
                total = total + member.weight * (self.weights.abs()[:, None] * switched).sum(0)
                signed = signed + member.weight * s.detach() / member_weights
        terms = {"prompts": signed}
        for name, (fn, weight) in self.regularisers.items():
            value = fn(images)
            terms[name] = value.detach()
            total = total + weight * value
        terms["total"] = total
        self.last_distances = signed
        return terms

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Scalar loss of ``images`` [B, 3, H, W] in [0, 1], summed over the batch; differentiable."""
        return self.per_image(images)["total"].sum()

    def gradient(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, d loss / d images) for images [B, 3, H, W]; the images' own graph is not touched."""
        x = images.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(x)
            grad, = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    def clip_score(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP score of each whole image: ``100 * max(cos, 0)`` against each positive prompt's target under the first
        perceptor model, averaged over the positive prompts. images [B, 3, H, W] in [0, 1] -> float [B] in [0, 100]
        (zeros when no prompt is positive). No cutouts or augmentations, so it does not draw on the generator."""
        model = self.perceptor.members[0].model
        positive = self.weights > 0
        if not positive.any():
            return images.new_zeros(len(images), dtype=torch.float32)
        cos = model.embed_images(images.to(self.device)).float() @ self.targets[0][positive].T
        return 100 * cos.clamp(min=0).mean(dim=1)

    def summary(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Batch-mean floats of :meth:`per_image`'s terms, keyed "total", each prompt's label, each regulariser."""
        out = {"total": float(terms["total"].detach().mean())}
        for p, row in zip(self.prompts, terms["prompts"]):
            out[self.label(p)] = float(row.mean())
        out.update({k: float(v.mean()) for k, v in terms.items() if k not in ("total", "prompts")})
        return out

    @staticmethod
    def label(prompt: Prompt) -> str:
        return {"text": prompt.value, "image": f"image {Path(prompt.value).name}",
                "noise": f"noise {prompt.value}"}[prompt.kind]

    def done(self) -> bool:
        """True when every prompt of every image is at or below its stop (never while a stop is -inf)."""
        if self.last_distances is None:
            return False
        return bool((self.last_distances <= self.stops[:, None]).all())
