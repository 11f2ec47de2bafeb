"""Train the shipped ShapesWorld VQGAN (taming architecture; reconstruction + codebook losses, nothing downloaded).

    python -m clipguide.train_vqgan --out runs/vqgan --recipe shapes     # the shipped model: one 28-minute run
    cp runs/vqgan/vqgan.safetensors clipguide/weights/vqgan-shapes.safetensors
    cp runs/vqgan/vqgan.json clipguide/weights/vqgan-shapes.json

The network is fully convolutional (no attention), so it trains on random ``--crop`` x ``--crop`` windows of 64 px
renders, four times cheaper per step than whole pictures; its GroupNorms, though, take statistics over the whole
input, so the last ``--full-steps`` steps see whole pictures, as guidance will (full-picture error on a crop-only
model: 18/255, against 10/255 on crops). Codes that the
encoder has stopped choosing (a running usage count below ``--dead-usage``) are moved every ``--restart-every``
steps onto latents of the current batch, so the whole codebook stays in use. ``--codes`` sets the codebook size
and ``--factor`` the downsampling factor (2, 4 or 8: a 64 px picture becomes a grid of 32, 16 or 8 codes a side).

Besides the pixel error, the whole-picture steps can weigh terms aimed at what the oracle rejects: ``--texture``, the
error of neighbour differences (:func:`texture_error`), which penalises the faint texture that the oracle rejects on
flat colours far more than the pixel error does; ``--blend``, each pixel's distance from the segment between its
picture's two colours (:func:`blend_error`), which an anti-aliased edge whose channels change at different places
is far from; ``--outline``, the error of the shape's sharpened coverage in units of the picture's contrast
(:func:`outline_error`: the outline that the oracle fits shapes to, a small triangle's corners above all);
``--shape-blend``, the blend error averaged over the shape's own pixels (:func:`shape_blend_error`: the share the
oracle tests, which a small shape's edge fails unseen by the whole-picture mean); ``--frame``, the error of the
picture's outer 3-pixel frame (:func:`frame_error`), which the decoder's zero padding leaves off around large
shapes; and ``--shape-outline``, the outline error averaged over each shape's own pixels
(:func:`shape_outline_error`), where the smallest triangles weigh as much as large shapes. The blend, outline,
shape-blend, shape-outline and frame terms read the background off the picture's frame, so they apply only to the
whole-picture steps of a run that also trains on crops. The VQGAN shipped before (``--recipe shapes-13``) added them
one run at a time, 13 runs and 260 minutes in all, growing its codebook from 1,024 to 32,768 codes on the way:
``--init PATH`` starts a run from a saved VQGAN of the same architecture, or with fewer codes (its codebook fills the
first rows, and the first restart moves the new codes onto batch latents).

``--continuous-steps N`` trains the first N steps as a plain autoencoder (the encoder's latents decoded as they
are, no codebook), which learns ShapesWorld far faster per minute than through quantisation (the README's table:
71.6% read back after one 29-minute run, against 36.0%); then the codebook becomes the k-means centroids
(:func:`kmeans`) of the encoder's latents of ``--kmeans-pictures`` fresh pictures, and the remaining steps train
through it (``--decoder-only``: the decoder alone, the encoder and the fitted codebook as they are); with N equal to
``--steps`` the codebook is fitted after the last step and none trains through it. ``--kmeans-flat F`` fits it to
every edge patch's latent (:func:`edge_patches`) but only a share F of the flat patches', which are most of a
picture and spend codes on colours the oracle reads with a wide tolerance. ``--refill-rounds R`` follows the k-means
fit with R rounds that each move the ``--refill-codes`` least-used codes onto the latents of ``--refill-pictures``
more pictures that are farthest from every code (:func:`refill`). ``--code-dims D`` (for a codebook fitted after
the last step) puts the codes on the first D principal axes of those latents, scaled to a spread of about 1 and
folded into quant_conv and post_quant_conv (:func:`fold_projection`), and ``--kmeans-groups G`` fits them within
G coarse groups (:func:`grouped_kmeans`), which so many low-dimensional codes need: the shipped VQGAN's 131,072
codes of 6 dimensions take the bytes of 24,576 codes of 32. ``--latent-noise S`` adds Gaussian noise of S times
each latent channel's batch std to what the decoder sees in the first N steps: a decoder
trained so reads codes a little off its latents as it reads the latents, and an encoder trained against it spreads
what a code must say (the shape's exact colour above all) over its neighbours, so the codebook's snapping costs far
less (README: 86.6% read back against 69.2% for the same 16 minutes).

``--precision bf16`` runs the encoder and decoder under bf16 autocast (the code search and the losses stay fp32) on
this CPU's AMX units, and ``--compile`` fuses their kernels with torch.compile (about 30 s for each new input shape):
together about 2.2x the steps per second of fp32 (``benchmarks/vqgan_train_step.py``).

``--recipe NAME`` runs a named chain of runs (:data:`RECIPES`) into ``--out``/stage1, stage2, ..., each started from
the weights of the one before, and writes the last one's weights to ``--out``; settings that no stage sets (say
``--batch-size``) apply to every stage, and those a stage sets may not be given.

Batch i, its crop and its restarts are drawn from (seed, i), so ``--resume`` continues a killed run exactly (a
recipe: its finished stages are kept, the interrupted one continues); the model and the optimiser state are written
atomically every ``--save-every`` steps.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core_clip import shapes
from core_clip.checkpoint import atomic_write, load_strict, read_state_dict
from core_clip.errors import check_ranges
from core_clip.model import autocast

from .errors import ClipguideError
from .generators.base import clamp_with_grad
from .losses import segment_position
from .compiling import compiled
from .training import (check_precision, load_resume_state, run_script, run_settings, set_warmup_cosine_lr,
                       shapes_batch)
from .vqgan_model import VQGAN, VQGANConfig, latent_rows, nearest_codes

SIZE = 64             # ShapesWorld pictures are rendered, encoded and judged at 64 px
FACTORS = (2, 4, 8)
LATENT_CHANNELS = 32  # the encoder's output channels, and the code width unless --code-dims narrows it


def shapes_ddconfig(factor: int = 4) -> dict:
    """The taming ``ddconfig`` of the ShapesWorld VQGAN with downsampling ``factor`` (one of :data:`FACTORS`):
    :data:`SIZE` px pictures, 32 base channels doubled once, one level per halving, no attention."""
    return dict(double_z=False, z_channels=LATENT_CHANNELS, resolution=SIZE, in_channels=3, out_ch=3, ch=32,
                ch_mult=[1] + [2] * (factor.bit_length() - 1), num_res_blocks=1, attn_resolutions=[], dropout=0.0)


@dataclass
class VQGANTrainConfig:
    out: str
    steps: int = 3300
    batch_size: int = 32
    crop: int = 32
    codes: int = 1024
    factor: int = 4
    texture: float = 0.0
    blend: float = 0.0
    outline: float = 0.0
    shape_blend: float = 0.0
    shape_outline: float = 0.0
    frame: float = 0.0
    continuous_steps: int = 0
    latent_noise: float = 0.0
    kmeans_pictures: int = 1024
    kmeans_flat: float = 1.0      # share of flat patches' latents that k-means sees (edge patches: all)
    kmeans_groups: int = 1        # > 1: k-means within each of this many coarse groups (grouped_kmeans)
    code_dims: int = 0            # > 0: codes live on the latents' first principal axes (fold_projection)
    refill_rounds: int = 0        # after k-means: rounds moving little-used codes onto badly served latents
    refill_pictures: int = 1024   # fresh pictures encoded per round
    refill_codes: int = 2048      # codes moved per round
    decoder_only: bool = False  # the steps after the codebook fit train the decoder alone
    init: str = ""
    precision: str = "fp32"   # or bf16: autocast of the encoder and decoder (not the code search)
    compile: bool = False     # torch.compile the encoder and decoder (once for crops, once for whole pictures)
    full_steps: int = 700
    lr: float = 3e-3
    warmup: int = 50
    restart_every: int = 20
    dead_usage: float = 0.5
    seed: int = 0
    save_every: int = 250
    eval_images: int = 500
    resume: bool = False
    recipe: str = ""

    def __post_init__(self) -> None:
        check_ranges(self, ClipguideError,
                     positive=("steps", "batch_size", "codes", "restart_every", "save_every", "kmeans_pictures",
                               "kmeans_flat", "kmeans_groups", "refill_pictures", "refill_codes"),
                     non_negative=("lr", "latent_noise", "texture", "blend", "outline", "shape_blend", "shape_outline",
                                   "frame", "continuous_steps", "full_steps", "warmup", "dead_usage", "eval_images",
                                   "seed", "refill_rounds", "code_dims"))
        check_precision(self.precision)
        if self.factor not in FACTORS:
            raise ClipguideError(f"--factor must be one of {', '.join(map(str, FACTORS))}, got {self.factor}")
        if self.crop % self.factor or not self.factor <= self.crop <= SIZE:
            raise ClipguideError(f"--crop must be a multiple of {self.factor} from {self.factor} to {SIZE}, "
                                 f"got {self.crop}")
        if self.continuous_steps > self.steps:
            raise ClipguideError(f"--continuous-steps must be at most --steps ({self.steps}), got "
                                 f"{self.continuous_steps}")
        for flag, value in (("--latent-noise", self.latent_noise), ("--decoder-only", self.decoder_only),
                            ("--refill-rounds", self.refill_rounds)):
            if value and not self.continuous_steps:
                raise ClipguideError(f"{flag} applies only with --continuous-steps; set them too")
        if self.code_dims and self.continuous_steps != self.steps:
            raise ClipguideError("--code-dims applies only to a codebook fitted after the last step; set "
                                 f"--continuous-steps to --steps ({self.steps})")
        if self.code_dims > LATENT_CHANNELS:
            raise ClipguideError(f"--code-dims must be at most the {LATENT_CHANNELS} latent channels, got "
                                 f"{self.code_dims}")
        if self.kmeans_groups > self.codes:
            raise ClipguideError(f"--kmeans-groups must be at most --codes ({self.codes}), got {self.kmeans_groups}")
        if self.kmeans_flat > 1:
            raise ClipguideError(f"--kmeans-flat must be at most 1, got {self.kmeans_flat}")
        per_picture = (SIZE // self.factor) ** 2
        fewest = int(self.kmeans_pictures * per_picture * self.kmeans_flat)  # pictures without a single edge
        if self.continuous_steps and fewest < self.codes:
            give = f"with --kmeans-flat {self.kmeans_flat} give as few as" if self.kmeans_flat < 1 else "give"
            raise ClipguideError(f"--kmeans-pictures {self.kmeans_pictures} {give} {fewest} latents, fewer than the "
                                 f"{self.codes} codes fitted to them")
        refill_latents = self.refill_pictures * per_picture
        if self.refill_rounds and self.refill_codes > min(self.codes, refill_latents):
            raise ClipguideError(f"--refill-codes must be at most --codes ({self.codes}) and the {refill_latents} "
                                 f"latents of --refill-pictures {self.refill_pictures}, got {self.refill_codes}")
        if self.recipe and self.recipe not in RECIPES:
            raise ClipguideError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")


_WHOLE = dict(crop=SIZE, lr=1e-3, warmup=20, texture=1.0)            # whole-picture fine-tuning runs
_SHAPE = dict(_WHOLE, steps=600, full_steps=600, blend=4.0, outline=4.0, shape_blend=0.3)
_FRAME = dict(_SHAPE, lr=3e-4, frame=2.0)

#: Named chains of runs (``--recipe``): each stage's settings, on top of the defaults and the command line's.
RECIPES: dict[str, tuple[dict, ...]] = {
    "shapes": (                                                      # the shipped VQGAN: one 28-minute run (README)
        dict(steps=7350, crop=32, full_steps=2350, lr=3e-3, warmup=50, seed=0, texture=1.0, blend=4.0, outline=4.0,
             shape_blend=0.3, shape_outline=0.5, frame=2.0, continuous_steps=7350, latent_noise=0.35, codes=131072,
             code_dims=6, kmeans_pictures=4608, kmeans_flat=0.25, kmeans_groups=256, precision="bf16", compile=True),
    ),
    "shapes-13": (                                                   # the VQGAN shipped before: 260 minutes
        dict(steps=3300, crop=32, full_steps=700, lr=3e-3, warmup=50, seed=0),  # 32 px crops, then whole pictures
        dict(_WHOLE, steps=300, full_steps=300, seed=1),             # + texture
        dict(_SHAPE, outline=0.0, shape_blend=0.0, seed=2),          # + blend
        dict(_SHAPE, shape_blend=0.0, seed=3),                       # + outline
        dict(_SHAPE, seed=4),                                        # + shape blend
        dict(_SHAPE, seed=5),                                        # the same again
        dict(_FRAME, seed=8),                                        # + frame, lower learning rate
        dict(_FRAME, seed=9),                                        # the same again
        dict(_FRAME, codes=8192, seed=10),                           # 8x the codes
        dict(_FRAME, codes=32768, seed=11),                          # 4x again
        dict(_FRAME, codes=32768, seed=12),                          # the same again
        dict(_FRAME, codes=32768, shape_outline=0.5, seed=13),       # + shape outline
        dict(_FRAME, codes=32768, shape_outline=0.5, seed=14),       # the same again
    ),
}


@torch.no_grad()
def reconstruction_agreement(model: VQGAN, n: int = 500, seed: int = 1) -> float:
    """Fraction of ``n`` fresh test-split ShapesWorld images whose reconstruction the oracle reads exactly as it
    reads the original (every attribute)."""
    scenes = shapes.sample_scenes(n, seed=seed, split="test")
    originals = shapes.render_batch(scenes, SIZE, seed=seed)
    x = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1
    recon = torch.cat([model(chunk)[0] for chunk in x.split(100)])
    recon = ((recon + 1) / 2).clamp(0, 1)
    return sum(shapes.read(o) == shapes.read(r) for o, r in zip(originals, recon)) / n


def texture_error(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of the horizontal and vertical neighbour differences of images [B, C, H, W] (summed over
    the two directions): zero for a constant offset, large for a texture of a few levels on a flat colour."""
    return sum(F.l1_loss(recon.diff(dim=d), target.diff(dim=d)) for d in (-1, -2))


def _two_colours(target: torch.Tensor, border: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ShapesWorld picture's background (the median of its ``border``-pixel frame) and the axis from it to its shape
    colour (the mean of the pixels within 90% of the largest distance from the background), each [B, 3, 1, 1]."""
    t = border
    frame = torch.cat([target[..., :t, :].flatten(2), target[..., -t:, :].flatten(2),
                       target[..., :, :t].flatten(2), target[..., :, -t:].flatten(2)], dim=2)
    bg = frame.median(dim=2).values[..., None, None]
    dist2 = (target - bg).square().sum(1, keepdim=True)
    far = (dist2 >= 0.81 * dist2.amax(dim=(2, 3), keepdim=True)).float()
    return bg, (target * far).sum((2, 3), keepdim=True) / far.sum((2, 3), keepdim=True) - bg


def _coverage(x: torch.Tensor, bg: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Where each pixel of ``x`` [B, 3, H, W] lies along ``bg + alpha * axis`` (0: background, 1: shape colour),
    unclamped, [B, 1, H, W]."""
    return segment_position(x, bg, axis, eps=1e-6)


def blend_error(recon: torch.Tensor, target: torch.Tensor, border: int = 2) -> torch.Tensor:
    """Mean distance of each pixel of ``recon`` [B, 3, H, W] from the segment between its target's two colours.

    The target is a ShapesWorld picture (any range; its colours as :func:`_two_colours` finds them). Every pixel of a
    clean picture, anti-aliased edge included, is a blend of the two, and the oracle reads a shape only when 95% of
    its pixels are; an edge whose channels change at different places is off that segment however small its pixel
    error. The distance is smoothed at 0 (sqrt(d^2 + 1e-6)) so its gradient stays finite.
    """
    return _off_segment(recon, *_two_colours(target, border)).mean()


def shape_blend_error(recon: torch.Tensor, target: torch.Tensor, border: int = 2) -> torch.Tensor:
    """:func:`blend_error` over each target's shape and its 1-pixel rim only (:func:`_per_shape_mean`).

    The oracle's test is the share of a shape's own pixels that are off the segment, so a small shape, a few percent
    of the picture, fails it with errors that :func:`blend_error`'s mean over the whole picture hardly sees.
    """
    bg, axis = _two_colours(target, border)
    return _per_shape_mean(_off_segment(recon, bg, axis), target, bg, axis)


def _per_shape_mean(error: torch.Tensor, target: torch.Tensor, bg: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """The mean of ``error`` [B, H, W] over each target's shape and its 1-pixel rim (the pixels more than 0.1 of its
    contrast from its background, dilated), per picture, then over the batch: a small shape weighs as much as a
    large one."""
    inside = (_coverage(target, bg, axis) > 0.1).float()
    region = F.max_pool2d(inside, 3, stride=1, padding=1)[:, 0]                           # [B, H, W]
    return ((error * region).sum((1, 2)) / region.sum((1, 2)).clamp_min(1)).mean()


def _off_segment(x: torch.Tensor, bg: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Distance [B, H, W] of each pixel of ``x`` from the segment from ``bg`` to ``bg + axis``, smoothed at 0."""
    off = x - bg - _coverage(x, bg, axis).clamp(0, 1) * axis
    return (off.square().sum(1) + 1e-6).sqrt()


def outline_error(recon: torch.Tensor, target: torch.Tensor, border: int = 2) -> torch.Tensor:
    """Mean absolute difference between the sharpened shape coverage of ``recon`` and of ``target`` [B, 3, H, W].

    Coverage is the position of each pixel along the segment between the target's two colours (0 background, 1
    shape), so the error is measured in units of the picture's own contrast: a shape whose colour is close to its
    background's weighs as much as one far from it, unlike in the pixel error. Sharpening, ``clamp(2 (a - 0.5) +
    0.5, 0, 1)``, is the oracle's, which fits shapes to the coverage's 0.5 level line: an error there, at a small
    triangle's corners say, counts double, and one far inside or outside the shape counts only when it crosses into
    the edge band. The clamp of ``recon``'s coverage passes the gradients that lead back into [0, 1].
    """
    return _outline_map(recon, target, *_two_colours(target, border)).mean()


def shape_outline_error(recon: torch.Tensor, target: torch.Tensor, border: int = 2) -> torch.Tensor:
    """:func:`outline_error` over each target's shape and its 1-pixel rim only (:func:`_per_shape_mean`).

    The oracle reads a shape only when its fitted outline overlaps the coverage with IoU 0.9, so the smallest
    triangles (about 150 pixels with their rim) fail on a few pixels missing at their corners, errors that
    :func:`outline_error` spreads over the picture's 4,096 pixels.
    """
    bg, axis = _two_colours(target, border)
    return _per_shape_mean(_outline_map(recon, target, bg, axis), target, bg, axis)


def _outline_map(recon: torch.Tensor, target: torch.Tensor, bg: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Absolute difference [B, H, W] of the sharpened coverages of ``recon`` and ``target`` (:func:`outline_error`)."""

    def sharpened(x: torch.Tensor) -> torch.Tensor:
        return 2 * (_coverage(x, bg, axis) - 0.5) + 0.5

    return (clamp_with_grad(sharpened(recon)) - sharpened(target).clamp(0, 1)).abs()[:, 0]


def frame_error(recon: torch.Tensor, target: torch.Tensor, width: int = 3) -> torch.Tensor:
    """Mean absolute error [] of images [B, C, H, W] over their outer ``width``-pixel frame only.

    The oracle reads a background only when 95% of the picture's 2-pixel frame is within 12/255 of its median, and a
    convolutional decoder errs most at the picture's edge (zero padding), more so around a large shape, whose area
    shifts the GroupNorm statistics: a tenth of the picture's pixels, the frame hardly moves the whole-picture mean.
    """
    inner = torch.zeros_like(target[:1, :1])
    inner[..., width:-width, width:-width] = 1
    frame = 1 - inner
    return ((recon - target).abs() * frame).sum() / (frame.sum() * target.shape[0] * target.shape[1])


# Loss terms that read a picture's background off its outer frame, so they apply to whole-picture steps only (the
# edge of a crop is no background); config field -> term.
PICTURE_TERMS = {"blend": blend_error, "outline": outline_error, "shape_blend": shape_blend_error,
                 "shape_outline": shape_outline_error, "frame": frame_error}


def _crop(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random size x size window (the same for the whole batch) of images [B, 3, H, W]."""
    if size >= x.shape[-1]:
        return x
    top, left = torch.randint(0, x.shape[-1] - size + 1, (2,), generator=generator).tolist()
    return x[:, :, top:top + size, left:left + size]


def _noisy(z: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Latents [B, D, h, w] plus Gaussian noise of ``scale`` times each channel's batch std (detached)."""
    if not scale:
        return z
    noise = torch.randn(z.shape, generator=generator)
    return z + scale * z.detach().std(dim=(0, 2, 3), keepdim=True) * noise


@torch.no_grad()
def _restart_dead_codes(model: VQGAN, z: torch.Tensor, usage: torch.Tensor, dead_usage: float,
                        generator: torch.Generator) -> None:
    """Move every code whose running usage is below ``dead_usage`` onto a random latent of ``z`` [B, D, h, w]."""
    dead = (usage < dead_usage).nonzero().flatten()
    if len(dead):
        flat = latent_rows(z)
        model.codebook[dead] = flat[torch.randint(0, len(flat), (len(dead),), generator=generator)]
        usage[dead] = 1.0


@torch.no_grad()
def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means: ``k`` centroids [k, D] of ``points`` [N, D] (N >= k), started from k of the points drawn
    without replacement, then ``iterations`` times moved to the mean of the points nearest each. A centroid that no
    point is nearest to (a duplicate start, say) moves onto a random point instead."""
    centroids = points[torch.randperm(len(points), generator=generator)[:k]]
    for _ in tqdm(range(iterations), desc="k-means", leave=False):
        index = nearest_codes(points, centroids)
        count = torch.bincount(index, minlength=k)[:, None]
        means = torch.zeros_like(centroids).index_add_(0, index, points) / count.clamp_min(1)
        spare = points[torch.randint(0, len(points), (k,), generator=generator)]
        centroids = torch.where(count > 0, means, spare)
    return centroids


def _shares(counts: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` split over groups in proportion to their ``counts`` [G] (largest remainders, the lower index first
    among equals): int64 [G] summing to k, none above its count when k is at most their sum."""
    exact = counts.double() * k / counts.sum()
    shares = exact.floor().long()
    shares[(exact - shares).argsort(descending=True, stable=True)[:k - int(shares.sum())]] += 1
    return shares


@torch.no_grad()
def grouped_kmeans(points: torch.Tensor, k: int, groups: int, iterations: int,
                   generator: torch.Generator) -> torch.Tensor:
    """``k`` centroids [k, D] of ``points`` [N, D] (N >= k): :func:`kmeans` of the points into ``groups`` coarse
    centroids, then each coarse group's points (those nearest its centroid) k-means'd into a share of the k codes
    proportional to their number. Each Lloyd iteration then compares a point with its group's codes only: about
    N * k / groups distances instead of N * k, which for low-dimensional latents (``--code-dims``) are what the
    search's time goes to (131,072 codes, 362,728 points of 8 dimensions: 77 s an iteration for plain k-means)."""
    label = nearest_codes(points, kmeans(points, groups, iterations, generator))
    shares = _shares(torch.bincount(label, minlength=groups), k)
    return torch.cat([kmeans(points[label == g], int(n), iterations, generator)
                      for g, n in enumerate(tqdm(shares, desc="groups", leave=False)) if n])


@torch.no_grad()
def principal_axes(rows: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and the first ``dims`` principal axes [dims, D] (orthonormal rows, most variance first) of
    ``rows`` [N, D]."""
    centred = rows.double() - rows.double().mean(0)  # float64: sums over 10^5 rows
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # eigenvalues ascending
    return rows.mean(0), vectors.flip(1)[:, :dims].T.float().contiguous()


def unit_scale(coordinates: torch.Tensor) -> float:
    """The power of two nearest 1 / the rms spread of ``coordinates`` [N, d] about their mean: scaled by it, they
    spread about as far as the latents that guidance's learning rates are set for (the VQGAN backend's Adam steps
    of 0.1). Scaling floats by a power of two is exact, so k-means and the nearest-code search choose the same codes
    as they would unscaled."""
    return 2.0 ** -round(math.log2(coordinates.var(0, correction=0).mean().sqrt().item()))


@torch.no_grad()
def fold_projection(model: VQGAN, mean: torch.Tensor, axes: torch.Tensor, scale: float = 1.0) -> VQGAN:
    """A copy of ``model`` whose code space is ``axes`` [d, D] (orthonormal rows) through ``mean`` [D], in units of
    ``1 / scale``: its quant_conv gives the coordinates ``scale * (z - mean) @ axes.T`` [B, d, h, w] of the latents
    z [B, D, h, w], and its post_quant_conv reads coordinates c as ``mean + c @ axes / scale`` would be read, so a
    latent in that subspace decodes exactly as before: a taming VQModel with ``embed_dim`` d, whose codes are the
    old ones' coordinates. The encoder's latents hold almost all their variance in a few directions (the shapes
    VQGAN: 99.99% in 8 of 32), so the same bytes hold several times the codes."""
    folded = VQGAN(replace(model.config, embed_dim=len(axes)))
    state = model.state_dict()
    enc_w, enc_b = state["quant_conv.weight"].flatten(1), state["quant_conv.bias"]
    dec_w, dec_b = state["post_quant_conv.weight"].flatten(1), state["post_quant_conv.bias"]
    state.update({"quant_conv.weight": (axes @ enc_w)[:, :, None, None] * scale,
                  "quant_conv.bias": (axes @ (enc_b - mean)) * scale,
                  "post_quant_conv.weight": (dec_w @ axes.T)[:, :, None, None] / scale,
                  "post_quant_conv.bias": dec_w @ mean + dec_b,
                  _CODEBOOK: ((state[_CODEBOOK] - mean) @ axes.T) * scale})
    load_strict(folded, state, "the folded VQGAN")
    return folded


@torch.no_grad()
def refill(codebook: torch.Tensor, seen: torch.Tensor, fresh: torch.Tensor, n: int) -> torch.Tensor:
    """Move the ``n`` codes of ``codebook`` [K, D] nearest to the fewest rows of ``seen`` [N, D] (the lower index
    first among equals) onto the ``n`` rows of ``fresh`` [M, D] farthest from their nearest code; returns the new
    codebook [K, D]. k-means spends its codes where latents are dense, and the rare edge patches that a small
    shape's read-back depends on are left far from any code; this trades codes from crowded places for them."""
    use = torch.bincount(nearest_codes(seen, codebook), minlength=len(codebook))
    error = (fresh - codebook[nearest_codes(fresh, codebook)]).square().sum(1)
    codebook = codebook.clone()
    codebook[use.argsort(stable=True)[:n]] = fresh[error.topk(n).indices]
    return codebook


KMEANS_ITERATIONS = 8
_KMEANS_BATCH = 64


EDGE_RANGE = 0.1   # a patch whose pixels span more than this (of [-1, 1], 13/255) in some channel holds an edge


def edge_patches(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Which ``factor`` x ``factor`` patches of the pictures ``x`` [B, 3, H, W] in [-1, 1] hold an edge (their pixels
    span more than :data:`EDGE_RANGE` in some channel): bool [B * H/factor * W/factor], in :func:`latent_rows` order,
    so one flag per latent of the patch."""
    patches = F.unfold(x, factor, stride=factor).unflatten(1, (x.shape[1], factor * factor))  # [B, C, f * f, L]
    return ((patches.amax(2) - patches.amin(2)).amax(1) > EDGE_RANGE).flatten()


def _fresh_latents(model: VQGAN, cfg: VQGANTrainConfig, first: int, pictures: int,
                   generator: torch.Generator) -> torch.Tensor:
    """The encoder's latent rows [N, D] of ``pictures`` pictures drawn as batches of :data:`_KMEANS_BATCH` numbered
    from ``cfg.steps + first`` on (after the run's last, so never trained on): every edge patch's latent and each flat
    patch's with probability ``cfg.kmeans_flat``."""
    rows = []
    for i, start in enumerate(range(0, pictures, _KMEANS_BATCH)):
        x = shapes_batch(cfg.steps + first + i, min(_KMEANS_BATCH, pictures - start), SIZE, cfg.seed)
        z = latent_rows(model.encode(x))
        if cfg.kmeans_flat < 1:
            z = z[edge_patches(x, cfg.factor) | (torch.rand(len(z), generator=generator) < cfg.kmeans_flat)]
        rows.append(z)
    return torch.cat(rows)


@torch.no_grad()
def _fit_codebook(model: VQGAN, cfg: VQGANTrainConfig, usage: torch.Tensor) -> VQGAN:
    """Set the codebook to the k-means centroids of the encoder's latents of ``cfg.kmeans_pictures`` fresh pictures
    (with only ``cfg.kmeans_flat`` of the flat patches': a flat picture is mostly the same few latents, which k-means
    would spend codes on that the rare edge patches need; in ``cfg.kmeans_groups`` groups), then
    ``cfg.refill_rounds`` times :func:`refill` it from ``cfg.refill_pictures`` more (the usage counted over every
    latent seen so far), and mark every code used. With ``cfg.code_dims``, the codes live on the first principal
    axes of those latents, scaled to a spread about 1 (:func:`fold_projection`, :func:`unit_scale`). Returns the model
    with its codebook (a new one when folded)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    seen = _fresh_latents(model, cfg, 0, cfg.kmeans_pictures, generator)
    if cfg.code_dims:
        mean, axes = principal_axes(seen, cfg.code_dims)
        seen = (seen - mean) @ axes.T
        scale = unit_scale(seen)  # the continuous latents' scale drifts freely: the shapes VQGAN's spread 62
        model, seen = fold_projection(model, mean, axes, scale), seen * scale
    tqdm.write(f"codebook: k-means of {len(seen):,} latents of {cfg.kmeans_pictures} pictures into "
               f"{len(usage):,} codes of {seen.shape[1]} dimensions")
    codebook = (grouped_kmeans(seen, len(usage), cfg.kmeans_groups, KMEANS_ITERATIONS, generator)
                if cfg.kmeans_groups > 1 else kmeans(seen, len(usage), KMEANS_ITERATIONS, generator))
    first = -(-cfg.kmeans_pictures // _KMEANS_BATCH)
    for _ in tqdm(range(cfg.refill_rounds), desc="refill", leave=False):
        fresh = _fresh_latents(model, cfg, first, cfg.refill_pictures, generator)
        codebook = refill(codebook, seen, fresh, cfg.refill_codes)
        seen, first = torch.cat([seen, fresh]), first + -(-cfg.refill_pictures // _KMEANS_BATCH)
    model.codebook.copy_(codebook)
    usage.fill_(1.0)
    return model


_CODEBOOK = "quantize.embedding.weight"


@torch.no_grad()
def _load_init(model: VQGAN, path: str, usage: torch.Tensor, generator: torch.Generator) -> None:
    """Load the weights at ``path`` into ``model``. A smaller codebook (same code width) fills the first rows of
    ``model``'s; each new row starts as a copy of a random old code (so whichever of the two a latent snaps to, it
    decodes the same) marked unused (``usage`` 0), so the first dead-code restart moves it onto a batch latent."""
    state = dict(read_state_dict(path))
    old, new = state.get(_CODEBOOK), model.codebook
    if old is not None and old.ndim == 2 and old.shape[1] == new.shape[1] and len(old) < len(new):
        state[_CODEBOOK] = torch.cat([old, old[torch.randint(0, len(old), (len(new) - len(old),),
                                                             generator=generator)]])
        usage[len(old):] = 0
    load_strict(model, state, path)


def train_recipe(cfg: VQGANTrainConfig) -> VQGAN:
    """Run the stages of ``cfg.recipe`` into ``cfg.out``/stage1, stage2, ..., each from the one before's weights
    (the first from ``cfg.init``, when given); write the last stage's model to ``cfg.out`` and return it."""
    stages = RECIPES[cfg.recipe]
    defaults = VQGANTrainConfig(out=cfg.out)
    given = sorted({k for stage in stages for k in stage if getattr(cfg, k) != getattr(defaults, k)})
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ClipguideError(f"--recipe {cfg.recipe} sets {flags} itself; leave {'it' if len(given) == 1 else 'them'} "
                             "out")
    outs = [Path(cfg.out) / f"stage{i}" for i in range(1, len(stages) + 1)]
    if cfg.resume and not any((out / "state.pt").is_file() for out in outs):
        raise ClipguideError(f"nothing to resume in {cfg.out}: no stage has a state.pt there (run once without "
                             "--resume)")
    init = cfg.init
    for i, (settings, out) in enumerate(zip(stages, outs), 1):
        last = i == len(stages)
        tqdm.write(f"stage {i} of {len(stages)}: {settings}")
        model = train(replace(cfg, recipe="", out=str(out), init=init, eval_images=cfg.eval_images if last else 0,
                              resume=cfg.resume and (out / "state.pt").is_file(), **settings))
        init = str(out / "vqgan.safetensors")
    model.save(Path(cfg.out) / "vqgan.safetensors")
    return model


def train(cfg: VQGANTrainConfig) -> VQGAN:
    """One training run (or, with ``cfg.recipe``, the recipe's chain of runs: :func:`train_recipe`)."""
    if cfg.recipe:
        return train_recipe(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = load_resume_state(out, cfg) if cfg.resume else None
    start = state["step"] if state else 0
    folded = bool(cfg.code_dims) and start == cfg.steps  # a finished --code-dims run saved its folded model
    model = VQGAN(VQGANConfig(ddconfig=shapes_ddconfig(cfg.factor), n_embed=cfg.codes,
                              embed_dim=cfg.code_dims if folded else LATENT_CHANNELS))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    usage = torch.ones(model.config.n_embed)  # running count of each code's picks (decay 0.99 per step)
    if state:
        load_strict(model, read_state_dict(out / "vqgan.safetensors"), str(out))
        optimizer.load_state_dict(state["optimizer"])
        usage = state["usage"]
    elif cfg.init:  # a resumed run has its own weights
        _load_init(model, cfg.init, usage, torch.Generator().manual_seed(cfg.seed))
    encode, decode = model.encode, model.decode
    if cfg.compile:
        encode, decode = compiled(encode, torch.device("cpu")), compiled(decode, torch.device("cpu"))
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="vqgan")
    for step in bar:
        set_warmup_cosine_lr(optimizer, step, cfg.steps, cfg.warmup, cfg.lr)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        crop = cfg.crop if step < cfg.steps - cfg.full_steps else SIZE
        x = _crop(shapes_batch(step, cfg.batch_size, SIZE, cfg.seed), crop, generator)
        quantised = step >= cfg.continuous_steps
        frozen = quantised and cfg.decoder_only
        with torch.set_grad_enabled(not frozen), autocast(cfg.precision):
            z = encode(x).float()
        if quantised:
            z_q, codebook_loss, picks = model.quantize_st(z)
            if frozen:  # the codebook stays as fitted
                codebook_loss = codebook_loss.detach()
        else:
            z_q, codebook_loss = _noisy(z, cfg.latent_noise, generator), z.new_zeros(())
        with autocast(cfg.precision):
            recon = decode(z_q).float()
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + codebook_loss
        for name, term in {"texture": texture_error, **(PICTURE_TERMS if crop >= SIZE else {})}.items():
            if getattr(cfg, name):
                loss = loss + getattr(cfg, name) * term(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if quantised:
            usage = 0.99 * usage + torch.bincount(picks, minlength=len(usage)).float()
            if (step + 1) % cfg.restart_every == 0 and step + 1 < cfg.steps and not frozen:
                _restart_dead_codes(model, z.detach(), usage, cfg.dead_usage, generator)
        if step + 1 == cfg.continuous_steps:  # before the checkpoint below, which then holds the fitted codebook
            model = _fit_codebook(model, cfg, usage)
        bar.set_postfix(rec=f"{rec.item():.4f}", codebook=f"{codebook_loss.item():.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            model.save(out / "vqgan.safetensors")
            atomic_write(out / "state.pt", lambda p: torch.save({"optimizer": optimizer.state_dict(), "usage": usage,
                                                                 "step": step + 1, "settings": run_settings(cfg)}, p))
    model.eval()
    if cfg.eval_images:
        tqdm.write(f"oracle reads {reconstruction_agreement(model, cfg.eval_images):.1%} of {cfg.eval_images} fresh "
                   "reconstructions as the originals")
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_script(train, VQGANTrainConfig, "python -m clipguide.train_vqgan", __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
