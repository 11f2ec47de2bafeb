"""Flawed ShapesWorld pictures: each flaw breaks what it names, the oracle never reads one as its scene, and the
training data captions them as unclear."""
import numpy as np
import pytest
import torch

from core_clip import shapes
from core_clip.data import NULL_CAPTION, UNCLEAR, ShapesPairs, build_dataset
from core_clip.errors import DataError
from core_clip.flaws import FLAWS, off_palette_color, render_flawed

# What the oracle must misread for each flaw (any one of the listed attributes).
_BROKEN = {
    "shape_color": ("color",),
    "background_color": ("background",),
    "uneven": ("color", "background"),
    "outline": ("shape",),
    "texture": ("color", "background"),
    "extra": ("shape", "color"),
}


@pytest.mark.parametrize("kind", FLAWS)
def test_each_flaw_breaks_what_it_names(kind):
    rng = np.random.default_rng(FLAWS.index(kind))
    scenes = shapes.sample_scenes(60, seed=3) + shapes.sample_scenes(20, seed=3, split="heldout")
    for scene in scenes:
        flawed = render_flawed(scene, 64, rng, kind)
        assert flawed.kind == kind and flawed.image.shape == (64, 64, 3) and flawed.image.dtype == np.uint8
        # the facts left are the scene's own, less what the flaw falsifies, which the oracle misreads
        assert flawed.facts < shapes.scene_facts(scene)
        lost = set(shapes.ATTRIBUTES) - {name for name, _ in flawed.facts}
        assert lost & set(_BROKEN[kind])
        reading = shapes.read(flawed.image)
        assert any(reading[name] != getattr(scene, name) for name in lost & set(_BROKEN[kind])), (scene, reading)


def test_flaws_are_drawn_uniformly_and_reproducibly():
    scene = shapes.Scene("circle", "red", "blue", "large", "center")
    kinds = [render_flawed(scene, 32, np.random.default_rng(i)).kind for i in range(300)]
    assert set(kinds) == set(FLAWS) and min(kinds.count(k) for k in FLAWS) > 25
    a, b = (render_flawed(scene, 48, np.random.default_rng(7)) for _ in range(2))
    assert a.kind == b.kind and np.array_equal(a.image, b.image)
    with pytest.raises(shapes.ShapesError, match="unknown flaw"):
        render_flawed(scene, 32, np.random.default_rng(0), kind="smudge")


def test_off_palette_colours_keep_their_distance():
    rng = np.random.default_rng(0)
    colors = np.stack([off_palette_color(rng) for _ in range(500)])
    distance = np.linalg.norm(colors[:, None] - shapes.PALETTE[None], axis=-1).min(axis=1)
    assert distance.min() > 50 and colors.min() >= 0 and colors.max() <= 255
    assert colors.std(axis=0).min() > 40   # spread over the cube, not stuck in one corner


def test_shapes_pairs_caption_flawed_pictures_as_unclear():
    n = 400
    clean, flawed = ShapesPairs(n, seed=4), ShapesPairs(n, seed=4, flaws=0.3)
    unclear = 0
    for i in range(0, n, 4):
        a, b = clean[i], flawed[i]
        if b.caption == NULL_CAPTION:
            unclear += 1
            assert b.claims == UNCLEAR and UNCLEAR < b.facts
            assert not shapes.matches(shapes.read(b.image.permute(1, 2, 0).numpy()), flawed.scene(i))
        else:
            assert UNCLEAR.isdisjoint(b.facts) and b.claims <= b.facts
        assert flawed.scene(i) == clean.scene(i)   # flaws change how a scene is drawn, not which scene
    assert 15 <= unclear <= 45
    # flaws=0 draws exactly what a dataset without the option drew
    assert torch.equal(ShapesPairs(8, seed=4, flaws=0.0)[5].image, clean[5].image)
    with pytest.raises(DataError, match="probability"):
        ShapesPairs(8, seed=0, flaws=1.5)
    with pytest.raises(DataError, match="ShapesWorld scenes"):
        build_dataset("digits", split="train", image_size=32, seed=0, augment=None, flaws=0.2)
