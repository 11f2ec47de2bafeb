"""CLIP score: how well each image matches its caption."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .errors import CoreClipError
from .preprocess import Images, as_image_batch

if TYPE_CHECKING:
    from .model import ClipModel


def clip_score(images: Images, texts: str | Sequence[str], model: "ClipModel", *, batch_size: int = 64,
               grad: bool = False) -> torch.Tensor:
    """Per-pair CLIP score ``100 * max(cos(image_i, text_i), 0)``, float32 [B] in [0, 100].

    Args:
        images: B images: float [B, 3, H, W] in [0, 1], uint8, PIL images or H x W x 3 arrays (any size; each is
            resized and center-cropped to the model's input).
        texts: B captions, or one caption scored against every image. Repeated captions are encoded once.
        model: a :class:`core_clip.ClipModel`.
        grad: keep the graph to the images (for use as a loss).

    This clamps each pair at 0, following Hessel et al. (2021). torchmetrics' ``CLIPScore`` instead averages the
    unclamped ``100 * cos`` over everything it has seen and clamps that mean, so the two agree per pair whenever
    ``cos >= 0``, and the mean of these scores is >= torchmetrics' value when some pairs are negative.
    """
    x = as_image_batch(images)
    return score_embeddings(model.embed_images(x, grad=grad, batch_size=batch_size), texts, model,
                            batch_size=batch_size)


def score_embeddings(image_emb: torch.Tensor, texts: str | Sequence[str], model: "ClipModel", *,
                     batch_size: int = 64) -> torch.Tensor:
    """:func:`clip_score` from image embeddings [B, D] already computed by ``model`` (e.g. from files of
    different sizes via :meth:`ClipModel.embed_files`)."""
    texts = [texts] * len(image_emb) if isinstance(texts, str) else list(texts)
    if len(texts) != len(image_emb):
        raise CoreClipError(f"clip_score got {len(image_emb)} images but {len(texts)} texts")
    unique = list(dict.fromkeys(texts))
    rows = torch.tensor([unique.index(t) for t in texts])
    text_emb = model.encode_text(unique, batch_size=batch_size)[rows.to(model.device)]
    return 100.0 * (image_emb * text_emb.to(image_emb.device)).sum(dim=-1).clamp(min=0)
