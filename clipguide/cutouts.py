"""Cutouts and differentiable augmentations: many random views of the generator's images at the CLIP's input size.

A cutout scheme (an instance of a class in :data:`CUTOUTS`) is called as
``scheme(images, cutn, size, generator)``: ``images`` float [B, 3, H, W] in [0, 1] -> views [cutn * B, 3, size, size]
in [0, 1], ordered cut-major (``out[k * B + b]`` is cut k of image b, so ``out.view(cutn, B, 3, size, size)`` works),
differentiable with respect to ``images``. :class:`Augment` then perturbs each view with its own random parameters.
Every random number comes from the ``torch.Generator`` passed in, in one batched draw per call, so a seed fixes the
result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from kornia.geometry.conversions import convert_affinematrix_to_homography
from kornia.geometry.transform import get_perspective_transform, get_rotation_matrix2d, warp_perspective
from torch import Tensor

from core_clip.constants import constant

from .errors import ClipguideError
from .resample import PADDING_MODES, resample
from .registry import Registry

CUTOUTS = Registry[type]("cutout scheme")


class CutoutScheme(Protocol):
    """What :func:`make_cutouts` returns: images [B, 3, H, W] -> views [cutn * B, 3, size, size], cut-major."""

    def __call__(self, images: Tensor, cutn: int, size: int, generator: torch.Generator) -> Tensor: ...


def _check_number(owner: str, name: str, value: object, low: float, high: float,
                  low_open: bool = False, high_open: bool = False) -> None:
    """ClipguideError unless ``value`` is a real number in the interval [low, high] (ends open where asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ClipguideError(f"{owner}: {name} must be a number in {interval}, got {value!r}")


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClipguideError(f"{name} must be an integer >= 1, got {value!r}")


def _check_images(name: str, images: object) -> None:
    """ClipguideError unless ``images`` is a non-empty float tensor [N, 3, H, W]."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        got = f"{images.dtype} tensor of shape {list(images.shape)}" if isinstance(images, Tensor) else type(images)
        raise ClipguideError(f"{name} must be a float tensor [N, 3, H, W], got {got}")
    if images.numel() == 0:
        raise ClipguideError(f"{name} must not be empty, got shape {list(images.shape)}")


def _check_generator(generator: object, images: Tensor) -> None:
    if not isinstance(generator, torch.Generator):
        raise ClipguideError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != images.device.type:
        raise ClipguideError(f"generator is on {generator.device} but the images are on {images.device}")


def _check_call(images: Tensor, cutn: int, generator: torch.Generator) -> None:
    _check_images("images", images)
    _check_count("cutn", cutn)
    _check_generator(generator, images)


def crop_resize(images: Tensor, boxes: Tensor, size: int, mirror: Tensor | None = None, *,
                deterministic: bool | None = None, max_side: float | None = None) -> Tensor:
    """Square crops of ``images`` resized to ``size`` x ``size``, all in one bilinear resampling: one
    ``grid_sample`` call, or with ``deterministic`` (default: on CUDA, whose ``grid_sample`` backward uses atomic
    adds) :func:`clipguide.resample.resample`, whose gradient repeats bit for bit. Both compute the same function.

    images: float [B, C, H, W]. boxes: float [cutn, B, 3], (x0, y0, side) in pixels, where the image
    covers [0, W] x [0, H] (pixel (i, j) is the unit square at (j, i)); boxes may be fractional and may reach outside
    the image, which is then padded with its edge values. mirror: optional bool [cutn, B], True flips that crop
    horizontally. Returns [cutn * B, C, size, size], cut-major; values stay within the input's range.

    Crops at least 1.5x larger than ``size`` are sampled on a k x k sub-grid per output pixel (k = the largest side /
    size, rounded) and averaged, an area filter, so downscaling does not alias; milder downscales are plain bilinear,
    whose aliasing there is small and whose cost is a quarter of the 2 x 2 filter's.

    max_side: the largest side the boxes can have, where the caller knows it (a cutout scheme knows its image); it
    then sets k, and the sides are the caller's to keep positive. By default k comes from the boxes' largest side
    and the sides are checked, which reads them back from the device: on a GPU, that waits for all queued work and
    leaves the GPU idle while the host launches what follows.
    """
    _check_images("images", images)
    _check_count("size", size)
    batch, channels, height, width = images.shape
    if boxes.dim() != 3 or boxes.shape[1:] != (batch, 3) or (max_side is None and not bool((boxes[..., 2] > 0).all())):
        raise ClipguideError(f"boxes must be [cutn, {batch}, 3] (x0, y0, side > 0), got shape {list(boxes.shape)}")
    if max_side is not None:
        _check_number("crop_resize", "max_side", max_side, 0, math.inf, low_open=True, high_open=True)
    cutn = boxes.shape[0]
    x0, y0, side = boxes.to(images).flatten(0, 1).unbind(-1)                      # [cutn * B] each
    k = max(1, round((side.max().item() if max_side is None else max_side) / size))
    fine = k * size
    # sample i of the fine grid sits at fraction (i + 0.5) / fine of the box; pixel centres are at integers
    frac = (torch.arange(fine, device=images.device, dtype=images.dtype) + 0.5) / fine
    ys = y0[:, None] + side[:, None] * frac - 0.5                                   # [cutn * B, fine]
    xs = x0[:, None] + side[:, None] * (frac if mirror is None else
                                        torch.where(mirror.flatten()[:, None], 1 - frac, frac)) - 0.5
    if images.is_cuda if deterministic is None else deterministic:
        return resample(images, xs.view(-1, size, k), ys.view(-1, size, k), "border")
    # Stack each image's cuts vertically in one grid, so grid_sample reads the B images without copying them cutn times.
    gx = ((2 * xs + 1) / width - 1).view(cutn, batch, 1, fine).expand(cutn, batch, fine, fine)
    gy = ((2 * ys + 1) / height - 1).view(cutn, batch, fine, 1).expand(cutn, batch, fine, fine)
    grid = torch.stack([gx, gy], -1).transpose(0, 1).reshape(batch, cutn * fine, fine, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.view(batch, channels, cutn, fine, fine).permute(2, 0, 1, 3, 4).reshape(cutn * batch, channels, fine, fine)
    return F.avg_pool2d(out, k) if k > 1 else out


def _random_squares(u: Tensor, height: int, width: int, min_size: float, power: float) -> Tensor:
    """Uniform draws u [..., 3] in [0, 1) -> square boxes [..., 3] (x0, y0, side) in pixels inside an H x W image.

    side = max_side * (min_size + (1 - min_size) * u0 ** power) with max_side = min(H, W); the offset is uniform over
    the positions that keep the square inside the image.
    """
    side = min(height, width) * (min_size + (1 - min_size) * u[..., 0] ** power)
    return torch.stack([u[..., 1] * (width - side), u[..., 2] * (height - side), side], -1)


@CUTOUTS.register("classic")
@dataclass(frozen=True)
class ClassicCutouts:
    """The VQGAN+CLIP notebook's cutouts: random square crops, resized to ``size``.

    Each cut's side is ``min_side + (max_side - min_side) * u ** cut_pow`` (u uniform in [0, 1), max_side the image's
    shorter side, min_side = min_size * max_side; cut_pow > 1 favours small crops), at a uniformly random position
    inside the image. Unlike the notebook, sides and offsets are not rounded to whole pixels. The resampling filter
    is sized for the largest crop the scheme can draw (the shorter side), so no crop size is read back from the device.

    The default ``min_size`` of 0.8 keeps the whole subject of a small picture in view; the notebooks never crop below
    the CLIP's input size, which on their 400-600 px canvases is about 0.4-0.55 of the side.
    """

    cut_pow: float = 1.0
    min_size: float = 0.8

    def __post_init__(self) -> None:
        _check_number("classic cutouts", "cut_pow", self.cut_pow, 0, math.inf, low_open=True, high_open=True)
        _check_number("classic cutouts", "min_size", self.min_size, 0, 1, low_open=True)

    def boxes(self, images: Tensor, cutn: int, generator: torch.Generator) -> Tensor:
        """The crop boxes that ``__call__`` with the same generator state uses: [cutn, B, 3] (x0, y0, side) pixels."""
        _check_call(images, cutn, generator)
        u = torch.rand(cutn, images.shape[0], 3, generator=generator, device=images.device, dtype=images.dtype)
        return _random_squares(u, images.shape[2], images.shape[3], self.min_size, self.cut_pow)

    def __call__(self, images: Tensor, cutn: int, size: int, generator: torch.Generator) -> Tensor:
        """images float [B, 3, H, W] in [0, 1] -> [cutn * B, 3, size, size] in [0, 1], cut-major."""
        return crop_resize(images, self.boxes(images, cutn, generator), size, max_side=min(images.shape[-2:]))


@CUTOUTS.register("pooled")
@dataclass(frozen=True)
class PooledCutouts:
    """nerdyrodent/VQGAN-CLIP's "updated" cutouts: the whole image pooled to ``size`` x ``size``.

    Every cut is (adaptive_avg_pool + adaptive_max_pool) / 2 of the whole image, so all cuts are identical and only
    an :class:`Augment` makes them differ; the generator is not used. A non-square image is pooled as it is, which
    squashes it to a square (its aspect ratio is not kept).
    """

    def __call__(self, images: Tensor, cutn: int, size: int, generator: torch.Generator) -> Tensor:
        """images float [B, 3, H, W] in [0, 1] -> [cutn * B, 3, size, size] in [0, 1], cut-major."""
        _check_call(images, cutn, generator)
        _check_count("size", size)
        pooled = (F.adaptive_avg_pool2d(images, size) + F.adaptive_max_pool2d(images, size)) / 2
        return pooled.repeat(cutn, 1, 1, 1)


@CUTOUTS.register("disco")
@dataclass(frozen=True)
class DiscoCutouts:
    """Disco Diffusion's cutouts: a few overview views of the whole image, the rest inner crops.

    The first ``round(overview * cutn)`` cuts (halves rounded up) are the whole image padded to a centred square with
    its edge values and resized to ``size``; every second one (cuts 1, 3, ...) is flipped horizontally. The other cuts
    are random square crops as in :class:`ClassicCutouts` with exponent ``inner_pow``, each turned greyscale (ITU-R
    601 luma, kept 3-channel) with probability ``grey``.
    """

    overview: float = 0.25
    inner_pow: float = 1.0
    min_size: float = 0.2
    grey: float = 0.1

    def __post_init__(self) -> None:
        _check_number("disco cutouts", "overview", self.overview, 0, 1)
        _check_number("disco cutouts", "inner_pow", self.inner_pow, 0, math.inf, low_open=True, high_open=True)
        _check_number("disco cutouts", "min_size", self.min_size, 0, 1, low_open=True)
        _check_number("disco cutouts", "grey", self.grey, 0, 1)

    def __call__(self, images: Tensor, cutn: int, size: int, generator: torch.Generator) -> Tensor:
        """images float [B, 3, H, W] in [0, 1] -> [cutn * B, 3, size, size] in [0, 1], cut-major."""
        _check_call(images, cutn, generator)
        batch, _, height, width = images.shape
        n_over = math.floor(self.overview * cutn + 0.5)
        u = torch.rand(cutn - n_over, batch, 4, generator=generator, device=images.device, dtype=images.dtype)
        side = max(height, width)
        over = constant(((width - side) / 2, (height - side) / 2, side), images.device, images.dtype)
        over = over.expand(n_over, batch, 3)
        boxes = torch.cat([over, _random_squares(u[..., :3], height, width, self.min_size, self.inner_pow)])
        cut = torch.arange(cutn, device=images.device)
        mirror = ((cut < n_over) & (cut % 2 == 1))[:, None].expand(cutn, batch)
        views = crop_resize(images, boxes, size, mirror, max_side=side)
        grey = torch.cat([torch.zeros(n_over, batch, dtype=torch.bool, device=images.device), u[..., 3] < self.grey])
        grey = grey.flatten()
        return torch.where(grey[:, None, None, None], rgb_to_grayscale(views), views)


def make_cutouts(name: str, **options: object) -> CutoutScheme:
    """The cutout scheme registered as ``name``, built with ``options`` (its dataclass fields)."""
    scheme = CUTOUTS.get(name)
    known = [f.name for f in fields(scheme)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ClipguideError(f"cutout scheme {name!r} has no option {', '.join(map(repr, unknown))}; "
                             f"its options are: {', '.join(known) or 'none'}")
    return scheme(**options)


@dataclass(frozen=True)
class AugmentParams:
    """Per-view augmentation parameters for N views (see :meth:`Augment.sample`); every field starts with N."""

    flip: Tensor  # bool [N]: flip horizontally
    shift: Tensor  # [N, 2] (x, y) translation as a fraction of (W, H); positive moves the content right / down
    angle: Tensor  # [N] rotation in degrees, positive counter-clockwise
    scale: Tensor  # [N] zoom factor about the centre
    corners: Tensor  # [N, 4, 2] (x, y) displacement of the corners (TL, TR, BR, BL) as a fraction of (W, H)
    brightness: Tensor  # [N] added to every channel
    contrast: Tensor  # [N] multiplies every channel
    saturation: Tensor  # [N] multiplies the HSV saturation
    hue: Tensor  # [N] radians added to the HSV hue
    noise: Tensor | None  # [N, 3, H, W] additive noise, None when noise is off


@dataclass(frozen=True)
class Augment:
    """Differentiable random augmentations of a batch of views, each view with its own parameters.

    flip: probability of a horizontal flip (off by default: it falsifies prompts such as "on the left").
    shift: max translation as a fraction of the side. rotate: max degrees. scale: (min, max) zoom.
    perspective: max corner displacement as a fraction of the side (< 0.25 keeps the warped quadrilateral convex).
    brightness: max added value. contrast, saturation: max relative change of the factor. hue: max radians.
    noise: max std of additive Gaussian noise (std uniform in [0, noise] per view).
    padding_mode: what the geometric warp shows outside the view: "zeros", "border" or "reflection".
    Each amount is drawn uniformly from [-max, max] (scale from [min, max]). All geometric ops are applied as one
    warp, so there is a single resampling; with every field at its default the views come back unchanged.
    """

    flip: float = 0.0
    shift: float = 0.0
    rotate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    perspective: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    noise: float = 0.0
    padding_mode: str = "reflection"

    def __post_init__(self) -> None:
        for name, high in [("flip", 1), ("shift", 1), ("rotate", 180), ("brightness", 1), ("contrast", 1),
                           ("saturation", 1), ("hue", math.pi), ("noise", math.inf)]:
            _check_number("augment", name, getattr(self, name), 0, high)
        _check_number("augment", "perspective", self.perspective, 0, 0.25, high_open=True)
        if not isinstance(self.scale, (tuple, list)) or len(self.scale) != 2:
            raise ClipguideError(f"augment: scale must be a (min, max) pair, got {self.scale!r}")
        _check_number("augment", "scale[0]", self.scale[0], 0, math.inf, low_open=True, high_open=True)
        _check_number("augment", "scale[1]", self.scale[1], self.scale[0], math.inf, high_open=True)
        object.__setattr__(self, "scale", (float(self.scale[0]), float(self.scale[1])))
        if self.padding_mode not in PADDING_MODES:
            raise ClipguideError(f"augment: padding_mode must be one of {', '.join(PADDING_MODES)}, "
                                 f"got {self.padding_mode!r}")

    def sample(self, views: Tensor, generator: torch.Generator) -> AugmentParams:
        """Draw parameters for views [N, 3, H, W]: always 18 uniforms per view in one draw, whichever ops are on, so
        turning one op on does not change the others' draws. The noise itself (only when noise > 0) is drawn after."""
        _check_images("views", views)
        _check_generator(generator, views)
        n = views.shape[0]
        u = torch.rand(n, 18, generator=generator, device=views.device, dtype=views.dtype)
        flip, shift, angle, scale, corners, brightness, contrast, saturation, hue, std = (
            u.split([1, 2, 1, 1, 8, 1, 1, 1, 1, 1], dim=1))
        noise = None
        if self.noise > 0:
            noise = self.noise * std.view(n, 1, 1, 1) * torch.randn(
                views.shape, generator=generator, device=views.device, dtype=views.dtype)
        return AugmentParams(
            flip=flip[:, 0] < self.flip,
            shift=self.shift * (2 * shift - 1),
            angle=self.rotate * (2 * angle[:, 0] - 1),
            scale=self.scale[0] + (self.scale[1] - self.scale[0]) * scale[:, 0],
            corners=self.perspective * (2 * corners.view(n, 4, 2) - 1),
            brightness=self.brightness * (2 * brightness[:, 0] - 1),
            contrast=1 + self.contrast * (2 * contrast[:, 0] - 1),
            saturation=1 + self.saturation * (2 * saturation[:, 0] - 1),
            hue=self.hue * (2 * hue[:, 0] - 1),
            noise=noise,
        )

    def apply(self, views: Tensor, params: AugmentParams) -> Tensor:
        """views float [N, 3, H, W] in [0, 1] -> [N, 3, H, W]; in [0, 1] unless noise is on.

        Runs only the ops switched on in this config (flip, then one warp for shift / rotate / scale / perspective,
        then brightness, contrast, saturation, hue, noise), with the values in ``params``.
        """
        _check_images("views", views)
        if params.angle.shape[0] != views.shape[0]:
            raise ClipguideError(f"params are for {params.angle.shape[0]} views, got {views.shape[0]} views")
        out = views
        if self.flip > 0:
            out = torch.where(params.flip[:, None, None, None], out.flip(-1), out)
        if self.rotate > 0 or self.perspective > 0:
            height, width = out.shape[-2:]
            out = warp_perspective(out, self._warp_matrix(params, height, width), (height, width),
                                   padding_mode=self.padding_mode)
        elif self.shift > 0 or self.scale != (1.0, 1.0):
            out = self.zoom_shift(out, params, deterministic=out.is_cuda)
        if self.brightness > 0:
            out = adjust_brightness(out, params.brightness)
        if self.contrast > 0:
            out = adjust_contrast(out, params.contrast)
        if self.saturation > 0:
            out = adjust_saturation(out, params.saturation)
        if self.hue > 0:
            out = adjust_hue(out, params.hue)
        if self.noise > 0:
            out = out + params.noise
        return out

    def zoom_shift(self, views: Tensor, params: AugmentParams, deterministic: bool) -> Tensor:
        """The warp of :meth:`apply` when it has no rotation or perspective: a zoom about the centre, then a shift.
        With ``deterministic`` it runs as :func:`clipguide.resample.resample` (the default on CUDA, where the
        general warp's backward uses atomic adds), else through the general warp; both compute the same function."""
        height, width = views.shape[-2:]
        if not deterministic:
            return warp_perspective(views, self._warp_matrix(params, height, width), (height, width),
                                    padding_mode=self.padding_mode)
        # kornia's warp samples the source at M^-1 (x, y) in pixel coordinates, centres at integers
        def source(axis: int, length: int) -> Tensor:
            centre = (length - 1) / 2
            offset = centre + params.shift[:, axis, None] * length                    # [N, 1]: where the centre goes
            out = torch.arange(length, device=views.device, dtype=views.dtype)
            return ((out - offset) / params.scale[:, None] + centre)[..., None]
        return resample(views, source(0, width), source(1, height), self.padding_mode, align_corners=True)

    def _warp_matrix(self, params: AugmentParams, height: int, width: int) -> Tensor:
        """[N, 3, 3] homography in pixel coordinates: rotate and scale about the centre, shift, then perspective."""
        n = params.angle.shape[0]
        extent = constant((width, height), params.angle.device, params.angle.dtype)
        centre = ((extent - 1) / 2).expand(n, 2)
        affine = get_rotation_matrix2d(centre, params.angle, params.scale[:, None].expand(n, 2))
        affine = torch.cat([affine[..., :2], affine[..., 2:] + (params.shift * extent)[..., None]], dim=-1)
        matrix = convert_affinematrix_to_homography(affine)
        if self.perspective > 0:
            corners = constant(((0, 0), (1, 0), (1, 1), (0, 1)), extent.device, extent.dtype) * (extent - 1)
            corners = corners.expand(n, 4, 2)
            matrix = get_perspective_transform(corners, corners + params.corners * extent) @ matrix
        return matrix

    def __call__(self, views: Tensor, generator: torch.Generator) -> Tensor:
        """views float [N, 3, H, W] in [0, 1] -> [N, 3, H, W], each view augmented with its own random parameters."""
        return self.apply(views, self.sample(views, generator))
