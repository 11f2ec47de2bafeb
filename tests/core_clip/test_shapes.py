"""ShapesWorld: renderer, sampling, captions and the strict analytic oracle."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from core_clip.shapes import (
    ATTRIBUTES,
    COLORS,
    HELD_OUT,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SPLITS,
    Scene,
    ShapesError,
    caption,
    caption_with_claims,
    captions,
    describe,
    matches,
    read,
    render,
    render_batch,
    sample_scenes,
    scene_facts,
)

RED, BLUE = np.array(COLORS["red"]), np.array(COLORS["blue"])


def paint(inside, size: int, fg=COLORS["red"], bg=COLORS["blue"], ss: int = 4) -> np.ndarray:
    """Render an arbitrary region, inside(x, y) -> bool on coordinates in [0, 1], as uint8 [size, size, 3]."""
    coords = (np.arange(size * ss) + 0.5) / (size * ss)
    alpha = inside(coords[None, :], coords[:, None]).reshape(size, ss, size, ss).mean(axis=(1, 3))
    image = np.array(bg) + alpha[..., None] * (np.array(fg) - np.array(bg))
    return np.rint(image).astype(np.uint8)


def coverage(image: np.ndarray, fg=RED, bg=BLUE) -> np.ndarray:
    """Per-pixel shape coverage of a nominal render, float [H, W] in [0, 1]."""
    axis = fg - bg
    return np.clip((image - bg) @ axis / (axis @ axis), 0, 1)


# ------------------------------------------------------------------- oracle


@pytest.mark.parametrize("size", [32, 64, 256])
def test_oracle_reads_jittered_renders(size):
    scenes = [s for split in SPLITS for s in sample_scenes(250, seed=size, split=split)]
    rng = np.random.default_rng(size)
    errors = dict.fromkeys(ATTRIBUTES, 0)
    for scene in scenes:
        reading = read(render(scene, size, rng))
        for name in ATTRIBUTES:
            errors[name] += reading[name] != getattr(scene, name)
    assert len(scenes) == 1000
    assert {name: n / len(scenes) for name, n in errors.items()} == pytest.approx(
        dict.fromkeys(ATTRIBUTES, 0.0), abs=0.01
    )


@pytest.mark.parametrize("size", [32, 64, 256])
def test_oracle_rejects_shapes_that_are_not_in_the_world(size):
    diamond = paint(lambda x, y: abs(x - 0.5) + abs(y - 0.5) <= 0.2, size)
    ellipse = paint(lambda x, y: ((x - 0.5) / 0.2) ** 2 + ((y - 0.5) / 0.1) ** 2 <= 1, size)
    two_circles = paint(
        lambda x, y: (np.hypot(x - 0.3, y - 0.5) <= 0.1) | (np.hypot(x - 0.7, y - 0.5) <= 0.1), size
    )
    for image in (diamond, ellipse):
        reading = read(image)
        assert reading["shape"] is None and reading["size"] is None
        assert (reading["color"], reading["background"], reading["position"]) == ("red", "blue", "center")
    reading = read(two_circles)
    assert reading["shape"] is None and reading["position"] is None


def test_oracle_rejects_ambiguous_and_two_tone_shapes():
    # |x|^3 + |y|^3 <= r^3 sits between a circle and a square: it fits both
    # above the IoU threshold but neither clearly better.
    squircle = paint(lambda x, y: (np.abs(x - 0.5) ** 3 + np.abs(y - 0.5) ** 3) <= 0.16**3, 64)
    assert read(squircle)["shape"] is None

    circle = np.hypot(np.arange(64)[None, :] + 0.5 - 32, np.arange(64)[:, None] + 0.5 - 32) <= 10
    two_tone = render(Scene("circle", "red", "blue"))
    two_tone[circle & (np.arange(64) >= 32)] = COLORS["green"]
    reading = read(two_tone)
    assert (reading["shape"], reading["color"], reading["background"]) == (None, None, "blue")


def test_oracle_rejects_noise_gradients_and_noisy_borders():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ramp = np.linspace(0, 1, 64)[None, :, None]
    gradient = np.rint(RED * ramp + BLUE * (1 - ramp)).repeat(64, axis=0).astype(np.uint8)
    for image in (noise, gradient):
        assert read(image) == dict.fromkeys(ATTRIBUTES)

    image = render(Scene("circle", "red", "blue")).astype(float)
    border = np.ones((64, 64), bool)
    border[2:-2, 2:-2] = False
    image[border] += rng.normal(0, 25, (border.sum(), 3))
    reading = read(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    assert reading["background"] is None
    assert reading["shape"] in (None, "circle") and reading["color"] in (None, "red")


@pytest.mark.parametrize("size", [32, 64])
def test_oracle_rejects_fuzzy_blobs(size):
    coords = (np.arange(size) + 0.5) / size
    alpha = np.exp(-((coords[None, :] - 0.5) ** 2 + (coords[:, None] - 0.5) ** 2) / (2 * 0.05**2))
    blob = np.rint(BLUE + alpha[..., None] * (RED - BLUE)).astype(np.uint8)
    reading = read(blob)
    assert (reading["shape"], reading["color"], reading["background"]) == (None, None, "blue")


def test_oracle_rejects_colours_outside_the_palette():
    grey_square = paint(lambda x, y: (abs(x - 0.5) <= 0.15) & (abs(y - 0.5) <= 0.15), 64, fg=(128, 128, 128))
    assert read(grey_square) == {
        "shape": "square", "color": None, "background": "blue", "position": "center", "size": "small"
    }
    grey_background = paint(lambda x, y: np.hypot(x - 0.5, y - 0.5) <= 0.15, 64, bg=(128, 128, 128))
    assert read(grey_background)["background"] is None


def test_oracle_tolerates_mild_noise():
    rng = np.random.default_rng(1)
    scene = Scene("triangle", "green", "white", "small", "bottom")
    image = render(scene).astype(float) + rng.normal(0, 3, (64, 64, 3))
    reading = read(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    assert matches(reading, scene, ATTRIBUTES)


def test_oracle_tolerates_slight_blur():
    # Decoders tend to soften edges; a 0.75 px Gaussian blur at 64 px must not
    # change any reading.
    rng = np.random.default_rng(2)
    scenes = sample_scenes(200, seed=5, split="test")
    for scene in scenes:
        blurred = Image.fromarray(render(scene, 64, rng)).filter(ImageFilter.GaussianBlur(0.75))
        assert matches(read(blurred), scene, ATTRIBUTES), scene


def test_oracle_on_empty_image():
    assert read(np.full((64, 64, 3), COLORS["green"], np.uint8)) == {
        "shape": None, "color": None, "background": "green", "position": None, "size": None
    }


def test_read_accepts_pil_arrays_and_tensors():
    torch = pytest.importorskip("torch")
    scene = Scene("square", "yellow", "purple", "small", "right")
    image = render(scene, 48, np.random.default_rng(3))
    expected = read(image)
    assert matches(expected, scene, ATTRIBUTES)
    assert read(Image.fromarray(image)) == expected
    assert read(Image.fromarray(image).convert("RGBA")) == expected
    assert read(image.astype(np.float32) / 255) == expected
    assert read(np.moveaxis(image, -1, 0).astype(np.float64) / 255) == expected
    chw = torch.from_numpy(image).permute(2, 0, 1).float().div(255).requires_grad_()
    assert read(chw) == expected


def test_read_also_handles_non_square_images():
    scene = Scene("circle", "black", "white", "small", "center")
    image = render(scene, 64)
    wide = np.concatenate([image, np.full((64, 32, 3), COLORS["white"], np.uint8)], axis=1)
    assert read(wide)["shape"] == "circle"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((64, 64), np.uint8), "3 dimensions"),
        (np.zeros((2, 64, 64, 3), np.uint8), "3 dimensions"),
        (np.zeros((64, 64, 4), np.uint8), "3 colour channels"),
        (np.zeros((8, 8, 3), np.uint8), ">= 16"),
        (np.zeros((64, 64, 3), np.int64), "dtype"),
        (np.full((64, 64, 3), 200.0), "[0, 1]"),
        (np.full((64, 64, 3), np.nan), "NaN"),
        ([[0, 1, 2]], "list"),
    ],
)
def test_read_rejects_bad_input(image, message):
    with pytest.raises(ShapesError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read(image)


def test_matches():
    scene = Scene("circle", "red", "blue", "small", "left")
    reading = {"shape": "circle", "color": "red", "background": "blue", "position": "right", "size": "small"}
    assert matches(reading, scene)
    assert not matches(reading, scene, ("shape", "position"))
    assert not matches(dict(reading, shape=None), scene)
    with pytest.raises(ShapesError, match="'colour'"):
        matches(reading, scene, ("colour",))


# ----------------------------------------------------------------- renderer


@pytest.mark.parametrize("size", [16, 32, 48, 64, 100, 256])
def test_render_dtype_and_shape(size):
    image = render(Scene("triangle", "orange", "black", "large"), size, np.random.default_rng(0))
    assert image.dtype == np.uint8 and image.shape == (size, size, 3)
    batch = render_batch(sample_scenes(3, 0), size)
    assert batch.dtype == np.uint8 and batch.shape == (3, size, size, 3)


@pytest.mark.parametrize("shape", SHAPES)
def test_nominal_render_has_exact_palette_colours(shape):
    image = render(Scene(shape, "red", "blue", "large"))
    assert (image[32, 32] == RED).all()
    for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
        assert (corner == BLUE).all()
    assert set(map(tuple, image.reshape(-1, 3))) >= {tuple(RED), tuple(BLUE)}


def test_nominal_geometry():
    alpha = coverage(render(Scene("circle", "red", "blue", "small", "left"), 128))
    ys, xs = np.mgrid[0:128, 0:128] + 0.5
    assert (alpha * xs).sum() / alpha.sum() / 128 == pytest.approx(0.27, abs=0.005)
    assert (alpha * ys).sum() / alpha.sum() / 128 == pytest.approx(0.5, abs=0.005)
    assert np.sqrt(alpha.sum() / np.pi) * 2 / 128 == pytest.approx(0.30, abs=0.005)

    square = coverage(render(Scene("square", "red", "blue", "large"), 128))
    assert square.sum(axis=1).max() / 128 == pytest.approx(0.55, abs=0.005)


def test_triangle_points_up():
    alpha = coverage(render(Scene("triangle", "red", "blue", "large"), 128))
    widths = alpha.sum(axis=1)
    rows = np.nonzero(widths > 0.5)[0]
    assert widths[rows[1]] < 5 and widths[rows[-2]] > 65  # the outer rows are partly covered
    assert np.all(np.diff(widths[rows[0] : rows[-1]]) > 0)
    # Area centroid of an upright triangle sits 2/3 of the way down from the apex.
    centroid = (alpha.sum(axis=1) @ (np.arange(128) + 0.5)) / alpha.sum()
    assert (centroid - rows[0]) / (rows[-1] + 1 - rows[0]) == pytest.approx(2 / 3, abs=0.03)


def test_jitter_stays_within_contract():
    rng = np.random.default_rng(0)
    scene = Scene("circle", "green", "black", "small", "top")
    nominal = render(scene)
    seen_colours = set()
    for _ in range(50):
        image = render(scene, 64, rng)
        assert np.abs(image[0, 0].astype(int) - COLORS["black"]).max() <= 12
        seen_colours.add(tuple(image[0, 0]))
        assert read(image)["position"] == "top"
    assert len(seen_colours) > 10
    assert not np.array_equal(render(scene, 64, rng), nominal)


def test_render_is_deterministic_and_batch_items_are_independent():
    scenes = sample_scenes(6, seed=1)
    first = render_batch(scenes, 32, seed=7)
    assert np.array_equal(first, render_batch(scenes, 32, seed=7))
    assert not np.array_equal(first, render_batch(scenes, 32, seed=8))
    assert np.array_equal(render_batch(scenes[:3], 32, seed=7), first[:3])
    assert np.array_equal(render_batch([scenes[0], *scenes[4:]], 32, seed=7)[0], first[0])
    nominal = render_batch(scenes, 32, seed=None)
    assert all(np.array_equal(nominal[i], render(scene, 32)) for i, scene in enumerate(scenes))
    rngs = [np.random.default_rng(5), np.random.default_rng(5)]
    assert np.array_equal(render(scenes[0], 32, rngs[0]), render(scenes[0], 32, rngs[1]))


def test_render_rejects_bad_arguments():
    with pytest.raises(ShapesError, match="Scene"):
        render(("circle", "red", "blue"))
    with pytest.raises(ShapesError, match="4"):
        render(Scene("circle", "red", "blue"), 4)


# ----------------------------------------------------------- scenes, splits


def test_training_splits_exclude_held_out_pairs():
    for split in ("train", "val", "test"):
        scenes = sample_scenes(5000, seed=0, split=split)
        assert not any(scene.held_out for scene in scenes)
        assert {(s.color, s.shape) for s in scenes} == {
            (c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT
        }
    held_out = sample_scenes(2000, seed=0, split="heldout")
    assert all(scene.held_out for scene in held_out)
    assert {(s.color, s.shape) for s in held_out} == set(HELD_OUT)


def test_sampling_is_deterministic_and_splits_differ():
    assert sample_scenes(100, 3, "val") == sample_scenes(100, 3, "val")
    assert sample_scenes(100, 3, "val") != sample_scenes(100, 4, "val")
    samples = [sample_scenes(100, 3, split) for split in ("train", "val", "test")]
    assert samples[0] != samples[1] != samples[2] != samples[0]
    assert sample_scenes(50, 3)[:10] == sample_scenes(10, 3)
    with pytest.raises(ShapesError, match="'dev'"):
        sample_scenes(10, 0, "dev")


def test_sampling_is_uniform_over_valid_scenes():
    scenes = sample_scenes(30000, seed=2)
    assert all(s.color != s.background for s in scenes)
    assert all(s.position == "center" for s in scenes if s.size == "large")
    # 5 small positions + 1 large layout per colour pair: large is 1/6 of scenes.
    assert np.mean([s.size == "large" for s in scenes]) == pytest.approx(1 / 6, abs=0.01)
    counts = np.array([sum(s.position == p for s in scenes) for p in POSITIONS[1:]])
    assert counts / len(scenes) == pytest.approx([1 / 6] * 4, abs=0.01)
    assert len(set(scenes)) == 3 * 8 * 7 * 6 - 3 * 7 * 6


@pytest.mark.parametrize(
    ("kwargs", "offending"),
    [
        ({"shape": "hexagon"}, "'hexagon'"),
        ({"color": "teal"}, "'teal'"),
        ({"background": "pink"}, "'pink'"),
        ({"size": "medium"}, "'medium'"),
        ({"position": "corner"}, "'corner'"),
        ({"background": "red"}, "'red'"),
        ({"size": "large", "position": "left"}, "'left'"),
    ],
)
def test_scene_validation(kwargs, offending):
    fields = {"shape": "circle", "color": "red", "background": "blue", **kwargs}
    with pytest.raises(ShapesError, match=offending):
        Scene(**fields)


def test_held_out_property():
    assert Scene("triangle", "purple", "white").held_out
    assert not Scene("triangle", "white", "purple").held_out


# ----------------------------------------------------------------- captions


def test_captions_are_truthful():
    rng = np.random.default_rng(0)
    for scene in sample_scenes(300, 0) + sample_scenes(100, 0, "heldout"):
        options = captions(scene)
        assert len(set(options)) == len(options) >= 5
        assert caption(scene, rng) in options
        for text in options:
            assert f"{scene.color} {scene.shape}" in text
            assert " a o" not in text and " a a" not in text and not text.startswith("a o")
        if scene.size == "large":
            words = {word for text in options for word in text.split()}
            assert not words & {"left", "right", "top", "bottom"}
        full = describe(scene)
        assert all(word in full for word in (scene.size, scene.color, scene.shape, scene.background))


def test_describe_format():
    assert describe(Scene("circle", "red", "blue", "small", "left")) == (
        "a small red circle on the left on a blue background"
    )
    assert describe(Scene("square", "orange", "white", "large")) == (
        "a large orange square in the center on a white background"
    )
    assert "at the top" in describe(Scene("triangle", "green", "orange", "small", "top"))


def test_caption_strings_are_unchanged_for_a_given_rng():
    rng = np.random.default_rng(0)
    assert [caption(Scene("circle", "red", "blue", "small", "left"), rng) for _ in range(6)] == [
        "a red circle on the left on a blue background",
        "a picture of a red circle",
        "a photo of a small red circle",
        "a red circle on the left",
        "a red circle on the left",
        "a red circle",
    ]


def test_scene_facts():
    assert scene_facts(Scene("square", "orange", "white", "large")) == {
        ("shape", "square"), ("color", "orange"), ("background", "white"), ("size", "large"), ("position", "center")
    }


def test_caption_claims_are_what_the_caption_says():
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    scenes = sample_scenes(400, 1) + sample_scenes(100, 1, "heldout")
    seen = set()
    for scene in scenes:
        text, claims = caption_with_claims(scene, rng_a)
        assert text == caption(scene, rng_b) and text in captions(scene)  # same draw as caption()
        assert claims <= scene_facts(scene)
        claimed = dict(claims)
        assert claimed["color"] == scene.color and claimed["shape"] == scene.shape
        assert ("size" in claimed) == (f" {scene.size} " in text)
        assert ("background" in claimed) == text.endswith("background")
        assert ("position" in claimed) == (POSITION_PHRASES[scene.position] in text)
        seen.add(frozenset(claimed))
    assert len(seen) == 7  # every combination the templates produce


def test_caption_claims_examples():
    class Fixed:  # an rng that always picks template k
        def __init__(self, k):
            self.k = k

        def integers(self, n):
            return self.k

    large = Scene("circle", "red", "blue", "large")
    assert caption_with_claims(large, Fixed(0)) == ("a red circle", {("color", "red"), ("shape", "circle")})
    assert caption_with_claims(large, Fixed(2)) == (
        "a red circle in the center", {("color", "red"), ("shape", "circle"), ("position", "center")}
    )
    assert caption_with_claims(large, Fixed(4)) == (
        "a photo of a large red circle", {("color", "red"), ("shape", "circle"), ("size", "large")}
    )
    assert caption_with_claims(large, Fixed(8)) == (describe(large), scene_facts(large))
