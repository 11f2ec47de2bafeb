"""Generator backends: the plugin contract, parameterisations, init images, and the clamp's gradient."""
import pytest
import torch

from clipguide import CLIPGuidance, ClipguideError, GENERATORS
from clipguide.generators import OptimisedGenerator, clamp_with_grad
from clipguide.generators.fourier import Fourier
from clipguide.generators.pixels import Pixels


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
