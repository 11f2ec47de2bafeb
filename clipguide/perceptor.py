"""One or more CLIP models as a differentiable map from images to embeddings.

Each member model sees the image at its own input size and with its own normalisation; text embeddings are
computed once per (model, text) and cached, since guidance asks for the same prompts at every step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence, Union

import torch

import core_clip
from core_clip import ClipModel

from .compiling import compiled
from .errors import ClipguideError

ModelSpec = Union[str, ClipModel, tuple[Union[str, ClipModel], float]]


@dataclass
class Member:
    """One CLIP of a perceptor and its weight in the summed loss."""

    model: ClipModel
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.model.name


def _member(spec: ModelSpec, device: str | torch.device | None) -> Member:
    model, weight = spec if isinstance(spec, tuple) else (spec, 1.0)
    if isinstance(model, str):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = core_clip.load(model, device=device, precision="bf16" if device.type == "cuda" else "fp32")
    if not isinstance(model, ClipModel):
        raise ClipguideError("a perceptor member must be a model name or a core_clip.ClipModel, "
                             f"got {type(model).__name__}")
    if not weight > 0 or weight != weight or weight == float("inf"):
        raise ClipguideError(f"perceptor weight of {model.name} must be a positive finite number, got {weight}")
    for p in model.parameters():
        p.requires_grad_(False)
    return Member(model.eval(), float(weight))


class Perceptor:
    """CLIP model(s) used to judge images: ``Perceptor("shapes")``, ``Perceptor(["shapes", ("ViT-B-32", 0.5)])``.

    Models are frozen and in eval mode. On CUDA the image towers run under bf16 autocast (models given by name are
    loaded with bf16 weights there); on CPU in fp32. ``compile=True`` compiles each image tower with
    :func:`clipguide.compiling.compiled` (CUDA graphs on CUDA): the first call at each batch size takes tens of
    seconds, later ones are several times faster on a GPU.
    """

    def __init__(self, models: ModelSpec | Sequence[ModelSpec] = core_clip.DEFAULT_MODEL,
                 device: str | torch.device | None = None, compile: bool = False):
        specs = [models] if isinstance(models, (str, ClipModel, tuple)) else list(models)
        if not specs:
            raise ClipguideError("a perceptor needs at least one CLIP model")
        self.members = [_member(s, device) for s in specs]
        self.device = self.members[0].model.device
        if any(m.model.device != self.device for m in self.members):
            raise ClipguideError("all perceptor models must be on one device")
        self._text_cache: dict[tuple[int, str], torch.Tensor] = {}
        self._encoders = [self._encoder(m.model) for m in self.members]
        if compile:
            self._encoders = [compiled(e, self.device) for e in self._encoders]

    def __len__(self) -> int:
        return len(self.members)

    def autocast(self):
        """bf16 autocast on CUDA, nothing on CPU (where bf16 is slower and its error visible)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode_text(self, index: int, texts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings [len(texts), D_index] from member ``index`` (float32, no gradient, cached)."""
        missing = [t for t in dict.fromkeys(texts) if (index, t) not in self._text_cache]
        if missing:
            with torch.no_grad():
                emb = self.members[index].model.encode_text(missing).float()
            self._text_cache.update({(index, t): e for t, e in zip(missing, emb)})
        return torch.stack([self._text_cache[(index, t)] for t in texts])

    def encode_views(self, index: int, views: torch.Tensor) -> torch.Tensor:
        """Views [N, 3, S, S] in [0, 1] at member ``index``'s input size -> unit embeddings [N, D] (float32), with
        gradient to ``views``."""
        return self._encoders[index](views)

    def _encoder(self, model: ClipModel):
        def encode(views: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return model.encode_image(model.preprocess.normalize(views), grad=True).float()
        return encode
