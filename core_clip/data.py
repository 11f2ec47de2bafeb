"""Image-caption data: CSV pair lists, scikit-learn's handwritten digits, and datasets + loader for training.

Training data is deterministic per sample: every random choice for item i in epoch e (which scene, jitter, caption,
augmentation) comes from generators seeded by (seed, e, i) alone. Nothing depends on worker processes or global RNG
state, so a loader gives the same batches with any number of workers, and a run resumed at batch k of epoch e only
needs :class:`EpochSampler` to skip the first k batches.
"""
from __future__ import annotations

import csv
import functools
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Collection, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from . import shapes
from .errors import DataError
from .flaws import render_flawed
from .preprocess import IMAGE_SUFFIXES, Preprocess, as_image_batch, open_image

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class Pair:
    path: Path
    caption: str


def _first_few(problems: list[str], shown: int = 5) -> str:
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; ... ({more} more)" if more > 0 else "")


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
        raise DataError(f"{path}: {len(missing)} image file(s) missing (line: path): {_first_few(missing)}")
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


# ---------------------------------------------------------------------------------------------- training data

DIGIT_TEMPLATES = (
    "a handwritten {numeral}",
    "a handwritten {word}",
    "the digit {numeral}",
    "the digit {word}",
    "a photo of the number {numeral}",
    "a photo of the number {word}",
)
SHAPES_TRAIN_SIZE = 100_000  # default ShapesPairs samples per epoch for the train split ...
SHAPES_EVAL_SIZE = 2_000  # ... and for the others
_BLUR_RADIUS = 2  # px; the blur's sigma is drawn in [0.5, 1] px
# Leading tags keep the random streams apart; they must lead because numpy pads short seed keys with zeros, so
# (seed, epoch) and (seed, epoch, 0) would otherwise give the same stream.
_PERMUTATION_STREAM, _CONTENT_STREAM, _AUGMENT_STREAM = 1, 2, 3

Attributes = frozenset[tuple[str, str]]  # (attribute, value) pairs: what an image shows or a caption says
# The caption of pictures that show nothing a real caption names (guidance negatives, flawed ShapesWorld pictures),
# and what it claims: true of those pictures only.
NULL_CAPTION = "an unclear picture"
UNCLEAR: Attributes = frozenset({("picture", "unclear")})


def _torch_generator(*key: int) -> torch.Generator:
    """A torch generator seeded by a 64-bit hash of the non-negative integers in key."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))


def _warp(image: torch.Tensor, side: float, tx: float, ty: float) -> torch.Tensor:
    """Resample image [3, H, W] from a window ``side`` times its size centred at (tx, ty) in normalised coordinates
    (the image spans [-1, 1]); where the window leaves the image it sees the image's reflection."""
    theta = torch.tensor([[[side, 0.0, tx], [0.0, side, ty]]], dtype=image.dtype, device=image.device)
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of image [C, H, W] (H, W > _BLUR_RADIUS) with reflected borders."""
    x = torch.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    out = F.pad(image[None], (_BLUR_RADIUS,) * 4, mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


@dataclass(frozen=True)
class Augment:
    """Train-time image augmentation; every random choice comes from the generator passed to the call.

    scale: range of the square crop's area as a fraction of the image (the crop is resized back to full size).
    shift: max translation per axis as a fraction of the side; pixels shifted in are the image's reflection.
    noise: max std of additive Gaussian pixel noise (the std is drawn uniformly in [0, noise]).
    blur: probability of a light Gaussian blur (sigma drawn in [0.5, 1] px).
    hflip: random horizontal flip with probability 1/2; off by default because it falsifies "on the left" captions.
    """

    scale: tuple[float, float] = (0.85, 1.0)
    shift: float = 0.05
    noise: float = 0.02
    blur: float = 0.0
    hflip: bool = False

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise DataError(f"augment scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 <= self.shift < 0.5:
            raise DataError(f"augment shift must be in [0, 0.5), got {self.shift}")
        if self.noise < 0:
            raise DataError(f"augment noise must be >= 0, got {self.noise}")
        if not 0 <= self.blur <= 1:
            raise DataError(f"augment blur is a probability in [0, 1], got {self.blur}")

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """float [3, H, W] in [0, 1] on any device -> float [3, H, W] clamped to [0, 1]; differentiable.
        ``generator`` is a CPU generator."""
        # One fixed-size draw with a slot per choice, so enabling one option does not reshuffle the others.
        flip, area, crop_x, crop_y, shift_x, shift_y, blur, sigma, noise = torch.rand(
            9, generator=generator, dtype=torch.float64).tolist()
        if self.hflip and flip < 0.5:
            image = image.flip(-1)
        low, high = self.scale
        side = math.sqrt(low + (high - low) * area)
        tx = (1 - side) * (2 * crop_x - 1) + 2 * self.shift * (2 * shift_x - 1)
        ty = (1 - side) * (2 * crop_y - 1) + 2 * self.shift * (2 * shift_y - 1)
        if (side, tx, ty) != (1, 0, 0):  # the identity warp would still resample, blurring by rounding error
            image = _warp(image, side, tx, ty)
        if blur < self.blur:
            image = _gaussian_blur(image, 0.5 + 0.5 * sigma)
        std = self.noise * noise
        if std > 0:
            image = image + std * torch.randn(image.shape, generator=generator, dtype=image.dtype).to(image.device)
        return image.clamp(0, 1)


@dataclass
class Sample:
    """One training example.

    image: float [3, S, S] in [0, 1], not normalised (the model's Preprocess normalises on device).
    facts: what is true of the image, as (attribute, value) pairs; claims: what the caption asserts.
    Caption j is true of image i iff claims_j <= facts_i.
    """

    image: torch.Tensor
    caption: str
    facts: Attributes
    claims: Attributes


class PairDataset(Dataset):
    """Base of the training datasets: item i is a :class:`Sample` whose randomness depends only on
    (seed, epoch, i); :meth:`set_epoch` selects the epoch.

    Subclasses implement ``__len__`` and ``_sample(i, rng)``, which builds the un-augmented sample from a numpy
    generator seeded by (seed, epoch, i); the base class then applies ``augment`` with a torch generator from a
    separate (seed, epoch, i) stream. ``group``: how many consecutive items must share a batch (1: none).
    """

    group: int = 1

    def __init__(self, image_size: int, augment: Augment | None, seed: int) -> None:
        if image_size < 1:
            raise DataError(f"image size must be >= 1, got {image_size}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise DataError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        raise NotImplementedError

    def _sample(self, i: int, rng: np.random.Generator) -> Sample:
        raise NotImplementedError

    def _rng(self, i: int) -> np.random.Generator:
        """The content generator of item i in the current epoch; IndexError outside [0, len)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} samples")
        return np.random.default_rng([_CONTENT_STREAM, self.seed, self.epoch, i])

    def __getitem__(self, i: int) -> Sample:
        sample = self._sample(i, self._rng(i))
        if self.augment is not None:
            sample.image = self.augment(sample.image, _torch_generator(_AUGMENT_STREAM, self.seed, self.epoch, i))
        return sample


class FilePairs(PairDataset):
    """Image files with captions. Each image is resized (shortest side, bicubic, antialiased) and centre-cropped
    to image_size. facts = claims = {("caption", caption)}: only identical captions are true of each other's image.

    An unreadable image raises :class:`ImageReadError` naming the file (never skipped).
    """

    def __init__(self, pairs: Sequence[Pair], image_size: int, augment: Augment | None = None, seed: int = 0):
        super().__init__(image_size, augment, seed)
        if not pairs:
            raise DataError("no image-caption pairs")
        self.pairs = list(pairs)
        self._resize = Preprocess(image_size)

    def __len__(self) -> int:
        return len(self.pairs)

    def _sample(self, i: int, rng: np.random.Generator) -> Sample:
        pair = self.pairs[i]
        image = self._resize.resize_crop(as_image_batch(open_image(pair.path)))[0]
        image = image.clamp(0, 1).contiguous()  # bicubic overshoots at edges; the crop may be a HWC view
        label = frozenset({("caption", pair.caption)})
        return Sample(image, pair.caption, label, label)


def pairs_from_folder(folder: str | os.PathLike) -> list[Pair]:
    """Images directly in ``folder`` (IMAGE_SUFFIXES, sorted by name), each captioned by the text of the
    same-name .txt file (cat.png + cat.txt) with whitespace collapsed.

    Raises :class:`DataError` naming every image whose .txt is missing or empty, or if there are no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"no images ({' '.join(IMAGE_SUFFIXES)}) in {folder}")
    pairs, problems = [], []
    for image in images:
        text_file = image.with_suffix(".txt")
        if not text_file.is_file():
            problems.append(f"{image.name}: no {text_file.name}")
            continue
        caption = " ".join(text_file.read_text(encoding="utf-8").split())
        if not caption:
            problems.append(f"{image.name}: {text_file.name} is empty")
            continue
        pairs.append(Pair(image, caption))
    if problems:
        raise DataError(f"{folder}: {len(problems)} image(s) without a caption: {_first_few(problems)}")
    return pairs


class ShapesPairs(PairDataset):
    """On-the-fly ShapesWorld, ``n`` samples per epoch.

    Item i of epoch e, all seeded by (seed, e, i): a scene drawn uniformly from the split's valid scenes (train,
    val and test exclude the held-out colour-shape pairs), a jittered render at image_size, and a random caption
    template. facts: all five scene attributes; claims: the attributes the caption mentions.

    With ``twins``, every odd item shows a :func:`core_clip.shapes.counterfactual` of the scene of the item before
    it (colours swapped, or one attribute changed); the loader keeps each pair in one batch (``group = 2``), so
    every picture meets a caption that differs from its own only in what goes with what.

    With ``flaws`` = p, each item is, with probability p, its scene drawn with one flaw
    (:func:`core_clip.flaws.render_flawed`: an off-palette colour, an uneven fill, a blob, noise or a second shape)
    and captioned NULL_CAPTION; its facts are UNCLEAR and what the flaw leaves true of the scene.
    """

    def __init__(self, n: int, seed: int, split: str = "train", image_size: int = 64,
                 augment: Augment | None = None, twins: bool = False, flaws: float = 0.0):
        super().__init__(image_size, augment, seed)
        if split not in shapes.SPLITS:
            raise DataError(f"unknown ShapesWorld split {split!r}; expected one of {shapes.SPLITS}")
        if n < 1:
            raise DataError(f"ShapesWorld samples per epoch must be >= 1, got {n}")
        if image_size < 8:
            raise DataError(f"ShapesWorld image size must be >= 8, got {image_size}")
        if twins and n % 2:
            raise DataError(f"ShapesWorld twins come in pairs: samples per epoch must be even, got {n}")
        if not 0 <= flaws <= 1:
            raise DataError(f"ShapesWorld flaws is a probability in [0, 1], got {flaws}")
        self.flaws = flaws
        self.n = n
        self.split = split
        self.twins = twins

    @property
    def group(self) -> int:
        return 2 if self.twins else 1

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> shapes.Scene:
        """The scene item i shows in the current epoch, without rendering it."""
        return self._draw_scene(i, self._rng(i))

    def _draw_scene(self, i: int, rng: np.random.Generator) -> shapes.Scene:
        if self.twins and i % 2:
            return shapes.counterfactual(self.scene(i - 1), rng)
        return shapes.sample_scenes(1, int(rng.integers(2**63)), self.split)[0]

    def _sample(self, i: int, rng: np.random.Generator) -> Sample:
        scene = self._draw_scene(i, rng)
        if self.flaws and rng.random() < self.flaws:
            flawed = render_flawed(scene, self.image_size, rng)
            return Sample(as_image_batch(flawed.image)[0].contiguous(), NULL_CAPTION, flawed.facts | UNCLEAR, UNCLEAR)
        image = as_image_batch(shapes.render(scene, self.image_size, rng))[0].contiguous()  # not a HWC view
        caption, claims = shapes.caption_with_claims(scene, rng)
        return Sample(image, caption, shapes.scene_facts(scene), claims)


class DigitsPairs(PairDataset):
    """scikit-learn's digits (``split`` of :func:`load_digits`: "train" or "test"), dark ink on white, upscaled
    bicubically to image_size (crisper strokes than bilinear), with a caption drawn per (epoch, i) from
    DIGIT_TEMPLATES ("the digit seven").

    facts = claims = {("digit", "7")}: every caption of a digit is true of every image of that digit.
    """

    def __init__(self, split: str, image_size: int = 64, augment: Augment | None = None, seed: int = 0):
        super().__init__(image_size, augment, seed)
        self.images, self.labels = load_digits(split)

    def __len__(self) -> int:
        return len(self.labels)

    def _sample(self, i: int, rng: np.random.Generator) -> Sample:
        label = int(self.labels[i])
        size = (self.image_size, self.image_size)
        image = F.interpolate(as_image_batch(self.images[i]), size=size, mode="bicubic", align_corners=False,
                              antialias=True)[0].clamp(0, 1)
        template = DIGIT_TEMPLATES[int(rng.integers(len(DIGIT_TEMPLATES)))]
        fact = frozenset({("digit", str(label))})
        return Sample(image, template.format(numeral=label, word=DIGIT_WORDS[label]), fact, fact)


def build_dataset(data: str, *, split: str, image_size: int, seed: int, augment: Augment | None,
                  n: int | None = None, twins: bool = False, flaws: float = 0.0) -> PairDataset:
    """The dataset named by ``data``.

    "shapes" -> :class:`ShapesPairs` with n samples per epoch (default SHAPES_TRAIN_SIZE for train,
    SHAPES_EVAL_SIZE otherwise); "digits" -> :class:`DigitsPairs` (split "train" or "test"); a path ending .csv ->
    :class:`FilePairs` of its rows; an existing folder -> :class:`FilePairs` of its captioned images. File datasets
    have no splits (``split`` is not used; give validation its own CSV or folder). ``n`` is the epoch length of
    generated data: fixed-size datasets (digits, files) ignore it. ``twins``: ShapesWorld's counterfactual pairs
    (see :class:`ShapesPairs`); other data has no attributes to make them from. ``flaws``: the share of ShapesWorld
    items drawn flawed and captioned NULL_CAPTION (see :class:`ShapesPairs`).
    """
    if twins and data != "shapes":
        raise DataError(f"twins are made from ShapesWorld scenes; {data!r} has none")
    if flaws and data != "shapes":
        raise DataError(f"flawed pictures are drawn from ShapesWorld scenes; {data!r} has none")
    if data == "shapes":
        if n is None:
            n = SHAPES_TRAIN_SIZE if split == "train" else SHAPES_EVAL_SIZE
        return ShapesPairs(n, seed, split, image_size, augment, twins, flaws)
    if data == "digits":
        return DigitsPairs(split, image_size, augment, seed)
    if data.lower().endswith(".csv"):
        return FilePairs(read_pairs_csv(data), image_size, augment, seed)
    if Path(data).is_dir():
        return FilePairs(pairs_from_folder(data), image_size, augment, seed)
    raise DataError(f"unknown dataset {data!r}: expected 'shapes', 'digits', a .csv of path,caption rows, "
                    "or a folder of images with same-name .txt captions")


# ------------------------------------------------------------------------------------------ batching


def batches_per_epoch(dataset_len: int, batch_size: int, world_size: int = 1) -> int:
    """Full global batches (batch_size x world_size samples) in an epoch; the tail is dropped.

    Raises :class:`DataError` if not even one global batch fits.
    """
    if batch_size < 1 or world_size < 1:
        raise DataError(f"batch size and process count must be >= 1, got {batch_size} and {world_size}")
    if batch_size * world_size > dataset_len:
        raise DataError(f"batch size {batch_size} x {world_size} process(es) is larger than the dataset "
                        f"({dataset_len} samples)")
    return dataset_len // (batch_size * world_size)


class EpochSampler(Sampler[list[int]]):
    """Batch sampler for one epoch on one process (use as a DataLoader ``batch_sampler``).

    All ranks share one permutation of range(dataset_len) seeded by (seed, epoch); global batch b is
    perm[b*B*W : (b+1)*B*W] (B = batch_size, W = world_size), of which rank r takes the r-th slice of B. Yields this
    rank's index lists from batch ``start_batch`` on, so a resumed run skips exactly the batches already done.
    ``group`` > 1 permutes runs of that many consecutive items instead (dataset_len and batch_size must be
    multiples of it), so each run lands in one batch; group 1 is the plain permutation.
    """

    def __init__(self, dataset_len: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0, group: int = 1) -> None:
        super().__init__()
        if group < 1 or dataset_len % group or batch_size % group:
            raise DataError(f"items come in groups of {group}: the dataset ({dataset_len}) and the batch size "
                            f"({batch_size}) must be multiples of it")
        self.batches = batches_per_epoch(dataset_len, batch_size, world_size)
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, {world_size}), got {rank}")
        if not 0 <= start_batch <= self.batches:
            raise DataError(f"start batch must be in [0, {self.batches}], got {start_batch}")
        if seed < 0 or epoch < 0:
            raise DataError(f"seed and epoch must be >= 0, got {seed} and {epoch}")
        self.dataset_len, self.batch_size, self.seed, self.epoch = dataset_len, batch_size, seed, epoch
        self.rank, self.world_size, self.start_batch, self.group = rank, world_size, start_batch, group

    def __len__(self) -> int:
        return self.batches - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = _torch_generator(_PERMUTATION_STREAM, self.seed, self.epoch)
        runs = torch.randperm(self.dataset_len // self.group, generator=generator)
        perm = (runs[:, None] * self.group + torch.arange(self.group)).flatten()
        for b in range(self.start_batch, self.batches):
            start = (b * self.world_size + self.rank) * self.batch_size
            yield perm[start : start + self.batch_size].tolist()


@dataclass
class Batch:
    """Collated samples: images float [B, 3, S, S] in [0, 1]; captions, facts and claims lists of length B; tokens
    int64 [B, L], the captions' token ids, when the loader was given a tokenizer (else None)."""

    images: torch.Tensor
    captions: list[str]
    facts: list[Attributes]
    claims: list[Attributes]
    tokens: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        return replace(self, images=self.images.pin_memory(),
                       tokens=None if self.tokens is None else self.tokens.pin_memory())


def collate(samples: list[Sample], tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None) -> Batch:
    """Stack ``samples`` into a :class:`Batch`, tokenizing the captions when ``tokenizer`` is given."""
    captions = [s.caption for s in samples]
    return Batch(
        images=torch.stack([s.image for s in samples]),
        captions=captions,
        facts=[s.facts for s in samples],
        claims=[s.claims for s in samples],
        tokens=None if tokenizer is None else tokenizer(captions),
    )


def make_loader(dataset: PairDataset, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                start_batch: int = 0, workers: int = 0, pin_memory: bool = False,
                tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None) -> DataLoader:
    """A DataLoader of :class:`Batch` for epoch ``epoch`` on process ``rank`` of ``world_size``, starting at batch
    ``start_batch`` (see :class:`EpochSampler`). Calls ``dataset.set_epoch(epoch)``. Its batches are the same for
    any number of ``workers``. With ``tokenizer`` the captions are tokenized as batches are collated (in the
    workers, off the training step's critical path)."""
    dataset.set_epoch(epoch)
    sampler = EpochSampler(len(dataset), batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                           start_batch=start_batch, group=dataset.group)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=functools.partial(collate, tokenizer=tokenizer),
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False)


def _unique(sets: Sequence[Collection]) -> tuple[list[frozenset], torch.Tensor]:
    """(the distinct sets in first-seen order, int64 [N] index of each input set in that list)."""
    ids: dict[frozenset, int] = {}
    index = [ids.setdefault(frozenset(s), len(ids)) for s in sets]
    return list(ids), torch.tensor(index, dtype=torch.int64)


def positives(facts: Sequence[Collection], claims: Sequence[Collection]) -> torch.Tensor:
    """bool [N, N]: entry [i, j] is True iff caption j is true of image i, i.e. claims[j] <= facts[i].

    An empty claims set is true of every image. Works on the distinct sets only: each distinct claims set counts
    its items present in each distinct facts set and is true where the count equals its size.
    """
    if len(facts) != len(claims):
        raise DataError(f"{len(facts)} facts sets but {len(claims)} claims sets")
    fact_sets, fact_ids = _unique(facts)
    claim_sets, claim_ids = _unique(claims)
    vocab: dict = {}
    fact_items = [[vocab.setdefault(x, len(vocab)) for x in s] for s in fact_sets]
    claim_items = [[vocab.setdefault(x, len(vocab)) for x in s] for s in claim_sets]
    has = torch.zeros(len(fact_sets), len(vocab), dtype=torch.int32)  # has[f, v]: facts set f contains item v
    rows = [f for f, items in enumerate(fact_items) for _ in items]
    has[rows, [v for items in fact_items for v in items]] = 1
    owner = torch.tensor([c for c, items in enumerate(claim_items) for _ in items], dtype=torch.int64)
    flat = torch.tensor([v for items in claim_items for v in items], dtype=torch.int64)
    hits = torch.zeros(len(fact_sets), len(claim_sets), dtype=torch.int32).index_add_(1, owner, has[:, flat])
    sizes = torch.tensor([len(items) for items in claim_items], dtype=torch.int32)
    return (hits == sizes)[fact_ids][:, claim_ids]
