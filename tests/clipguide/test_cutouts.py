"""Cutout schemes and Augment: layout, references, gradients, determinism and argument errors."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import resized_crop

from clipguide.cutouts import (
    CUTOUTS, Augment, ClassicCutouts, DiscoCutouts, PooledCutouts, crop_resize, make_cutouts,
)
from clipguide.errors import ClipguideError, UnknownNameError
from clipguide.resample import resample

from tests.helpers import HostSyncs

SCHEMES = CUTOUTS.names()
COLOURS = torch.tensor([[0.2, 0.5, 0.8], [0.9, 0.1, 0.4]])
ALL_OPS = dict(flip=0.5, shift=0.1, rotate=15.0, scale=(0.8, 1.2), perspective=0.1, brightness=0.1,
               contrast=0.2, saturation=0.3, hue=0.2)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def constant_images(height: int, width: int) -> torch.Tensor:
    """[2, 3, H, W]: image b is COLOURS[b] everywhere."""
    return COLOURS[:, :, None, None].expand(2, 3, height, width).clone()


def test_registry_holds_the_three_schemes():
    assert SCHEMES == ["classic", "disco", "pooled"]
    assert isinstance(make_cutouts("classic", cut_pow=2.0), ClassicCutouts)
    assert isinstance(make_cutouts("pooled"), PooledCutouts)
    assert make_cutouts("disco", grey=0.0) == DiscoCutouts(grey=0.0)


# --- every scheme ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEMES)
def test_shape_and_cut_major_order(name):
    scheme = make_cutouts(name, **({"grey": 0.0} if name == "disco" else {}))
    out = scheme(constant_images(12, 18), 5, 8, gen(0))
    assert out.shape == (10, 3, 8, 8)
    for k in range(5):
        for b in range(2):
            torch.testing.assert_close(out[k * 2 + b], COLOURS[b, :, None, None].expand(3, 8, 8))


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("height,width,size", [(10, 14, 20), (14, 10, 6), (9, 9, 9)])
def test_values_stay_in_unit_range_for_any_shape(name, height, width, size):
    images = torch.rand(2, 3, height, width, generator=gen(1))
    out = make_cutouts(name)(images, 6, size, gen(2))
    assert out.shape == (12, 3, size, size)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6


@pytest.mark.parametrize("name", SCHEMES)
def test_backward_gives_finite_nonzero_gradients(name):
    images = torch.rand(2, 3, 11, 16, generator=gen(3), requires_grad=True)
    out = make_cutouts(name)(images, 4, 7, gen(4))
    (out * torch.rand(out.shape, generator=gen(5))).sum().backward()
    assert images.grad.isfinite().all()
    assert images.grad.abs().sum(dim=(1, 2, 3)).min() > 0  # every image receives gradient


@pytest.mark.parametrize("name", ["classic", "disco"])
def test_gradients_match_finite_differences(name):
    images = torch.rand(1, 3, 6, 9, generator=gen(6), dtype=torch.float64, requires_grad=True)
    scheme = make_cutouts(name)
    assert torch.autograd.gradcheck(lambda x: scheme(x, 3, 4, gen(7)), (images,), fast_mode=True)


@pytest.mark.parametrize("name", SCHEMES)
def test_same_seed_same_tensor_and_other_seed_differs(name):
    images = torch.rand(2, 3, 16, 20, generator=gen(8))
    scheme = make_cutouts(name)
    first = scheme(images, 6, 8, gen(9))
    assert torch.equal(first, scheme(images, 6, 8, gen(9)))
    if name == "pooled":  # no randomness: the augmentations are what make pooled cuts differ
        assert torch.equal(first, scheme(images, 6, 8, gen(10)))
    else:
        assert not torch.allclose(first, scheme(images, 6, 8, gen(10)))


# --- crop_resize and classic ----------------------------------------------------------------------------------------

def test_crop_resize_of_integer_boxes_matches_slicing_and_area_pooling():
    images = torch.rand(2, 3, 20, 24, generator=gen(11), dtype=torch.float64)
    boxes = torch.tensor([[[0.0, 4.0, 8.0], [16.0, 12.0, 8.0]],
                          [[3.0, 1.0, 8.0], [5.0, 0.0, 8.0]]], dtype=torch.float64)
    for size in (8, 4, 2):  # same size (plain slice) and area-averaged 2x and 4x downscales
        out = crop_resize(images, boxes, size).view(2, 2, 3, size, size)
        mirrored = crop_resize(images, boxes, size, torch.ones(2, 2, dtype=torch.bool)).view(2, 2, 3, size, size)
        for k in range(2):
            for b in range(2):
                x0, y0, side = boxes[k, b].int().tolist()
                expected = F.adaptive_avg_pool2d(images[b, :, y0:y0 + side, x0:x0 + side], size)
                torch.testing.assert_close(out[k, b], expected)
                torch.testing.assert_close(mirrored[k, b], expected.flip(-1))


def test_crop_resize_upscale_matches_torchvision_resized_crop_inside_the_box():
    images = torch.rand(1, 3, 20, 24, generator=gen(12), dtype=torch.float64)
    top, left, side, size = 5, 3, 8, 19
    out = crop_resize(images, torch.tensor([[[left, top, side]]], dtype=torch.float64), size)
    reference = resized_crop(images, top, left, side, side, [size, size], antialias=False)
    # torchvision clamps to the crop's own edge, we sample the image beyond it: compare where both interpolate inside.
    centres = (torch.arange(size) + 0.5) * side / size - 0.5
    inside = ((centres >= 0) & (centres <= side - 1)).nonzero().flatten()
    assert len(inside) >= size - 4
    torch.testing.assert_close(out[..., inside[:, None], inside], reference[..., inside[:, None], inside])
    assert not torch.allclose(out, reference)  # the border rows do differ, so the comparison above is not vacuous


def test_classic_whole_image_crop_at_image_size_reproduces_the_image():
    images = torch.rand(2, 3, 16, 16, generator=gen(13))
    out = ClassicCutouts(min_size=1.0)(images, 3, 16, gen(14))
    torch.testing.assert_close(out, images.repeat(3, 1, 1, 1), atol=1e-5, rtol=0)


def test_classic_cuts_are_the_drawn_boxes():
    images = torch.rand(2, 3, 15, 22, generator=gen(15))
    scheme = ClassicCutouts(cut_pow=2.0)
    boxes = scheme.boxes(images, 4, gen(16))
    assert boxes.shape == (4, 2, 3)
    # the scheme sizes the resampling filter for the largest crop it can draw, the image's shorter side
    torch.testing.assert_close(scheme(images, 4, 10, gen(16)), crop_resize(images, boxes, 10, max_side=15))


def test_crop_resize_max_side_sets_the_filter_size_without_reading_the_boxes():
    images = torch.rand(1, 3, 20, 24, generator=gen(18), dtype=torch.float64)
    boxes = torch.tensor([[[0.0, 4.0, 8.0]], [[3.0, 1.0, 12.0]]], dtype=torch.float64)
    read = crop_resize(images, boxes, 4)                      # largest side 12: a 3 x 3 filter
    torch.testing.assert_close(crop_resize(images, boxes, 4, max_side=13.0), read)
    assert not torch.allclose(crop_resize(images, boxes, 4, max_side=16.0), read)   # a 4 x 4 filter
    with HostSyncs() as syncs:
        crop_resize(images, boxes, 4, max_side=16.0)
    assert syncs.sites == []
    for bad in (0, -1.0, math.nan, "12"):
        with pytest.raises(ClipguideError, match="max_side must be a number"):
            crop_resize(images, boxes, 4, max_side=bad)


@pytest.mark.parametrize("cut_pow", [1.0, 3.0])
def test_classic_box_sizes_and_offsets_follow_the_formula(cut_pow):
    height, width, min_size = 30, 50, 0.4
    images = torch.zeros(2, 3, height, width, dtype=torch.float64)
    x0, y0, side = ClassicCutouts(cut_pow=cut_pow, min_size=min_size).boxes(images, 2000, gen(17)).unbind(-1)
    assert side.min() >= min_size * height and side.max() <= height
    assert x0.min() >= 0 and (x0 + side).max() <= width and y0.min() >= 0 and (y0 + side).max() <= height
    # side = 30 * (0.4 + 0.6 * u ** p) with E[u ** p] = 1 / (p + 1); offsets are uniform over the free room.
    assert side.mean().item() == pytest.approx(height * (min_size + (1 - min_size) / (cut_pow + 1)), rel=0.02)
    assert (x0 / (width - side)).mean().item() == pytest.approx(0.5, abs=0.02)
    assert (y0 / (height - side)).mean().item() == pytest.approx(0.5, abs=0.02)


# --- pooled and disco -----------------------------------------------------------------------------------------------

def test_pooled_is_mean_of_average_and_max_pools():
    images = torch.rand(2, 3, 8, 12, generator=gen(18))
    blocks = images.view(2, 3, 4, 2, 4, 3)  # 4 x 4 output cells of 2 x 3 pixels: the image is squashed to a square
    expected = (blocks.mean(dim=(3, 5)) + blocks.amax(dim=(3, 5))) / 2
    out = PooledCutouts()(images, 3, 4, gen(19))
    torch.testing.assert_close(out, expected.repeat(3, 1, 1, 1))


def test_disco_overviews_are_the_edge_padded_image_alternately_flipped():
    images = torch.rand(1, 3, 6, 8, generator=gen(20))
    padded = F.pad(images, (0, 0, 1, 1), mode="replicate")[0]  # 8 x 8 square, so size 8 needs no resizing
    out = DiscoCutouts(overview=0.25)(images, 10, 8, gen(21))  # round(2.5) -> 3 overviews (halves round up)
    for k, expected in enumerate([padded, padded.flip(-1), padded]):
        torch.testing.assert_close(out[k], expected)
    for k in range(3, 10):
        assert not torch.allclose(out[k], padded) and not torch.allclose(out[k], padded.flip(-1))


def test_disco_grey_turns_inner_crops_into_luma_only():
    images = constant_images(10, 10)
    luma = COLOURS @ torch.tensor([0.299, 0.587, 0.114])
    out = DiscoCutouts(overview=0.5, grey=1.0)(images, 4, 5, gen(22)).view(4, 2, 3, 5, 5)
    for b in range(2):
        torch.testing.assert_close(out[:2, b], COLOURS[b, None, :, None, None].expand(2, 3, 5, 5))  # overviews
        torch.testing.assert_close(out[2:, b], luma[b].expand(2, 3, 5, 5))
    coloured = DiscoCutouts(overview=0.0, grey=0.0)(images, 4, 5, gen(22)).view(4, 2, 3, 5, 5)
    torch.testing.assert_close(coloured[:, 1], COLOURS[1, None, :, None, None].expand(4, 3, 5, 5))


def test_disco_grey_probability():
    images = torch.rand(1, 3, 12, 12, generator=gen(23))
    out = DiscoCutouts(overview=0.0, grey=0.3)(images, 1000, 2, gen(24))
    is_grey = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert is_grey.float().mean().item() == pytest.approx(0.3, abs=0.05)


# --- Augment --------------------------------------------------------------------------------------------------------

def test_augment_defaults_return_the_input_unchanged():
    views = torch.rand(4, 3, 10, 10, generator=gen(25))
    assert torch.equal(Augment()(views, gen(26)), views)


def test_augment_flip_one_is_an_exact_mirror():
    views = torch.rand(4, 3, 10, 12, generator=gen(27))
    assert torch.equal(Augment(flip=1.0)(views, gen(28)), views.flip(-1))


def test_augment_flip_half_flips_some_views_and_keeps_others():
    views = torch.rand(200, 3, 4, 4, generator=gen(29))
    out = Augment(flip=0.5)(views, gen(30))
    flipped = (out == views.flip(-1)).flatten(1).all(1)
    kept = (out == views).flatten(1).all(1)
    assert (flipped ^ kept).all()
    assert flipped.float().mean().item() == pytest.approx(0.5, abs=0.12)


def test_augment_shift_matches_roll_away_from_the_border():
    views = torch.rand(2, 3, 16, 20, generator=gen(31))
    augment = Augment(shift=0.5)
    params = augment.sample(views, gen(32))
    params = dataclasses.replace(params, shift=torch.tensor([[3 / 20, 0.0], [-2 / 20, 4 / 16]]))
    out = augment.apply(views, params)
    torch.testing.assert_close(out[0, :, :, 3:], torch.roll(views[0], 3, dims=-1)[:, :, 3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :, 4:, :-2], torch.roll(views[1], (4, -2), dims=(-2, -1))[:, 4:, :-2],
                               atol=1e-5, rtol=0)


def test_augment_rotate_90_degrees_is_counter_clockwise_rot90():
    views = torch.rand(2, 3, 9, 9, generator=gen(33))
    augment = Augment(rotate=90.0)
    params = dataclasses.replace(augment.sample(views, gen(34)), angle=torch.tensor([90.0, -90.0]))
    out = augment.apply(views, params)
    torch.testing.assert_close(out[0], torch.rot90(views[0], 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.rot90(views[1], -1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_augment_brightness_and_contrast_follow_their_formulas():
    views = torch.rand(3, 3, 6, 6, generator=gen(35))
    amounts = torch.tensor([-0.2, 0.0, 0.3])
    bright = Augment(brightness=0.3)
    out = bright.apply(views, dataclasses.replace(bright.sample(views, gen(36)), brightness=amounts))
    torch.testing.assert_close(out, (views + amounts[:, None, None, None]).clamp(0, 1))
    factors = torch.tensor([0.7, 1.0, 1.4])
    contrast = Augment(contrast=0.4)
    out = contrast.apply(views, dataclasses.replace(contrast.sample(views, gen(36)), contrast=factors))
    torch.testing.assert_close(out, (views * factors[:, None, None, None]).clamp(0, 1))


def test_augment_draws_lie_in_their_ranges_and_do_not_depend_on_other_ops():
    views = torch.rand(500, 3, 2, 2, generator=gen(37))
    params = Augment(**ALL_OPS).sample(views, gen(38))
    for name, low, high in [("angle", -15, 15), ("scale", 0.8, 1.2), ("brightness", -0.1, 0.1),
                            ("contrast", 0.8, 1.2), ("saturation", 0.7, 1.3), ("hue", -0.2, 0.2)]:
        value = getattr(params, name)
        assert value.min() >= low and value.max() <= high, name
        assert value.min() < low + 0.1 * (high - low) and value.max() > high - 0.1 * (high - low), name
    assert params.shift.abs().max() <= 0.1 and params.corners.abs().max() <= 0.1
    only_rotate = Augment(rotate=15.0).sample(views, gen(38))
    torch.testing.assert_close(only_rotate.angle, params.angle)
    assert torch.equal(only_rotate.scale, torch.ones(500))


def test_augment_is_deterministic_per_seed_and_independent_per_view():
    views = torch.rand(1, 3, 12, 12, generator=gen(39)).expand(4, 3, 12, 12)
    augment = Augment(**ALL_OPS, noise=0.05)
    out = augment(views, gen(40))
    assert torch.equal(out, augment(views, gen(40)))
    assert not torch.allclose(out, augment(views, gen(41)))
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(out[i], out[j])


def test_augment_noise_std_is_drawn_per_view_up_to_the_maximum():
    views = torch.full((400, 3, 16, 16), 0.5)
    stds = (Augment(noise=0.2)(views, gen(42)) - 0.5).flatten(1).std(dim=1)
    assert stds.max() <= 0.2 * 1.15 and stds.min() < 0.02 and stds.mean().item() == pytest.approx(0.1, abs=0.01)


def test_augment_without_noise_stays_in_unit_range_and_has_finite_gradients():
    views = torch.rand(8, 3, 12, 12, generator=gen(43), requires_grad=True)
    out = Augment(**ALL_OPS)(views, gen(44))
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    (out * torch.rand(out.shape, generator=gen(45))).sum().backward()
    assert views.grad.isfinite().all() and views.grad.abs().sum(dim=(1, 2, 3)).min() > 0


def test_augment_warp_gradients_match_finite_differences():
    views = torch.rand(2, 3, 7, 7, generator=gen(46), dtype=torch.float64, requires_grad=True)
    augment = Augment(flip=0.5, shift=0.1, rotate=20.0, scale=(0.8, 1.2), perspective=0.1, saturation=0.3)
    assert torch.autograd.gradcheck(lambda v: augment(v, gen(47)), (views,), fast_mode=True)


# --- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEMES)
def test_bad_call_arguments_name_the_argument(name):
    scheme, images = make_cutouts(name), torch.rand(1, 3, 8, 8)
    with pytest.raises(ClipguideError, match="cutn"):
        scheme(images, 0, 4, gen(0))
    with pytest.raises(ClipguideError, match="size"):
        scheme(images, 2, 0, gen(0))
    for bad in [torch.rand(3, 8, 8), torch.rand(1, 4, 8, 8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8)]:
        with pytest.raises(ClipguideError, match="images"):
            scheme(bad, 2, 4, gen(0))
    with pytest.raises(ClipguideError, match="generator"):
        scheme(images, 2, 4, 0)


def test_make_cutouts_errors():
    with pytest.raises(ClipguideError, match=r"'classic'.*'cutpow'.*cut_pow"):
        make_cutouts("classic", cutpow=2.0)
    with pytest.raises(UnknownNameError, match="classic, disco, pooled"):
        make_cutouts("vqgan")


@pytest.mark.parametrize("build,field", [
    (lambda: ClassicCutouts(min_size=0.0), "min_size"),
    (lambda: ClassicCutouts(cut_pow=-1.0), "cut_pow"),
    (lambda: DiscoCutouts(overview=1.5), "overview"),
    (lambda: DiscoCutouts(grey="a"), "grey"),
    (lambda: Augment(flip=2.0), "flip"),
    (lambda: Augment(scale=(1.2, 0.8)), "scale"),
    (lambda: Augment(scale=1.0), "scale"),
    (lambda: Augment(perspective=0.3), "perspective"),
    (lambda: Augment(noise=-0.1), "noise"),
    (lambda: Augment(padding_mode="wrap"), "padding_mode"),
])
def test_bad_options_name_the_field(build, field):
    with pytest.raises(ClipguideError, match=field):
        build()


def test_augment_rejects_bad_views():
    with pytest.raises(ClipguideError, match="views"):
        Augment(shift=0.1)(torch.rand(2, 1, 8, 8), gen(0))


# --- deterministic resampling (the CUDA path, checked here on the CPU against grid_sample) ----------------------------

def _grads(fn, x):
    x = x.detach().requires_grad_(True)
    out = fn(x)
    weights = torch.rand(out.shape, generator=gen(9), dtype=out.dtype)
    grad, = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


def test_deterministic_crop_resize_matches_grid_sample_values_and_gradients():
    g = gen(4)
    images = torch.rand(2, 3, 37, 41, generator=g, dtype=torch.float64)
    corners = torch.rand(5, 2, 2, generator=g, dtype=torch.float64) * 36 - 6   # some boxes reach outside
    boxes = torch.cat([corners, torch.rand(5, 2, 1, generator=g, dtype=torch.float64) * 45 + 1], -1)
    mirror = torch.rand(5, 2, generator=g) < 0.5
    for size in (7, 16, 50):   # area filter k = 6, 3 and 1
        a = _grads(lambda x: crop_resize(x, boxes, size, mirror, deterministic=False), images)
        b = _grads(lambda x: crop_resize(x, boxes, size, mirror, deterministic=True), images)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_zoom_shift_resampling_matches_the_general_warp(padding_mode):
    augment = Augment(shift=0.3, scale=(0.5, 1.7), padding_mode=padding_mode)
    views = torch.rand(6, 3, 20, 23, generator=gen(5), dtype=torch.float64)
    params = augment.sample(views, gen(6))
    a = _grads(lambda x: augment.zoom_shift(x, params, deterministic=False), views)
    b = _grads(lambda x: augment.zoom_shift(x, params, deterministic=True), views)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_resample_rejects_bad_grids_and_padding():
    images = torch.rand(2, 3, 8, 8)
    grid = torch.zeros(3, 4, 1)
    with pytest.raises(ClipguideError, match="3 x-grids and 3 y-grids for 2 images"):
        resample(images, grid, grid)
    with pytest.raises(ClipguideError, match="padding_mode must be one of"):
        resample(images, torch.zeros(2, 4, 1), torch.zeros(2, 4, 1), "wrap")
