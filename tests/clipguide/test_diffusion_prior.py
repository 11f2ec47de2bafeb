"""The diffusion_prior image loss: its value and gradient by hand, its draws from the guidance's generator, and the
shipped model cleaning a noisy picture until the oracle reads it."""
import pytest
import torch
import torch.nn.functional as F

from clipguide import CLIPGuidance, ClipguideError, guide
from clipguide.diffusion_prior import DiffusionPrior
from clipguide.generators.diffusion import DiffusionModel
from clipguide.losses import IMAGE_LOSSES
from core_clip import shapes

from .conftest import tiny_latent_model, tiny_unet


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_value_is_the_mean_squared_distance_in_the_models_units_and_gradchecks():
    # a sample-predicting model whose output layer is zero estimates x0 = 0 from any noisy copy: the loss is then
    # mean((2 * area(image) - 1)^2), the image resized to the model's 8 px
    unet, scheduler = tiny_unet("sample", sample_size=8)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    prior = DiffusionPrior(DiffusionModel(unet, scheduler), copies=3)
    images = torch.rand(2, 3, 32, 32, generator=gen(1), dtype=torch.float64)
    expected = (F.avg_pool2d(images, 4) * 2 - 1).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(prior(images, gen()), expected, rtol=1e-12, atol=0)
    narrow = DiffusionPrior(prior.model, t_range=(0.5, 0.5001))              # less than one timestep wide: t = 499
    torch.testing.assert_close(narrow(images, gen()), expected, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda x: prior(x, gen()), (images[:1, :, :8, :8].clone().requires_grad_(),))


def test_gradient_pulls_towards_the_estimate_which_carries_no_gradient():
    # in the model's units x = 2 * image - 1, loss = mean((x - sg(x0))^2) over N values, so the image's gradient is
    # 4 (x - x0) / N and loss = mean((grad * N / 4)^2); a gradient through the UNet's estimate (which depends on x
    # here) would break that identity
    unet, scheduler = tiny_unet("sample")
    prior = DiffusionPrior(DiffusionModel(unet, scheduler), t_range=(0.3, 0.6), copies=2)
    images = torch.rand(1, 3, 16, 16, generator=gen(2), requires_grad=True)
    value = prior(images, gen(5))
    value.sum().backward()
    n = images[0].numel()
    pull = images.grad * n / 4                                     # x - x0, per value
    torch.testing.assert_close(value, pull.pow(2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=0)
    assert float(pull.abs().mean()) > 0.05                         # the estimate is not the picture itself
    # the draws (timesteps and noise) come from the generator: the same seed, the same value
    assert torch.equal(prior(images, gen(5)), value) and not torch.equal(prior(images, gen(6)), value)


def test_guidance_passes_its_own_seeded_generator(perceptor):
    images = torch.rand(2, 3, 32, 32, generator=gen(3))

    def prior_term(seed, guidance=None):
        guidance = guidance or CLIPGuidance("a red circle", perceptor, cutn=2, seed=seed,
                                            regularisers={"diffusion_prior": 1.0})
        return guidance, guidance.per_image(images)["diffusion_prior"]

    guidance, first = prior_term(7)
    assert torch.equal(prior_term(7)[1], first)
    assert not torch.equal(prior_term(8)[1], first)
    guidance.reseed(7)
    assert torch.equal(prior_term(7, guidance)[1], first)


def test_the_shipped_model_cleans_a_noisy_picture_until_the_oracle_reads_it():
    # at the model's own 32 px: it sees a larger picture area-averaged, blind to what averages out within a pixel
    scene = shapes.Scene("circle", "red", "blue", "large", "center")
    clean = torch.from_numpy(shapes.render(scene, 32)).permute(2, 0, 1)[None].float() / 255
    noisy = (clean + 0.08 * torch.randn(clean.shape, generator=gen(0))).clamp(0, 1)
    assert shapes.read(noisy[0])["color"] is None                  # too noisy for a flat shape colour
    prior = IMAGE_LOSSES.get("diffusion_prior")
    assert float(prior(clean, gen())) < float(prior(noisy, gen()))
    x = noisy.clone().requires_grad_()
    optimiser = torch.optim.Adam([x], lr=0.01)
    generator = gen()
    for _ in range(30):
        optimiser.zero_grad()
        prior(x, generator).sum().backward()
        optimiser.step()
    reading = shapes.read(x.detach().clamp(0, 1)[0])
    assert (reading["color"], reading["shape"], reading["background"]) == ("red", "circle", "blue")


def test_bad_settings_and_latent_models_are_refused():
    for bad in ((0.2, 0.1), (-0.1, 0.5), (0.5, 1.5)):
        with pytest.raises(ClipguideError, match="t_range needs 0 <= low < high <= 1"):
            DiffusionPrior(t_range=bad)
    for bad in ((0.1,), (0.1, 0.2, 0.3), ("0", "1"), 0.5):
        with pytest.raises(ClipguideError, match="t_range must be two numbers"):
            DiffusionPrior(t_range=bad)
    for bad in (0, True, 1.5):
        with pytest.raises(ClipguideError, match="copies must be a positive integer"):
            DiffusionPrior(copies=bad)
    latent = DiffusionPrior(tiny_latent_model())
    with pytest.raises(ClipguideError, match="pixel-space diffusion model, got a latent one"):
        latent(torch.rand(1, 3, 16, 16), gen())
    with pytest.raises(ClipguideError, match=r"must be \[B, 3, H, W\]"):
        DiffusionPrior()(torch.rand(3, 16, 16), gen())


def test_with_the_prior_pixel_guidance_draws_a_shape_the_oracle_reads():
    # the shipped CLIP and diffusion model, the README's settings: the prior makes the square; without it the same
    # run draws the right colours and no shape the oracle can fit
    def draw(regularisers):
        result = guide("a blue square on a black background", backend="pixels", steps=300, seed=18, progress=False,
                       backend_options={"colors": 2, "palette": "shapes", "resolution": 8}, regularisers=regularisers)
        reading = shapes.read(result.tensor[0])
        return reading["color"], reading["shape"], reading["background"]

    assert draw({"border": 5, "diffusion_prior": 20}) == ("blue", "square", "black")
    assert draw({"border": 5})[1] != "square"
