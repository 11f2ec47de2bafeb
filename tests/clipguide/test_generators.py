"""Generator backends: the plugin contract, parameterisations, init images, and the clamp's gradient."""
import pytest
import torch

from clipguide import CLIPGuidance, ClipguideError, GENERATORS
from clipguide.generators import OptimisedGenerator, clamp_with_grad
from clipguide.generators.fourier import Fourier
from clipguide.generators.pixels import Pixels
from clipguide.palettes import PALETTES, parse_palette
from core_clip import shapes


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# backends whose images are decode() of parameters; sampling backends (diffusion) are tested in test_diffusion.py
OPTIMISED = [n for n in GENERATORS.names() if issubclass(GENERATORS.get(n), OptimisedGenerator)]


@pytest.mark.parametrize("name", OPTIMISED)
def test_every_optimised_generator_makes_images_in_range_and_learns(name, perceptor, backend_options):
    backend = GENERATORS.get(name)(2, 48, 40, generator=gen(), **backend_options(name))
    before = backend.decode().detach().clone()
    assert before.shape == (2, 3, 48, 40) and before.min() >= 0 and before.max() <= 1
    guidance = CLIPGuidance("a red circle", perceptor, cutn=2)
    seen = []
    out = backend.sample(guidance, 3, gen(), lambda step, losses, images: seen.append((step, losses["total"])))
    assert [s for s, _ in seen] == [1, 2, 3]
    assert out.shape == before.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, before)


@pytest.mark.parametrize("name", OPTIMISED)
def test_every_optimised_generator_is_seeded(name, backend_options):
    a, b, c = (GENERATORS.get(name)(1, 32, 32, generator=gen(s), **backend_options(name)).decode() for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["pixels", "fourier"])  # exact parameterisations; vqgan's lossy init: test_vqgan
def test_exact_generators_start_from_an_init_image(name):
    init = torch.rand(1, 3, 32, 32, generator=gen(5)) * 0.9 + 0.05
    options = {"resolution": None} if name == "pixels" else {}
    out = GENERATORS.get(name)(2, 32, 32, generator=gen(), init=init, **options).decode()
    torch.testing.assert_close(out, init.expand(2, -1, -1, -1), atol=1e-4, rtol=0)


def test_pixels_coarse_grid_is_upsampled():
    backend = Pixels(1, 64, 32, generator=gen(), resolution=8)
    assert backend.rgb.shape == (1, 3, 16, 8)
    expected = torch.nn.functional.interpolate(backend.rgb, size=(64, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(backend.decode(), expected.clamp(0, 1))


def test_pixels_init_is_area_downsampled_to_the_grid():
    init = torch.zeros(1, 3, 32, 32)
    init[..., :16, :] = 1.0
    backend = Pixels(1, 32, 32, generator=gen(), init=init, resolution=2)
    torch.testing.assert_close(backend.rgb[0, 0], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_fourier_spectrum_falls_off_as_one_over_f():
    backend = Fourier(1, 32, 32, generator=gen(), decay=1.0)
    scale = backend.scale[..., 0] / (32 * 32) ** 0.5 * 4     # without the sqrt(H * W) / 4 step-size factor
    assert scale[0, 1] == pytest.approx(1.0)                 # lowest frequency 1/32: unit scale
    assert scale[0, 0] == pytest.approx(1.0)                 # DC is treated as the lowest frequency
    assert scale[0, 4] == pytest.approx(0.25)                # 4x the frequency, a quarter of the amplitude
    assert scale[4, 3] == pytest.approx(1 / 5)               # radial: sqrt(4^2 + 3^2) = 5 steps
    assert Fourier(1, 32, 32, generator=gen(), decay=0.0).scale.eq(8).all()


def test_clamp_with_grad_lets_gradient_back_into_range():
    x = torch.tensor([-0.5, -0.5, 0.5, 1.5, 1.5], requires_grad=True)
    y = clamp_with_grad(x)
    assert torch.equal(y, x.detach().clamp(0, 1))
    # Descending the gradient moves x by -grad: allowed if it leads back into range or x is inside.
    y.backward(torch.tensor([-1.0, 1.0, 1.0, 1.0, -1.0]))
    assert x.grad.tolist() == [-1.0, 0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=0, height=8, width=8), "batch"),
    (dict(batch=1, height=0, width=8), "height"),
    (dict(batch=1, height=8, width=8, init=torch.rand(1, 3, 4, 4)), "init image"),
])
@pytest.mark.parametrize("name", GENERATORS.names())
def test_generators_reject_bad_sizes(name, kwargs, match):
    with pytest.raises(ClipguideError, match=match):
        GENERATORS.get(name)(generator=gen(), **kwargs)


def test_pixels_rejects_bad_resolution():
    with pytest.raises(ClipguideError, match="resolution"):
        Pixels(1, 8, 8, generator=gen(), resolution=0)


def test_pixels_palette_mixes_its_colours_with_crisp_regions():
    backend = Pixels(2, 32, 32, generator=gen(), colors=3, resolution=8, sharpness=50.0)
    images = backend.decode()
    palette = backend.palette.detach().clamp(0, 1)                           # [2, 3 colours, 3 channels]
    # every pixel is a convex mix of its image's palette; with a high sharpness almost all are one colour
    dist = torch.cdist(images.permute(0, 2, 3, 1).reshape(2, -1, 3), palette)  # [2, H*W, 3]
    assert (dist.min(dim=-1).values < 0.02).float().mean() > 0.9


def test_pixels_palette_init_starts_on_the_init_images_colours():
    init = torch.zeros(1, 3, 32, 32)
    init[:, 0, 8:24, 8:24] = 1.0                                              # red square on black
    out = Pixels(1, 32, 32, generator=gen(), init=init, colors=2, resolution=16, sharpness=100.0).decode()
    assert torch.allclose(out[..., 12:20, 12:20], init[..., 12:20, 12:20], atol=1e-3)
    assert torch.allclose(out[..., :4, :4], init[..., :4, :4], atol=1e-3)


def test_pixels_rejects_bad_palette():
    with pytest.raises(ClipguideError, match="colors"):
        Pixels(1, 8, 8, generator=gen(), colors=1)


SHAPES_PALETTE = torch.from_numpy(shapes.PALETTE) / 255


def only_palette_colours(images: torch.Tensor, palette: torch.Tensor) -> bool:
    # elementwise, not torch.cdist: for more than 25 rows cdist computes |x|^2 + |y|^2 - 2xy, whose rounding leaves
    # about 1e-4 between identical float32 colours on some CPUs
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 1, 3)
    return bool(((pixels - palette).abs().amax(dim=-1).min(dim=1).values < 1e-6).all())


@pytest.mark.parametrize(("spec", "expected"), [
    ("shapes", SHAPES_PALETTE),
    ("#ff0000, #00FF80", torch.tensor([[255, 0, 0], [0, 255, 128]]) / 255),
    ([(0, 0, 0), "ffffff", (0, 0, 0)], torch.tensor([[0.0, 0, 0], [1, 1, 1]])),   # repeats count once
])
def test_parse_palette(spec, expected):
    torch.testing.assert_close(parse_palette(spec), expected.float())
    assert set(PALETTES) >= {"shapes"}


@pytest.mark.parametrize(("spec", "match"), [
    ("pico", "unknown palette 'pico'; named palettes: shapes"),
    ("#ff0000,#12345", "'#12345' is not #rrggbb"),
    ([(0, 0, 256), (1, 1, 1)], r"\(0, 0, 256\) is neither"),
    ([(0, 0, 0.5), (1, 1, 1)], "is neither"),
    (["#000000"], "at least 2 distinct colours, got 1"),
])
def test_parse_palette_rejects(spec, match):
    with pytest.raises(ClipguideError, match=match):
        parse_palette(spec)


def test_fixed_palette_regions_blend_then_commit_to_palette_colours():
    backend = Pixels(3, 32, 32, generator=gen(), colors=2, palette="shapes", resolution=8)
    assert {n for n, _ in backend.named_parameters()} == {"choice", "logits"}   # no free colours to learn
    soft = backend.decode()
    assert soft.shape == (3, 3, 32, 32) and not only_palette_colours(soft, SHAPES_PALETTE)
    final = backend.finish()
    assert only_palette_colours(final, SHAPES_PALETTE)
    for image, choice in zip(final, backend.choice):
        chosen = SHAPES_PALETTE[choice.argmax(dim=-1)]                            # each region's likeliest colour
        assert {tuple(p) for p in image.flatten(1).T.tolist()} <= {tuple(c) for c in chosen.tolist()}
    # each pixel takes its likeliest region: where region 0's logit leads, the pixel is region 0's colour
    lead = backend._region_logits()[:, 0] > backend._region_logits()[:, 1]
    assert torch.equal(final.permute(0, 2, 3, 1)[lead], SHAPES_PALETTE[backend.choice[:, 0].argmax(-1)]
                       [:, None, None].expand(-1, 32, 32, -1)[lead])


def test_fixed_palette_choice_sharpens_geometrically_over_the_run():
    backend = Pixels(1, 16, 16, generator=gen(), colors=2, palette="shapes", choice_sharpness=(2.0, 50.0))
    backend.anneal(0.0)
    assert float(backend.choice_sharpness) == pytest.approx(2.0)
    backend.anneal(0.5)
    assert float(backend.choice_sharpness) == pytest.approx(10.0)
    colours = backend._colours()
    backend.anneal(1.0)
    assert float(backend.choice_sharpness) == pytest.approx(50.0)
    # sharper choice: each region's colour moves onto its likeliest palette colour
    target = SHAPES_PALETTE[backend.choice.argmax(-1)]
    assert (backend._colours() - target).norm() < (colours - target).norm()


def test_fixed_palette_without_colors_uses_every_palette_colour_as_a_region():
    backend = Pixels(2, 16, 16, generator=gen(), palette="#ff0000,#0000ff,#ffffff", resolution=4)
    assert backend.logits.shape == (2, 3, 4, 4) and backend.choice is None
    assert only_palette_colours(backend.finish(), parse_palette("#ff0000,#0000ff,#ffffff"))


def test_fixed_palette_init_snaps_the_init_images_colours_to_the_palette():
    init = torch.zeros(1, 3, 32, 32)
    init[:] = torch.tensor([25, 25, 15]).view(3, 1, 1) / 255                  # near ShapesWorld black
    init[:, :, 8:24, 8:24] = torch.tensor([210, 40, 30]).view(3, 1, 1) / 255   # near ShapesWorld red
    expected = torch.zeros_like(init)
    expected[:] = SHAPES_PALETTE[7].view(3, 1, 1)
    expected[:, :, 8:24, 8:24] = SHAPES_PALETTE[0].view(3, 1, 1)
    for colors in (2, None):
        out = Pixels(1, 32, 32, generator=gen(), init=init, colors=colors, palette="shapes", resolution=16).finish()
        assert torch.equal(out, expected)


class _TowardsImage:
    """A stand-in for CLIPGuidance: the mean squared error of each image to ``target``."""

    def __init__(self, target: torch.Tensor):
        self.target = target

    def per_image(self, images: torch.Tensor) -> dict:
        return {"total": (images - self.target).square().mean(dim=(1, 2, 3))}

    def summary(self, terms: dict) -> dict:
        return {}

    def done(self) -> bool:
        return False


def test_a_fixed_palette_init_is_a_start_the_loss_can_recolour():
    red, green, black = (SHAPES_PALETTE[list(shapes.COLORS).index(c)] for c in ("red", "green", "black"))
    init = black.view(1, 3, 1, 1).repeat(1, 1, 32, 32)
    init[:, :, 8:24, 8:24] = red.view(3, 1, 1)
    backend = Pixels(1, 32, 32, generator=gen(), init=init, colors=2, palette="shapes", resolution=16)
    start = backend.decode()
    # the start leans on the init's colours (the likeliest colour of each region is its snapped one) ...
    assert torch.equal(backend.finish(), init)
    assert (start - init).abs().max() < 0.25
    # ... but a loss that wants the square green gets it: the choice is not saturated
    target = init.clone()
    target[:, :, 8:24, 8:24] = green.view(3, 1, 1)
    out = backend.sample(_TowardsImage(target), steps=100, generator=gen())
    assert torch.equal(out, target)


def test_guide_with_a_fixed_palette_returns_palette_colours_only(perceptor):
    from clipguide.guide import guide

    result = guide("a red circle", clip=perceptor, steps=4, cutn=2, size=32, regularisers={"border": 1.0},
                   backend_options={"colors": 2, "palette": "shapes", "resolution": 8})
    assert only_palette_colours(result.tensor, SHAPES_PALETTE)
