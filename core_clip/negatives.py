"""Guidance negatives: pictures that the model itself would draw for a caption, trained as non-pictures.

CLIP guidance climbs image-text similarity by gradient ascent in image space. A CLIP trained on real pictures
only has never seen what that climb reaches (colour soup, texture, two shapes half-drawn in each other), and rates
much of it as highly as a real picture of the caption, so guidance stops there. Training against those images
closes the gap, as contrastive divergence does for energy models: a persistent buffer of images is climbed a few
steps towards its captions under the current model at every training step, and the climbed images join the batch
as pictures that match only a null caption. Their similarity to the captions they were climbed towards is then
pushed below that of real pictures, and the next climb has to find something closer to a real picture.

The climb imitates guidance: each step sees a randomly cropped, shifted and noised view (guidance cutouts), and
the gradient is restricted to a coarse grid for some chains (guidance generators draw on coarse grids too).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import NULL_CAPTION, UNCLEAR, Augment, Batch
from .errors import CoreClipError
from .model import ClipModel, eval_mode

@dataclass(frozen=True)
class NegativeConfig:
    """How guidance negatives are made.

    count: climbed images added to each micro-batch.
    steps: ascent steps each drawn chain takes per training step.
    buffer: persistent chains (each with an image and a target caption).
    step_size: RMS of one ascent step in [0, 1] pixel units.
    restart: probability that a drawn chain starts afresh (from noise or a real image, with a new caption).
    own: share of restarted chains that start from a true picture of their own caption, so that what guidance
        does to a real picture (it climbs away from it) is trained against too (0: starts ignore the caption).
    grids: coarse grid sides of the chains' gradients, as fractions of the image side (1.0: full resolution).
    caption: the null caption the climbed images are paired with.
    """

    count: int = 64
    steps: int = 4
    buffer: int = 512
    step_size: float = 0.02
    restart: float = 0.05
    grids: tuple[float, ...] = (0.25, 0.5, 1.0)
    own: float = 0.0
    caption: str = NULL_CAPTION

    def __post_init__(self) -> None:
        for name in ("count", "steps", "buffer"):
            if getattr(self, name) < 1:
                raise CoreClipError(f"negatives: {name} must be >= 1, got {getattr(self, name)}")
        if self.count > self.buffer:
            raise CoreClipError(f"negatives: count ({self.count}) cannot exceed the buffer ({self.buffer})")
        for name in ("restart", "own"):
            if not 0 <= getattr(self, name) <= 1:
                raise CoreClipError(f"negatives: {name} is a probability, got {getattr(self, name)}")
        if not self.grids or not all(0 < g <= 1 for g in self.grids):
            raise CoreClipError(f"negatives: grids are fractions in (0, 1], got {self.grids}")


# Views like guidance cutouts: larger crops and shifts and more noise than the training augmentation.
_VIEW = Augment(scale=(0.6, 1.0), shift=0.1, noise=0.05)


class NegativeBuffer:
    """Persistent chains of climbed images [buffer, 3, S, S] in [0, 1] and their target captions.

    Everything random comes from the buffer's own CPU generator, whose state travels in :meth:`state_dict`, so a
    resumed run draws the same negatives.
    """

    def __init__(self, cfg: NegativeConfig, image_size: int, seed: int):
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        g = self.generator
        self.images = _noise_images(cfg.buffer, image_size, g)
        self.captions: list[str] = [""] * cfg.buffer  # "" = no target yet: the chain restarts when first drawn
        self.grids = torch.tensor(cfg.grids)[torch.randint(len(cfg.grids), (cfg.buffer,), generator=g)]

    def state_dict(self) -> dict:
        return {"images": self.images.clone(), "captions": list(self.captions), "grids": self.grids.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["images"].shape != self.images.shape:
            raise CoreClipError(f"negatives buffer of shape {list(state['images'].shape)} does not fit "
                                f"{list(self.images.shape)}")
        self.images, self.captions, self.grids = state["images"], list(state["captions"]), state["grids"]
        self.generator.set_state(state["generator"])

    def draw(self, model: ClipModel, batch: Batch) -> torch.Tensor:
        """Climb ``count`` chains a few steps under ``model`` (used in eval mode) and return the climbed images
        float [count, 3, S, S] in [0, 1] on the model's device. Restarted chains take a caption of ``batch`` and
        start from noise or from one of its images (their own caption's with probability ``own``)."""
        cfg, g = self.cfg, self.generator
        index = torch.randperm(cfg.buffer, generator=g)[: cfg.count]
        restart = torch.rand(cfg.count, generator=g) < cfg.restart
        for k, i in enumerate(index.tolist()):
            if restart[k] or not self.captions[i]:
                # the caption and the starting picture are drawn independently, so that outside the ``own``
                # share a chain rarely starts on a picture of its own caption
                caption, picture = torch.randint(len(batch), (2,), generator=g).tolist()
                self.captions[i] = batch.captions[caption]
                if cfg.own and bool(torch.rand((), generator=g) < cfg.own):
                    picture, from_real = caption, True
                else:
                    from_real = bool(torch.rand((), generator=g) < 0.5)
                start = batch.images[picture] if from_real else _noise_images(1, self.images.shape[-1], g)[0]
                self.images[i] = start.cpu()
        images = self.images[index].to(model.device)
        with eval_mode(model):
            with torch.no_grad():
                targets = model.encode_text([self.captions[i] for i in index.tolist()])
            images = self._climb(model, images, targets, self.grids[index].tolist())
        self.images[index] = images.cpu()
        return images

    def _climb(self, model: ClipModel, images: torch.Tensor, targets: torch.Tensor,
               grids: Sequence[float]) -> torch.Tensor:
        side = images.shape[-1]
        for _ in range(self.cfg.steps):
            images = images.detach().requires_grad_(True)
            views = torch.stack([_VIEW(image, self.generator) for image in images])
            features = model.encode_image(model.preprocess.normalize(views), grad=True)
            grad, = torch.autograd.grad((features * targets).sum(), images)
            grad = torch.stack([_on_grid(gr, max(1, round(f * side))) for gr, f in zip(grad, grids)])
            rms = grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
            images = (images.detach() + self.cfg.step_size * grad / rms).clamp(0, 1)
        return images

    def extend(self, batch: Batch, negatives: torch.Tensor,
               tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None) -> Batch:
        """``batch`` followed by the climbed images, each captioned with the null caption (true of them only);
        ``tokenizer`` extends the batch's token ids too, when it carries them."""
        k = len(negatives)
        captions = [self.cfg.caption] * k
        tokens = batch.tokens
        if tokens is not None:
            if tokenizer is None:
                raise CoreClipError("extending a tokenized batch needs the tokenizer")
            tokens = torch.cat([tokens, tokenizer(captions).to(tokens.device)])
        return replace(batch, images=torch.cat([batch.images.to(negatives.device), negatives]),
                       captions=[*batch.captions, *captions], tokens=tokens,
                       facts=[*batch.facts, *[UNCLEAR] * k], claims=[*batch.claims, *[UNCLEAR] * k])


def _noise_images(n: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """Random colour fields [n, 3, side, side]: uniform noise on a grid of side / 4 cells, upsampled bilinearly."""
    cells = max(1, side // 4)
    coarse = torch.rand(n, 3, cells, cells, generator=generator)
    return F.interpolate(coarse, size=side, mode="bilinear", align_corners=False)


def _on_grid(grad: torch.Tensor, cells: int) -> torch.Tensor:
    """A gradient [3, S, S] restricted to images that are bilinear upsamplings of a cells x cells grid (its
    area average, upsampled back); cells >= S leaves it unchanged."""
    side = grad.shape[-1]
    if cells >= side:
        return grad
    coarse = F.adaptive_avg_pool2d(grad[None], cells)
    return F.interpolate(coarse, size=side, mode="bilinear", align_corners=False)[0]
