"""Prompt parsing for CLIP guidance, in the "text:weight:stop" syntax of the VQGAN+CLIP notebooks.

Grammar::

    spec  := item ("|" item)*              a sequence of strings is one spec per element, each also split on "|"
    item  := text [":" weight [":" stop]]  weight and stop are numeric suffixes, split off from the right
    weight: finite float, default 1.0      negative pushes the image away from the prompt
    stop  : finite float or -inf, default -inf (never stop)

Examples::

    "a cat"                   -> ("a cat", 1.0, -inf)
    "a cat:2 | a dog:-0.5"    -> ("a cat", 2.0, -inf), ("a dog", -0.5, -inf)
    "a cat:2:0.5"             -> ("a cat", 2.0, 0.5)    stop pulling once this prompt's loss is <= 0.5
    "note: a cat:1e-1"        -> ("note: a cat", 0.1, -inf)
    "ratio 16:9 poster"       -> ("ratio 16:9 poster", 1.0, -inf)

Only suffixes that look numeric are split off, so colons inside text are fine unless the text itself ends in
":<number>" (see :func:`split_item`). Appending the defaults ":1:-inf" protects any text.

For image prompts the text is an image file path; for noise prompts it is a non-negative integer seed whose target
embedding is :func:`noise_target`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Sequence

import torch

from .errors import PromptError

__all__ = ["Prompt", "split_item", "parse_prompts", "negative_prompts", "noise_target"]

KINDS = ("text", "image", "noise")
_NUMERIC_CHARS = frozenset("+-.0123456789eE")
_NON_FINITE_WORDS = frozenset({"nan", "inf", "infinity"})
_SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds up to 2**64 - 1


@dataclass(frozen=True)
class Prompt:
    """One guidance target.

    ``value`` is the text, the image path, or the noise seed as a decimal string. ``weight`` scales this prompt's
    loss (negative pushes the image away from it); guidance stops pulling towards it once its loss is <= ``stop``
    (``-inf``: never). Invalid fields raise :class:`PromptError`.
    """

    kind: str
    value: str
    weight: float = 1.0
    stop: float = float("-inf")

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PromptError(f"unknown prompt kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        if not isinstance(self.value, str) or not self.value.strip():
            raise PromptError(f"{self.kind} prompt has no text: {self.value!r}")
        if not isinstance(self.weight, Real) or not math.isfinite(self.weight):
            raise PromptError(f"weight must be finite, got {self.weight!r}")
        if not isinstance(self.stop, Real) or not (math.isfinite(self.stop) or self.stop == -math.inf):
            raise PromptError(f"stop must be finite or -inf (never stop), got {self.stop!r}")
        if self.kind == "noise" and not _is_seed(self.value):
            raise PromptError(f"noise prompt needs an integer seed in [0, 2**64), got {self.value!r}")


def _is_seed(value: str) -> bool:
    return value.isascii() and value.isdigit() and int(value) < _SEED_LIMIT


def _suffix_number(piece: str, item: str) -> float | None:
    """``piece`` as a float if it looks numeric, None if it is text; PromptError if it looks numeric but is not."""
    piece = piece.strip()
    unsigned = piece[1:] if piece[:1] in ("+", "-") else piece
    if unsigned.lower() in _NON_FINITE_WORDS:
        return float(piece)
    if not (set(piece) <= _NUMERIC_CHARS and any(c.isdigit() for c in piece)):
        return None
    try:
        return float(piece)
    except ValueError:
        raise PromptError(f"prompt item {item!r}: {piece!r} is not a valid number") from None


def split_item(item: str) -> tuple[str, float, float]:
    """Split one prompt item "text[:weight[:stop]]" into ``(text, weight, stop)``.

    At most two suffixes are split off, from the right, and only while they look numeric (characters from
    "+-.0123456789eE" with at least one digit, or nan/inf/infinity with an optional sign). Text and numbers are
    stripped of surrounding whitespace. Defaults: weight 1.0, stop -inf (never stop).

    Known ambiguity: text that itself ends in ":<number>" loses it as a weight, e.g. "ratio 16:9" ->
    ("ratio 16", 9.0, -inf). Escape it by giving both suffixes: "ratio 16:9:1:-inf" -> ("ratio 16:9", 1.0, -inf).
    Likewise a text suffix that merely looks numeric ("move:e4") raises unless both suffixes follow it.

    Raises :class:`PromptError` naming the item for empty text, a malformed number ("1.2.3", "1e", "--2"),
    a non-finite weight, or a NaN or +inf stop.
    """
    if not isinstance(item, str):
        raise PromptError(f"prompt item must be a string, got {item!r}")
    text, numbers = item, []
    while len(numbers) < 2:
        head, colon, tail = text.rpartition(":")
        number = _suffix_number(tail, item) if colon else None
        if number is None:
            break
        numbers.insert(0, number)
        text = head
    weight, stop = numbers + [1.0, -math.inf][len(numbers):]
    text = text.strip()
    try:
        Prompt("text", text, weight, stop)
    except PromptError as err:
        raise PromptError(f"prompt item {item!r}: {err}") from None
    return text, weight, stop


def _items(spec: str | Sequence[str]) -> list[str]:
    """The raw items of a spec: each string split on "|"."""
    if isinstance(spec, str):
        pieces = [spec]
    elif isinstance(spec, Sequence):
        pieces = list(spec)
    else:
        raise PromptError(f"prompt spec must be a string or a sequence of strings, got {type(spec).__name__}")
    for piece in pieces:
        if not isinstance(piece, str):
            raise PromptError(f"prompt spec must hold strings only, got {piece!r}")
    return [item for piece in pieces for item in piece.split("|")]


def parse_prompts(spec: str | Sequence[str], kind: str = "text") -> list[Prompt]:
    """Parse a "|"-separated spec (or a sequence of them) into prompts of one ``kind``, in order.

    Image prompts must name an existing file; noise prompts must be an integer seed in [0, 2**64).
    Raises :class:`PromptError` for an empty spec, an empty item (naming its 1-based position and raw text),
    or any item that :func:`split_item` or :class:`Prompt` rejects.
    """
    if kind not in KINDS:
        raise PromptError(f"unknown prompt kind {kind!r}; choose one of: {', '.join(KINDS)}")
    items = _items(spec)
    if not any(item.strip() for item in items):
        raise PromptError(f"prompt spec is empty: {spec!r}")
    prompts = []
    for position, item in enumerate(items, start=1):
        if not item.strip():
            raise PromptError(f"prompt item {position} of {spec!r} is empty: {item!r}")
        value, weight, stop = split_item(item)
        try:
            prompt = Prompt(kind, value, weight, stop)
        except PromptError as err:
            raise PromptError(f"prompt item {item!r}: {err}") from None
        if kind == "image" and not Path(value).is_file():
            raise PromptError(f"image prompt not found: {value}")
        prompts.append(prompt)
    return prompts


def negative_prompts(spec: str | Sequence[str]) -> list[Prompt]:
    """Text prompts to push away from: like :func:`parse_prompts`, with every weight made -abs(weight)."""
    return [dataclasses.replace(p, weight=-abs(p.weight)) for p in parse_prompts(spec, "text")]


def noise_target(seed: int, dim: int) -> torch.Tensor:
    """The target embedding of noise prompt ``seed``: float32 [dim], unit L2 norm (uniform on the sphere).

    Drawn as standard normal from ``torch.Generator().manual_seed(seed)``, so one seed always gives the same
    tensor. ``seed`` must be an int in [0, 2**64) and ``dim`` a positive int, else :class:`PromptError`.
    """
    if not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        raise PromptError(f"noise seed must be an int in [0, 2**64), got {seed!r}")
    if not isinstance(dim, int) or dim < 1:
        raise PromptError(f"noise target dim must be a positive int, got {dim!r}")
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(dim, generator=generator, dtype=torch.float32)
    return target / torch.linalg.vector_norm(target)
