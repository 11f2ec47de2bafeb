"""Calibrate a model's CLIP score: what score does a true image-caption pair of its own data reach?

Raw CLIP scores are not comparable across models (a small ShapesWorld CLIP gives its true pairs about 78, a
web-scale ViT-B/32 about 30), so a threshold such as "retry any picture that scores below a true pair" must come
from the model itself. :func:`match_score` measures it on held-out pairs of the model's data, and
:func:`record_match_score` stores it in the model's json config, where :attr:`ClipModel.match_score` reads it::

    core-clip calibrate --model runs/shapes/model.safetensors --data shapes
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import save_json
from .data import build_dataset
from .errors import CoreClipError
from .model import ClipModel, is_clip_score, resolve
from .score import clip_score


def match_score(model: ClipModel, data: str, *, n: int = 2000, quantile: float = 0.01, seed: int = 0,
                batch_size: int = 256, progress: bool = False) -> float:
    """The ``quantile`` of the CLIP scores of true pairs: 99% of them score at least this by default.

    Args:
        data: "shapes" (``n`` fresh test-split scenes with random caption templates), "digits" (the test split),
            a CSV of path,caption rows or a captioned folder (all of it, or its first ``n`` pairs).
        quantile: in (0, 1); the lower it is, the fewer true pairs fall below the returned score.

    Returns a float in [0, 100].
    """
    if not 0 < quantile < 1:
        raise CoreClipError(f"quantile must be in (0, 1), got {quantile}")
    if n < 1:
        raise CoreClipError(f"calibration needs at least one pair, got n={n}")
    dataset = build_dataset(data, split="test", image_size=model.image_size, seed=seed, augment=None, n=n)
    count = min(n, len(dataset))
    scores = []
    for start in tqdm(range(0, count, batch_size), desc="calibrate", unit="batch", disable=not progress):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        images = torch.stack([s.image for s in samples])
        scores.append(clip_score(images, [s.caption for s in samples], model, batch_size=batch_size).cpu())
    return float(torch.quantile(torch.cat(scores), quantile))


def record_match_score(name: str, score: float) -> Path:
    """Write ``score`` (rounded to 0.01) as ``match_score`` into the json config that ``core_clip.load(name)``
    reads, keeping every other entry; atomic. Only local models (a path or a shipped name) have such a file."""
    if not is_clip_score(score):
        raise CoreClipError(f"a match score is a CLIP score in [0, 100], got {score!r}")
    path = resolve(name).config_file
    if path is None:
        raise CoreClipError(f"{name} has no local json config to record a match score in; save the model "
                            "(ClipModel.save) and calibrate the saved copy")
    config = json.loads(path.read_text())
    config["match_score"] = round(float(score), 2)
    return save_json(config, path)
