"""Image inputs -> model inputs, in torch and differentiable.

Everything the serving API accepts as "images" goes through :func:`as_image_batch` (to float [B, 3, H, W] in [0, 1])
and then :class:`Preprocess` (resize the shortest side, center crop, normalise), so the same code path serves a
folder of PNGs and a generator's output that needs gradients.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .constants import constant
from .errors import CoreClipError, ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[torch.Tensor, np.ndarray, Image.Image]
Images = Union[torch.Tensor, np.ndarray, Sequence[ImageLike]]


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, raising :class:`ImageReadError` naming the file if it is missing or unreadable."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None


def _one_image(x: ImageLike) -> torch.Tensor:
    if isinstance(x, Image.Image):
        x = np.array(x.convert("RGB"))
    if isinstance(x, np.ndarray):
        if x.ndim != 3 or x.shape[-1] != 3:
            raise CoreClipError(f"expected an H x W x 3 array, got shape {tuple(x.shape)}")
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)
    if not isinstance(x, torch.Tensor):
        raise CoreClipError(f"unsupported image type {type(x).__name__}")
    if x.ndim != 3 or x.shape[0] != 3:
        raise CoreClipError(f"expected a 3 x H x W image tensor, got shape {tuple(x.shape)}")
    return x


def as_image_batch(images: Images) -> torch.Tensor:
    """Normalise any supported image input to float [B, 3, H, W] in [0, 1].

    Accepts a float tensor [B, 3, H, W] or [3, H, W] in [0, 1] (returned as is, gradients kept), a uint8 tensor or
    array (scaled by 1/255), an H x W x 3 numpy array, a PIL image, or a list of those (all the same size).
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        batch = images
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[-1] != 3:
            raise CoreClipError(f"expected an N x H x W x 3 array, got shape {tuple(images.shape)}")
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif isinstance(images, (torch.Tensor, np.ndarray, Image.Image)):
        batch = _one_image(images)[None]
    else:
        items = [_one_image(x) for x in images]
        if not items:
            raise CoreClipError("no images given")
        if len({tuple(t.shape) for t in items}) > 1:
            raise CoreClipError("images in one batch must share a size; pass them in separate calls or resize")
        batch = torch.stack(items)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise CoreClipError(f"expected images of shape [B, 3, H, W], got {tuple(batch.shape)}")
    if batch.dtype == torch.uint8:
        return batch.float() / 255.0
    if not batch.is_floating_point():
        raise CoreClipError(f"unsupported image dtype {batch.dtype}")
    return batch


@dataclass(frozen=True)
class Preprocess:
    """Resize the shortest side to ``size`` (antialiased), center-crop to ``size`` x ``size``, normalise.

    Input float [B, 3, H, W] in [0, 1]; output float [B, 3, size, size]. Differentiable.
    """

    size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"

    @classmethod
    def from_config(cls, cfg: dict) -> "Preprocess":
        size = cfg["size"]
        if isinstance(size, (list, tuple)):
            size = size[0]
        return cls(
            size=int(size),
            mean=tuple(cfg.get("mean") or OPENAI_MEAN),
            std=tuple(cfg.get("std") or OPENAI_STD),
            interpolation=cfg.get("interpolation") or "bicubic",
        )

    def to_config(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}

    def resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            scale = self.size / min(h, w)
            new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            if (new_h, new_w) != (h, w):
                smooth = self.interpolation in ("bilinear", "bicubic")
                x = F.interpolate(x, size=(new_h, new_w), mode=self.interpolation,
                                  align_corners=False if smooth else None, antialias=smooth)
            top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = (constant(v, x.device, x.dtype).view(1, 3, 1, 1) for v in (self.mean, self.std))
        return (x - mean) / std

    def __call__(self, images: Images) -> torch.Tensor:
        return self.normalize(self.resize_crop(as_image_batch(images)))
