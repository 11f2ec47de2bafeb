"""Zero-shot classification with prompt-template ensembles."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from .errors import CoreClipError
from .preprocess import Images

if TYPE_CHECKING:
    from .model import ClipModel


class ZeroShotClassifier:
    """Classify images among ``classnames`` by similarity to prompt ensembles.

    Each class's weight is the mean of the L2-normalised text embeddings of ``template.format(classname)`` over
    all templates, renormalised (Radford et al., 2021). Templates contain one ``{}``.
    """

    def __init__(self, model: "ClipModel", classnames: Sequence[str], templates: Sequence[str] = ("{}",)):
        if len(classnames) < 2:
            raise CoreClipError("zero-shot classification needs at least two class names")
        if len(set(classnames)) != len(classnames):
            raise CoreClipError("class names must be unique")
        if not templates:
            raise CoreClipError("need at least one prompt template")
        for t in templates:
            if t.count("{}") != 1:
                raise CoreClipError(f"template {t!r} must contain exactly one '{{}}' for the class name")
        self.model = model
        self.classnames = list(classnames)
        self.templates = list(templates)
        prompts = [t.format(c) for c in self.classnames for t in self.templates]
        emb = model.encode_text(prompts).view(len(self.classnames), len(self.templates), -1)
        self.weights = F.normalize(emb.mean(dim=1), dim=-1)  # [C, D]

    def logits_from_embeddings(self, image_emb: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings [B, D] -> logits [B, C] (scaled by the model's temperature)."""
        return self.model.logit_scale.detach().float() * image_emb @ self.weights.T.to(image_emb.device)

    def logits(self, images: Images) -> torch.Tensor:
        """Images (any form :meth:`ClipModel.embed_images` takes) -> logits [B, C]."""
        return self.logits_from_embeddings(self.model.embed_images(images))

    def probs(self, images: Images) -> torch.Tensor:
        """Class probabilities [B, C]."""
        return self.logits(images).softmax(dim=-1)

    def predict_index(self, images: Images) -> torch.Tensor:
        """Index of the best class per image, LongTensor [B]."""
        return self.logits(images).argmax(dim=-1)

    def predict(self, images: Images) -> list[str]:
        """Name of the best class per image."""
        return [self.classnames[i] for i in self.predict_index(images).tolist()]
