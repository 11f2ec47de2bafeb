"""Image-caption data: CSV pair lists and scikit-learn's handwritten digits."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class Pair:
    path: Path
    caption: str


def read_pairs_csv(path: str | os.PathLike) -> list[Pair]:
    """Read ``path,caption`` rows (a header row naming those columns is optional).

    Relative image paths are resolved against the CSV's folder. Raises :class:`DataError` naming the row for a
    missing column, an empty caption or a missing image file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "caption"]:
        rows = rows[1:]
        first_line = 2
    else:
        first_line = 1
    pairs, missing = [], []
    for line, row in enumerate(rows, start=first_line):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2:
            raise DataError(f"{path}:{line}: expected two columns 'path,caption', got {len(row)}")
        image, caption = row[0].strip(), row[1].strip()
        if not caption:
            raise DataError(f"{path}:{line}: empty caption for {image}")
        image_path = Path(image) if os.path.isabs(image) else path.parent / image
        if not image_path.is_file():
            missing.append(f"{line}: {image}")
        pairs.append(Pair(image_path, caption))
    if missing:
        shown = "; ".join(missing[:5]) + (f"; ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise DataError(f"{path}: {len(missing)} image file(s) missing (line: path): {shown}")
    if not pairs:
        raise DataError(f"{path} has no image-caption rows")
    return pairs


def load_digits(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 handwritten digits as dark ink on white, with a fixed stratified split.

    Returns (images uint8 [N, 8, 8, 3], labels int64 [N]); ``split`` is "train" (75%) or "test" (25%).
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise DataError(f"digits split must be 'train' or 'test', got {split!r}")
    digits = sk_digits()
    gray = (255 - np.round(digits.images * (255 / 16))).astype(np.uint8)  # 0..16 ink -> white paper, dark ink
    images = np.repeat(gray[..., None], 3, axis=-1)
    idx = np.arange(len(images))
    train, test = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
                                   stratify=digits.target)
    chosen = np.sort(train if split == "train" else test)
    return images[chosen], digits.target[chosen].astype(np.int64)
