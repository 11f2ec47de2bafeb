"""CSV pair lists, the digits split, and the training datasets, sampler and loader."""
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from core_clip.data import (
    DIGIT_WORDS,
    Augment,
    DigitsPairs,
    EpochSampler,
    FilePairs,
    Pair,
    ShapesPairs,
    batches_per_epoch,
    build_dataset,
    collate,
    load_digits,
    make_loader,
    pairs_from_folder,
    positives,
    read_pairs_csv,
)
from core_clip.errors import DataError, ImageReadError
from core_clip.shapes import ATTRIBUTES, counterfactual, read, sample_scenes, scene_facts
from core_clip.tokenizer import build_tokenizer


def _image(path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_csv_with_header_and_relative_paths(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "b.png")
    (tmp_path / "pairs.csv").write_text('path,caption\na.png,a red square\nsub/b.png,"red, square"\n\n')
    pairs = read_pairs_csv(tmp_path / "pairs.csv")
    assert [(p.path, p.caption) for p in pairs] == [(tmp_path / "a.png", "a red square"),
                                                     (tmp_path / "sub" / "b.png", "red, square")]


@pytest.mark.parametrize("body, message", [
    ("a.png,a red square\nmissing.png,x\ngone.jpg,y\n", r"2 image file\(s\) missing.*2: missing.png; 3: gone.jpg"),
    ("a.png,\n", r"pairs.csv:1: empty caption for a.png"),
    ("path,caption\na.png\n", r"pairs.csv:2: expected two columns"),
    ("path,caption\n", "no image-caption rows"),
])
def test_bad_csvs_name_the_problem(tmp_path, body, message):
    _image(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text(body)
    with pytest.raises(DataError, match=message):
        read_pairs_csv(tmp_path / "pairs.csv")


def test_digits_split_is_fixed_stratified_and_disjoint():
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    assert len(train_x) + len(test_x) == 1797 and len(test_x) == 450
    assert train_x.shape[1:] == (8, 8, 3) and train_x.dtype == np.uint8
    assert np.bincount(test_y).min() >= 40  # every digit is in the test split
    again_x, again_y = load_digits("test")
    assert np.array_equal(again_x, test_x) and np.array_equal(again_y, test_y)
    train_set = {x.tobytes() + bytes([y]) for x, y in zip(train_x, train_y)}
    assert sum(x.tobytes() + bytes([y]) in train_set for x, y in zip(test_x, test_y)) < 5  # only true duplicates
    assert train_x.max() == 255 and np.median(train_x) > 200  # white paper, dark ink
    with pytest.raises(DataError, match="'train' or 'test'"):
        load_digits("val")


# ---------------------------------------------------------------------------------------------- training data

def _same_samples(a, b) -> bool:
    return (torch.equal(a.image, b.image) and a.caption == b.caption and a.facts == b.facts
            and a.claims == b.claims)


def _batches(loader) -> list:
    return [(batch.images, batch.captions) for batch in loader]


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and cx == cy for (x, cx), (y, cy) in zip(a, b))


@pytest.mark.parametrize("make", [
    lambda seed: ShapesPairs(50, seed, augment=Augment(blur=0.5, hflip=True)),
    lambda seed: DigitsPairs("test", 32, Augment(), seed),
])
def test_a_sample_is_a_function_of_seed_epoch_and_index(make):
    ds, twin, other_seed = make(3), make(3), make(4)
    for i in (0, 7, 31):
        assert _same_samples(ds[i], twin[i]) and _same_samples(ds[i], ds[i])
    assert not any(torch.equal(ds[i].image, other_seed[i].image) for i in range(10))
    before = [ds[i] for i in range(10)]
    ds.set_epoch(1)
    assert not any(torch.equal(ds[i].image, b.image) for i, b in zip(range(10), before))
    assert len({ds[i].caption for i in range(10)} ^ {b.caption for b in before}) > 0
    ds.set_epoch(0)
    assert all(_same_samples(ds[i], b) for i, b in zip(range(10), before))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_loader_batches_do_not_depend_on_workers_and_resume_exactly():
    ds = ShapesPairs(96, seed=1, image_size=32, augment=Augment(blur=0.5))
    single = _batches(make_loader(ds, 16, seed=5, epoch=2))
    assert len(single) == 6 and single[0][0].shape == (16, 3, 32, 32)
    assert _same_batches(single, _batches(make_loader(ds, 16, seed=5, epoch=2, workers=2)))
    assert _same_batches(single[4:], _batches(make_loader(ds, 16, seed=5, epoch=2, start_batch=4)))
    next_epoch = _batches(make_loader(ds, 16, seed=5, epoch=3))
    assert ds.epoch == 3 and not torch.equal(single[0][0], next_epoch[0][0])


def test_collate():
    samples = [ShapesPairs(10, 0, image_size=16)[i] for i in range(3)]
    batch = collate(samples)
    assert batch.images.shape == (3, 3, 16, 16) and len(batch) == 3
    assert batch.captions == [s.caption for s in samples] and batch.facts == [s.facts for s in samples]
    assert batch.claims == [s.claims for s in samples] and batch.tokens is None


def test_loader_tokenizes_captions_in_its_workers():
    tokenizer = build_tokenizer({"type": "open_clip", "context_length": 77})
    ds = ShapesPairs(32, seed=1, image_size=16)
    batches = list(make_loader(ds, 8, seed=0, epoch=0, workers=2, tokenizer=tokenizer))
    assert len(batches) == 4
    for batch in batches:
        assert batch.tokens.dtype == torch.int64 and torch.equal(batch.tokens, tokenizer(batch.captions))


# ------------------------------------------------------------------------------------------ EpochSampler


def test_ranks_split_each_global_batch_in_rank_order():
    single = list(EpochSampler(103, 8, seed=0, epoch=1))
    ranks = [list(EpochSampler(103, 4, seed=0, epoch=1, rank=r, world_size=2)) for r in range(2)]
    assert batches_per_epoch(103, 8) == len(single) == 12 and [len(r) for r in ranks] == [12, 12]
    assert all(len(b) == 8 for b in single) and all(len(b) == 4 for r in ranks for b in r)
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == single
    flat = [i for b in single for i in b]
    assert len(set(flat)) == 96 and set(flat) <= set(range(103))


def test_start_batch_yields_the_tail_and_epochs_differ():
    full = list(EpochSampler(50, 5, seed=2, epoch=0))
    for k in (0, 3, 10):
        sampler = EpochSampler(50, 5, seed=2, epoch=0, start_batch=k)
        assert len(sampler) == 10 - k and list(sampler) == full[k:]
    assert list(EpochSampler(50, 5, seed=2, epoch=1)) != full
    assert list(EpochSampler(50, 5, seed=3, epoch=0)) != full
    assert list(EpochSampler(50, 5, seed=2, epoch=0)) == full


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 512}, r"batch size 512 x 1 process\(es\) is larger than the dataset \(100 samples\)"),
    ({"batch_size": 60, "world_size": 2, "rank": 1}, r"batch size 60 x 2 process\(es\) is larger"),
    ({"batch_size": 10, "world_size": 2, "rank": 2}, r"rank must be in \[0, 2\)"),
    ({"batch_size": 10, "start_batch": 11}, r"start batch must be in \[0, 10\]"),
])
def test_sampler_errors(kwargs, message):
    with pytest.raises(DataError, match=message):
        EpochSampler(100, seed=0, epoch=0, **kwargs)


# ------------------------------------------------------------------------------------------- ShapesPairs


def test_shapes_train_split_never_shows_held_out_pairs():
    ds = ShapesPairs(2000, seed=0)
    scenes = [ds.scene(i) for i in range(2000)]
    assert not any(s.held_out for s in scenes)
    assert len({(s.color, s.shape) for s in scenes}) == 3 * 8 - 3
    assert all(ds.scene(i) == s for i, s in zip(range(5), scenes))
    assert all(dict(ds[i].facts) == {a: getattr(s, a) for a in ATTRIBUTES} for i, s in zip(range(5), scenes))
    heldout = ShapesPairs(200, seed=0, split="heldout")
    assert all(heldout.scene(i).held_out for i in range(200))
    with pytest.raises(DataError, match="'dev'"):
        ShapesPairs(10, 0, split="dev")


def test_shapes_claims_hold_and_the_oracle_reads_the_facts():
    ds = ShapesPairs(200, seed=4)
    samples = [ds[i] for i in range(200)]
    assert all(s.claims <= s.facts and s.image.shape == (3, 64, 64) for s in samples)
    for s in samples:
        reading = read(s.image)
        assert {a: reading[a] for a in ("shape", "color", "background")} == {
            a: v for a, v in s.facts if a in ("shape", "color", "background")}
    batch = collate(samples[:64])
    assert positives(batch.facts, batch.claims).diagonal().all()


def _binding(scene):
    return scene.color, scene.shape, scene.background


def test_counterfactual_twins_differ_only_in_what_goes_with_what():
    rng = np.random.default_rng(0)
    kinds = Counter()
    for scene in sample_scenes(400, seed=1) + sample_scenes(100, seed=1, split="heldout"):
        twin = counterfactual(scene, rng)
        assert (twin.size, twin.position, twin.held_out) == (scene.size, scene.position, scene.held_out)
        (c, s, b), (c2, s2, b2) = _binding(scene), _binding(twin)
        if (c2, b2) == (b, c):
            kinds["swap"] += s2 == s
        else:
            changed = [x != y for x, y in zip((c, s, b), (c2, s2, b2))]
            assert sum(changed) == 1, (scene, twin)
            kinds[("color", "shape", "background")[changed.index(True)]] += 1
    assert set(kinds) == {"swap", "color", "shape", "background"} and min(kinds.values()) > 60


def test_shapes_twins_share_a_batch_with_their_pair():
    ds = ShapesPairs(64, seed=2, twins=True)
    for i in range(0, 64, 2):
        first, second = ds.scene(i), ds.scene(i + 1)
        assert second != first and (second.size, second.position) == (first.size, first.position)
        assert not second.held_out
    seq = list(EpochSampler(64, 16, seed=0, epoch=1, group=2))
    assert all(idx[k] % 2 == 0 and idx[k + 1] == idx[k] + 1 for idx in seq for k in range(0, 16, 2))
    assert sorted(i for idx in seq for i in idx) == list(range(64))
    batches = list(make_loader(ds, 16, seed=0, epoch=1))  # the loader groups the dataset's pairs
    assert [b.facts for b in batches] == [[scene_facts(ds.scene(i)) for i in idx] for idx in seq]
    # group 1 is the plain permutation the sampler always made
    assert list(EpochSampler(64, 16, seed=0, epoch=1, group=1)) == list(EpochSampler(64, 16, seed=0, epoch=1))
    with pytest.raises(DataError, match="even"):
        ShapesPairs(63, seed=0, twins=True)
    with pytest.raises(DataError, match="multiples"):
        make_loader(ds, 15, seed=0, epoch=0)
    with pytest.raises(DataError, match="ShapesWorld scenes"):
        build_dataset("digits", split="train", image_size=32, seed=0, augment=None, twins=True)


# ----------------------------------------------------------------------------------------------- Augment


def test_augment_output_and_determinism():
    image = torch.rand(3, 40, 40)
    augment = Augment(blur=0.5, hflip=True)
    outs = [augment(image, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(o.shape == image.shape and o.dtype == image.dtype and 0 <= o.min() and o.max() <= 1 for o in outs)
    assert torch.equal(outs[3], augment(image, torch.Generator().manual_seed(3)))
    assert not torch.equal(outs[0], outs[1])
    assert Augment().hflip is False


def test_augment_without_randomness_is_the_identity():
    image = torch.rand(3, 24, 24)
    identity = Augment(scale=(1, 1), shift=0, noise=0, blur=0)
    for seed in range(5):
        assert (identity(image, torch.Generator().manual_seed(seed)) - image).abs().max() <= 1e-6


def test_augment_hflip_flips_only_when_enabled():
    image = torch.rand(3, 16, 16)
    still = Augment(scale=(1, 1), shift=0, noise=0)
    flip = Augment(scale=(1, 1), shift=0, noise=0, hflip=True)
    outs = [flip(image, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(torch.equal(o, image) or torch.equal(o, image.flip(-1)) for o in outs)
    assert 0 < sum(torch.equal(o, image) for o in outs) < 20
    assert all(torch.equal(still(image, torch.Generator().manual_seed(s)), image) for s in range(20))


@pytest.mark.parametrize("kwargs", [{"scale": (0, 1)}, {"scale": (0.9, 0.8)}, {"shift": 0.5}, {"noise": -1},
                                    {"blur": 2}])
def test_augment_rejects_bad_settings(kwargs):
    with pytest.raises(DataError):
        Augment(**kwargs)


# --------------------------------------------------------------------------------------------- positives


def test_positives_by_hand():
    cat, dog = frozenset({("caption", "a cat")}), frozenset({("caption", "a dog")})
    red_circle = frozenset({("color", "red"), ("shape", "circle"), ("background", "blue")})
    red = frozenset({("color", "red")})
    facts = [cat, dog, cat, red_circle, red_circle]
    claims = [cat, dog, cat, red, frozenset()]
    assert positives(facts, claims).tolist() == [
        [True, False, True, False, True],
        [False, True, False, False, True],
        [True, False, True, False, True],
        [False, False, False, True, True],
        [False, False, False, True, True],
    ]
    assert positives([], []).shape == (0, 0)
    with pytest.raises(DataError, match="2 facts sets but 1 claims"):
        positives([cat, dog], [cat])


def test_positives_matches_the_definition_on_shapes():
    ds = ShapesPairs(300, seed=6, image_size=16)
    facts = [scene_facts(ds.scene(i)) for i in range(300)]
    claims = [ds[i].claims for i in range(300)]
    expected = torch.tensor([[c <= f for c in claims] for f in facts])
    assert torch.equal(positives(facts, claims), expected)


# ------------------------------------------------------------------------------------ files, digits, dispatch


def test_file_pairs_resize_crop_and_label_by_caption(tmp_path):
    Image.new("RGB", (60, 30), (0, 0, 255)).save(tmp_path / "wide.png")
    pairs = [Pair(tmp_path / "wide.png", "blue"), Pair(tmp_path / "wide.png", "blue")]
    sample = FilePairs(pairs, 16)[1]
    assert sample.image.shape == (3, 16, 16) and sample.image.is_contiguous()
    assert torch.allclose(sample.image, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 16, 16), atol=1e-6)
    assert sample.facts == sample.claims == {("caption", "blue")}


def test_file_pairs_fail_loudly_on_an_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    ds = FilePairs([Pair(tmp_path / "broken.png", "x")], 16, Augment())
    with pytest.raises(ImageReadError, match="broken.png"):
        ds[0]


def test_pairs_from_folder(tmp_path):
    _image(tmp_path / "b.png")
    _image(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a red\n  square\n")
    (tmp_path / "b.txt").write_text("another one")
    (tmp_path / "notes.md").write_text("ignored")
    assert pairs_from_folder(tmp_path) == [Pair(tmp_path / "a.jpg", "a red square"),
                                           Pair(tmp_path / "b.png", "another one")]
    _image(tmp_path / "c.png")
    _image(tmp_path / "d.png")
    (tmp_path / "d.txt").write_text(" \n")
    with pytest.raises(DataError, match=r"2 image\(s\) without a caption: c.png: no c.txt; d.png: d.txt is empty"):
        pairs_from_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        pairs_from_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="not a folder"):
        pairs_from_folder(tmp_path / "nowhere")


def test_digits_captions_name_the_digit():
    ds = DigitsPairs("test", 32)
    numbers = {str(d): {str(d), w} for d, w in enumerate(DIGIT_WORDS)}
    captions = set()
    for i in range(0, len(ds), 5):
        s = ds[i]
        label = str(int(ds.labels[i]))
        assert s.facts == s.claims == {("digit", label)}
        assert set(s.caption.split()) & numbers[label]
        assert s.image.shape == (3, 32, 32) and s.image.min() >= 0 and s.image.max() <= 1
        captions.add(s.caption)
    assert len(captions) > 30
    assert s.image.mean() > 0.5  # white paper, dark ink


def test_build_dataset_dispatch(tmp_path):
    common = {"image_size": 32, "seed": 0, "augment": None}
    assert len(build_dataset("shapes", split="train", **common)) == 100_000
    shapes_val = build_dataset("shapes", split="val", n=10, **common)
    assert isinstance(shapes_val, ShapesPairs) and len(shapes_val) == 10 and shapes_val.split == "val"
    digits = build_dataset("digits", split="train", n=5, **common)  # n: epoch length of generated data only
    assert isinstance(digits, DigitsPairs) and len(digits) == 1347
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red")
    (tmp_path / "pairs.csv").write_text("a.png,red\n")
    for data in (str(tmp_path / "pairs.csv"), str(tmp_path)):
        ds = build_dataset(data, split="train", **common)
        assert isinstance(ds, FilePairs) and ds.pairs == [Pair(tmp_path / "a.png", "red")]
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        build_dataset("imagenet", split="train", **common)
