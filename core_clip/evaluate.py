"""Benchmarks of a served model: zero-shot accuracy on ShapesWorld attributes and on digits, and retrieval R@K.

Every function returns a flat dict of floats (fractions in [0, 1]) so the CLI can print it as JSON.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from . import shapes
from .data import DIGIT_WORDS, load_digits, read_pairs_csv
from .retrieval import recall_at_k
from .zeroshot import ZeroShotClassifier

if TYPE_CHECKING:
    from .model import ClipModel

_a = shapes.with_article
# Fillers for the attributes a task does not ask about: each class is an ensemble over every other colour and shape,
# phrased as ShapesWorld's captions are ("an orange circle on a blue background").
_COLOR_SHAPE = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]

# attribute -> (class names, templates, the scene's class name)
SHAPES_TASKS: dict[str, tuple[Sequence[str], Sequence[str], Callable[[shapes.Scene], str]]] = {
    "shape": (shapes.SHAPES, tuple(f"{_a(c)} {{}}" for c in shapes.COLORS), lambda s: s.shape),
    "color": (tuple(map(_a, shapes.COLORS)), tuple(f"{{}} {s}" for s in shapes.SHAPES), lambda s: _a(s.color)),
    "background": (tuple(map(_a, shapes.COLORS)), tuple(f"{_a(c)} {s} on {{}} background" for c, s in _COLOR_SHAPE),
                   lambda s: _a(s.background)),
    "size": (tuple(map(_a, shapes.SIZES)), tuple(f"{{}} {c} {s}" for c, s in _COLOR_SHAPE), lambda s: _a(s.size)),
    "position": (tuple(shapes.POSITION_PHRASES.values()), tuple(f"{_a(c)} {s} {{}}" for c, s in _COLOR_SHAPE),
                 lambda s: shapes.POSITION_PHRASES[s.position]),
    "color_shape": (tuple(f"{_a(c)} {s}" for c, s in _COLOR_SHAPE), ("{}", "a picture of {}"),
                    lambda s: f"{_a(s.color)} {s.shape}"),
}
RETRIEVAL_KS = (1, 5, 10)


def _retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str], prefix: str) -> dict:
    out = {}
    for name, (q, i) in {"image_to_text": (image_emb, text_emb), "text_to_image": (text_emb, image_emb)}.items():
        for k, v in recall_at_k(q, i, captions, captions, RETRIEVAL_KS).items():
            out[f"{prefix}{name}_R@{k}"] = v
    return out


def eval_shapes(model: "ClipModel", n: int = 2000, seed: int = 0, image_size: int = 64) -> dict[str, float]:
    """Zero-shot accuracy per attribute on ``n`` fresh test-split images (seen colour-shape pairs) and ``n // 4``
    held-out-pair images (keys prefixed ``heldout_``), plus image<->caption retrieval on the seen images.

    Position is scored on small shapes only (large shapes are always centred).
    """
    results: dict[str, float] = {}
    classifiers = {task: ZeroShotClassifier(model, names, templates)
                   for task, (names, templates, _) in SHAPES_TASKS.items()}
    for split, count, prefix in (("test", n, ""), ("heldout", max(n // 4, 1), "heldout_")):
        scenes = shapes.sample_scenes(count, seed, split)
        emb = model.embed_images(shapes.render_batch(scenes, image_size, seed=seed))
        for task, (names, _, label) in SHAPES_TASKS.items():
            keep = [i for i, s in enumerate(scenes) if task != "position" or s.size == "small"]
            truth = torch.tensor([list(names).index(label(scenes[i])) for i in keep])
            pred = classifiers[task].logits_from_embeddings(emb[keep]).argmax(dim=-1).cpu()
            results[f"{prefix}{task}_acc"] = (pred == truth).float().mean().item()
        if split == "test":
            captions = [shapes.describe(s) for s in scenes]
            results.update(_retrieval(emb, model.encode_text(captions), captions, prefix))
    return results


def eval_digits(model: "ClipModel", split: str = "test") -> dict[str, float]:
    """Zero-shot accuracy on scikit-learn's digits (``split`` of the fixed split), prompts name the digit both as
    a numeral and as a word."""
    images, labels = load_digits(split)
    names = [f"{d} ({w})" for d, w in enumerate(DIGIT_WORDS)]
    classifier = ZeroShotClassifier(model, names, ("a handwritten {}", "the digit {}"))
    pred = classifier.predict_index(images).cpu().numpy()
    return {"digits_acc": float(np.mean(pred == labels)), "digits_n": float(len(labels))}


def eval_pairs(model: "ClipModel", csv_path: str | os.PathLike, batch_size: int = 64) -> dict[str, float]:
    """Image<->caption retrieval R@K on a CSV of pairs (identical captions count as the same target)."""
    pairs = read_pairs_csv(csv_path)
    image_emb, _ = model.embed_files([p.path for p in pairs], batch_size=batch_size)
    captions = [p.caption for p in pairs]
    return {"pairs_n": float(len(pairs)), **_retrieval(image_emb, model.encode_text(captions), captions, "")}
