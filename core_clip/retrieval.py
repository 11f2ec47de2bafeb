"""Retrieval: top-k search over embeddings, recall@K, and a saved embedding index for a folder of images."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from safetensors import safe_open

from .checkpoint import save_safetensors
from .errors import CoreClipError
from .preprocess import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from .model import ClipModel

INDEX_FORMAT = "core_clip.index/1"


def top_k(query_emb: torch.Tensor, index_emb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k: normalised queries [Q, D] against normalised index [N, D] -> (scores [Q, k'], indices
    [Q, k']), best first, with k' = min(k, N)."""
    if query_emb.ndim != 2 or index_emb.ndim != 2 or query_emb.shape[1] != index_emb.shape[1]:
        raise CoreClipError(f"top_k needs [Q, D] and [N, D] embeddings, got {tuple(query_emb.shape)} "
                            f"and {tuple(index_emb.shape)}")
    if k < 1:
        raise CoreClipError(f"k must be >= 1, got {k}")
    sim = query_emb @ index_emb.to(query_emb).T
    return sim.topk(min(k, index_emb.shape[0]), dim=1)


def recall_at_k(query_emb: torch.Tensor, index_emb: torch.Tensor, query_groups: Sequence, index_groups: Sequence,
                ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries with a correct item among their top k, for each k.

    An index item is correct for a query when their group labels are equal (e.g. the caption text), so datasets
    with repeated captions are scored fairly.
    """
    lookup = {g: i for i, g in enumerate(dict.fromkeys([*query_groups, *index_groups]))}
    q = torch.tensor([lookup[g] for g in query_groups])
    n = torch.tensor([lookup[g] for g in index_groups])
    _, idx = top_k(query_emb, index_emb, max(ks))
    hits = n[idx.cpu()] == q[:, None]  # [Q, k']
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CoreClipError(f"not a folder: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@dataclass
class EmbeddingIndex:
    """Normalised image embeddings [N, D] with their file paths and the model that made them."""

    paths: list[str]
    embeddings: torch.Tensor
    model: str

    @classmethod
    def build(cls, folder: str | os.PathLike, model: "ClipModel", batch_size: int = 64,
              progress: bool = True) -> "EmbeddingIndex":
        """Embed every image under ``folder``; unreadable files are skipped with a logged warning."""
        files = image_files(folder)
        if not files:
            raise CoreClipError(f"no images under {folder}")
        embeddings, kept = model.embed_files(files, batch_size=batch_size, skip_unreadable=True, progress=progress)
        if not kept:
            raise CoreClipError(f"none of the {len(files)} images under {folder} could be read")
        return cls([str(p.relative_to(folder)) for p in kept], embeddings.cpu(), model.name)

    def save(self, path: str | os.PathLike) -> Path:
        meta = {"format": INDEX_FORMAT, "paths": json.dumps(self.paths), "model": self.model}
        return save_safetensors({"embeddings": self.embeddings}, path, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EmbeddingIndex":
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # missing, truncated or not safetensors at all
            raise CoreClipError(f"cannot read index {path}: {e}") from None
        with handle as f:
            meta = f.metadata() or {}
            if meta.get("format") != INDEX_FORMAT:
                raise CoreClipError(f"{path} is not a core_clip embedding index")
            return cls(json.loads(meta["paths"]), f.get_tensor("embeddings"), meta["model"])

    def search(self, query_emb: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each query embedding [Q, D], the k best (path, cosine) pairs."""
        scores, idx = top_k(query_emb.cpu(), self.embeddings, k)
        return [[(self.paths[i], s) for i, s in zip(row_i.tolist(), row_s.tolist())]
                for row_i, row_s in zip(idx, scores)]
