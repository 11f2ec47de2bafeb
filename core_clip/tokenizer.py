"""Tokenizers, built from the ``tokenizer`` entry of a model config.

Standard architectures use open_clip's tokenizers. The shipped ShapesWorld models use :class:`ByteTokenizer`:
UTF-8 bytes as tokens, so the token embedding has 259 rows instead of 49,408 and a shipped checkpoint stays a
few MB, while any text still tokenizes (no out-of-vocabulary words).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .errors import CheckpointError


class Tokenizer(Protocol):
    context_length: int

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor: ...


class ByteTokenizer:
    """Byte-level tokenizer: ``[SOT, byte+1, ..., EOT, PAD...]``.

    Ids: 0 = padding, 1..256 = the UTF-8 byte values + 1, 257 = start of text, 258 = end of text. The end token is
    the largest id, so open_clip's ``argmax`` text pooling picks it. Text is lower-cased and whitespace-collapsed;
    text longer than the context is truncated with the end token kept.
    """

    vocab_size = 259
    sot_token_id = 257
    eot_token_id = 258

    def __init__(self, context_length: int = 64):
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3, got {context_length}")
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Returns LongTensor [N, context_length]."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            body = [b + 1 for b in " ".join(text.lower().split()).encode("utf-8")][: self.context_length - 2]
            ids = [self.sot_token_id, *body, self.eot_token_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def build_tokenizer(spec: dict, arch: str | None = None) -> Tokenizer:
    """Build the tokenizer a config asks for.

    ``spec`` keys: ``type`` in {"bytes", "open_clip", "hf"}, ``context_length``, and for "hf" a local ``path``.
    ``arch`` is the open_clip architecture name used for ``type == "open_clip"`` (its own tokenizer choice).
    """
    import open_clip

    kind = spec.get("type", "open_clip")
    context_length = spec.get("context_length")
    if kind == "bytes":
        return ByteTokenizer(context_length or 64)
    if kind == "open_clip":
        if arch:
            return open_clip.get_tokenizer(arch, context_length=context_length)
        return open_clip.SimpleTokenizer(context_length=context_length or 77)
    if kind == "hf":
        return open_clip.HFTokenizer(spec["path"], context_length=context_length or 77)
    raise CheckpointError(f"unknown tokenizer type {kind!r} in model config (expected bytes, open_clip or hf)")
