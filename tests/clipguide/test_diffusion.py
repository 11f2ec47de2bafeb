"""Diffusion guidance: x0 and correction formulas against diffusers, gradients against finite differences, stock
pipelines through attach(), every scheduler through guide(), and a tiny latent CFG pipeline."""
import json
import math

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)

from clipguide import CLIPGuidance, ClipguideError, GuidanceError, guide
from clipguide.cutouts import Augment
from clipguide.diffusion import (DiffusionGuidanceConfig, GuidedForward, alpha_bar, attach, decoder_for,
                                 output_correction, predict_x0, renoise)
from clipguide.generators.diffusion import SCHEDULERS, DiffusionGenerator, DiffusionModel, _x0_images, load_diffusion

from tests.helpers import HostSyncs

from .conftest import tiny_latent_model, tiny_unet

PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_refused(make, option, values, match):
    """``make(option=value)`` raises ClipguideError matching ``match`` for every value."""
    for value in values:
        with pytest.raises(ClipguideError, match=match):
            make(**{option: value})


class Quadratic:
    """A deterministic stand-in for CLIPGuidance: per-image squared distance to a fixed target image."""

    def __init__(self, target):
        self.target = target

    def per_image(self, images):
        return {"total": (images - self.target).pow(2).sum(dim=(1, 2, 3))}

    def summary(self, terms):
        return {"total": float(terms["total"].mean())}


# ------------------------------------------------------------------------------------------------ formulas

@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
def test_x0_matches_the_schedulers_pred_original_sample(scheduler_cls, prediction):
    scheduler = scheduler_cls(prediction_type=prediction, clip_sample=False)
    scheduler.set_timesteps(50)
    x, out = torch.randn(2, 3, 8, 8, generator=gen(1)), torch.randn(2, 3, 8, 8, generator=gen(2))
    for t in scheduler.timesteps[[0, 17, 49]]:
        ref = scheduler.step(out, t, x).pred_original_sample
        ours = predict_x0(out, x, alpha_bar(scheduler.alphas_cumprod, t, 2), prediction)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_x0_in_the_unet_frame_matches_euler_with_fractional_timesteps(prediction):
    scheduler = EulerDiscreteScheduler(prediction_type=prediction)
    scheduler.set_timesteps(7)
    assert any(float(t) != int(t) for t in scheduler.timesteps)   # interpolated noise levels are exercised
    out = torch.randn(1, 3, 8, 8, generator=gen(2))
    for t in scheduler.timesteps[:5]:
        x_sigma = torch.randn(1, 3, 8, 8, generator=gen(int(t))) * scheduler.init_noise_sigma
        x_in = scheduler.scale_model_input(x_sigma, t)      # what the UNet sees (variance-preserving)
        ref = scheduler.step(out, t, x_sigma).pred_original_sample
        scheduler._step_index = None                        # step() advanced it; look the next t up afresh
        ours = predict_x0(out, x_in, alpha_bar(scheduler.alphas_cumprod, t, 1), prediction)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_correction_moves_x0_by_the_same_step(prediction):
    a = torch.tensor([0.3, 0.8]).view(2, 1, 1, 1)
    x, out, g = (torch.randn(2, 3, 4, 4, generator=gen(s)) for s in (1, 2, 3))
    moved = predict_x0(out + output_correction(g, a, prediction), x, a, prediction) - predict_x0(out, x, a, prediction)
    torch.testing.assert_close(moved, (1 - a) / a.sqrt() * g, rtol=1e-5, atol=1e-5)


def test_alpha_bar_reads_the_table_and_interpolates_in_sigma():
    table = DDPMScheduler().alphas_cumprod
    torch.testing.assert_close(alpha_bar(table, 10, 3).flatten(), table[10].expand(3))
    sigma = lambda a: ((1 - a) / a).sqrt()
    mid = alpha_bar(table, torch.tensor([10.5]), 1).flatten()[0]
    torch.testing.assert_close(sigma(mid), (sigma(table[10]) + sigma(table[11])) / 2)


# ------------------------------------------------------------------------------------------------ the wrapper

def guided_call(through_unet, target, x, t=400, scale=1.0, prediction="epsilon", decode=decoder_for(None)):
    unet, scheduler = tiny_unet(prediction)
    config = DiffusionGuidanceConfig(scale=scale, grad_clamp=None, x0_clamp=None, through_unet=through_unet,
                                     end=1.0)   # every timestep guided
    wrapper = GuidedForward(unet.forward, scheduler, Quadratic(target), decode, config)
    with torch.no_grad():
        plain = unet(x, t).sample
        guided = wrapper(x, t).sample
    return unet, scheduler, plain, guided


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_guided_gradient_matches_finite_differences_through_the_unet(prediction):
    x = torch.rand(1, 3, 16, 16, generator=gen(1)) * 0.6 - 0.3
    target = torch.rand(1, 3, 16, 16, generator=gen(2))
    t = 300
    decode = lambda x0: (x0 + 1) / 2   # without the clamp, whose gradient deliberately differs outside [0, 1]
    unet, scheduler, plain, guided = guided_call(True, target, x, t, prediction=prediction, decode=decode)
    a = alpha_bar(scheduler.alphas_cumprod, t, 1)
    # undo the correction: delta = output_correction(-grad, a) is linear in grad
    grad = -(guided - plain) / output_correction(torch.ones_like(x), a, prediction)

    unet64 = unet.double()

    def loss(x_t):   # in float64, so that a small step h resolves the directional derivative
        with torch.no_grad():
            images = decode(predict_x0(unet64(x_t, t).sample, x_t, a.double(), prediction))
        return (images - target.double()).pow(2).sum()

    for seed in range(3):
        v = torch.randn(x.shape, generator=gen(10 + seed), dtype=torch.float64)
        h = 1e-4
        fd = (loss(x.double() + h * v) - loss(x.double() - h * v)) / (2 * h)
        assert float((grad.double() * v).sum()) == pytest.approx(float(fd), rel=1e-3, abs=1e-4)


def test_cheap_gradient_holds_the_output_fixed():
    x = torch.rand(1, 3, 16, 16, generator=gen(1)) * 0.6 - 0.3
    target = torch.rand(1, 3, 16, 16, generator=gen(2))
    unet, scheduler, plain, guided = guided_call(False, target, x, 300, decode=lambda x0: (x0 + 1) / 2)
    a = alpha_bar(scheduler.alphas_cumprod, 300, 1)
    x0 = predict_x0(plain, x, a, "epsilon").requires_grad_()
    g0, = torch.autograd.grad(((x0 + 1) / 2 - target).pow(2).sum(), x0)
    torch.testing.assert_close(guided - plain, output_correction(-g0 / a.sqrt(), a, "epsilon"), rtol=1e-4, atol=1e-6)


def test_decode_scale_guides_on_an_area_averaged_x0():
    x = torch.rand(1, 3, 16, 16, generator=gen(1)) * 0.6 - 0.3
    target = torch.rand(1, 3, 8, 8, generator=gen(2))
    unet, scheduler = tiny_unet()
    config = DiffusionGuidanceConfig(scale=1.0, grad_clamp=None, x0_clamp=None, through_unet=False, end=1.0,
                                     decode_scale=0.5)
    decode = lambda x0: (x0 + 1) / 2
    wrapper = GuidedForward(unet.forward, scheduler, Quadratic(target), decode, config)
    with torch.no_grad():
        plain, guided = unet(x, 300).sample, wrapper(x, 300).sample
    assert wrapper.last_images.shape == (1, 3, 8, 8)
    # by hand: x0, each 2 x 2 block averaged, decoded, its loss differentiated back to every x0 pixel
    a = alpha_bar(scheduler.alphas_cumprod, 300, 1)
    x0 = predict_x0(plain, x, a, "epsilon").requires_grad_()
    blocks = x0.reshape(1, 3, 8, 2, 8, 2).mean(dim=(3, 5))
    g0, = torch.autograd.grad((decode(blocks) - target).pow(2).sum(), x0)
    assert (g0 != 0).all()
    torch.testing.assert_close(guided - plain, output_correction(-g0 / a.sqrt(), a, "epsilon"), rtol=1e-4, atol=1e-6)


def test_decode_scale_is_checked_and_one_decodes_at_full_size():
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ClipguideError, match="decode_scale must be in"):
            DiffusionGuidanceConfig(decode_scale=bad)
    x = torch.rand(1, 3, 16, 16, generator=gen(1))
    unet, scheduler = tiny_unet()
    wrapper = GuidedForward(unet.forward, scheduler, Quadratic(torch.zeros(1, 3, 16, 16)), decoder_for(None),
                            DiffusionGuidanceConfig(end=1.0, decode_scale=1.0))
    with torch.no_grad():
        wrapper(x, 300)
    assert wrapper.last_images.shape == (1, 3, 16, 16)


def test_grad_clamp_bounds_the_rms_of_the_step():
    x = torch.rand(2, 3, 16, 16, generator=gen(1))
    unet, scheduler = tiny_unet()
    config = DiffusionGuidanceConfig(scale=1e6, grad_clamp=0.01, x0_clamp=None)
    wrapper = GuidedForward(unet.forward, scheduler, Quadratic(torch.zeros(1, 3, 16, 16)), decoder_for(None), config)
    with torch.no_grad():
        delta = wrapper(x, 500).sample - unet(x, 500).sample
    a = alpha_bar(scheduler.alphas_cumprod, 500, 2)
    g = delta / output_correction(torch.ones_like(x), a, "epsilon")
    torch.testing.assert_close(g.pow(2).mean(dim=(1, 2, 3)).sqrt(), torch.full((2,), 0.01))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_x0_clamp_bounds_the_rms_of_the_x0_move_and_leaves_small_moves_alone(prediction):
    x = torch.rand(2, 3, 16, 16, generator=gen(1))
    unet, scheduler = tiny_unet(prediction)
    quadratic = Quadratic(torch.zeros(1, 3, 16, 16))

    def x0_move(scale, t, x0_clamp):
        config = DiffusionGuidanceConfig(scale=scale, x0_clamp=x0_clamp)
        wrapper = GuidedForward(unet.forward, scheduler, quadratic, decoder_for(None), config)
        with torch.no_grad():
            plain = unet(x, t).sample
            a = alpha_bar(scheduler.alphas_cumprod, t, 2)
            return predict_x0(wrapper(x, t).sample, x, a, prediction) - predict_x0(plain, x, a, prediction)

    rms = lambda d: d.pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms(x0_move(1e4, 980, 0.05)), torch.full((2,), 0.05))
    free = x0_move(1e4, 980, None)
    assert (rms(free) > 1).all()   # unclamped, the noisiest step moves x0 far: the case the clamp is for
    clamped = x0_move(1e4, 980, 0.05)
    cosine = torch.nn.functional.cosine_similarity(clamped.flatten(1), free.flatten(1))
    assert (cosine > 0.9999).all()   # the same direction, shorter
    small = x0_move(1e-3, 100, None)
    assert (rms(small) < 0.05).all()
    torch.testing.assert_close(x0_move(1e-3, 100, 0.05), small)
    for value in (0, -1.0):
        with pytest.raises(ClipguideError, match="x0_clamp must be positive or None"):
            DiffusionGuidanceConfig(x0_clamp=value)


def test_classifier_free_guidance_gets_the_same_correction_on_both_halves():
    unet, scheduler = tiny_unet()
    target = torch.rand(1, 3, 16, 16, generator=gen(2))
    config = DiffusionGuidanceConfig(scale=10.0, grad_clamp=None, x0_clamp=None)
    w = 3.0
    wrapper = GuidedForward(unet.forward, scheduler, Quadratic(target), decoder_for(None), config, lambda: w)
    latents = torch.rand(1, 3, 16, 16, generator=gen(1))
    # two different "conditions": the doubled batch of a CFG pipeline, made distinct by a shifted uncond input
    x = torch.cat([latents, latents])
    with torch.no_grad():
        plain = unet(x, 500).sample
        guided = wrapper(x, 500).sample
    delta_u, delta_c = (guided - plain).chunk(2)
    torch.testing.assert_close(delta_u, delta_c)
    assert delta_u.abs().max() > 0
    a = alpha_bar(scheduler.alphas_cumprod, 500, 1)
    combined = plain[:1] + w * (plain[1:] - plain[:1])
    torch.testing.assert_close(wrapper.last_images, ((predict_x0(combined, latents, a, "epsilon") + 1) / 2).clamp(0, 1))


@pytest.mark.parametrize("through_unet", [True, False])
def test_one_guided_step_lowers_the_clip_loss_of_x0(perceptor, through_unet):
    unet, scheduler = tiny_unet()
    x = torch.randn(2, 3, 16, 16, generator=gen(3))
    t = 500
    a = alpha_bar(scheduler.alphas_cumprod, t, 2)
    make = lambda: CLIPGuidance("a red circle on a blue background", perceptor, cutn=4, seed=7)
    config = DiffusionGuidanceConfig(scale=20.0, grad_clamp=None, through_unet=through_unet)
    wrapper = GuidedForward(unet.forward, scheduler, make(), decoder_for(None), config)
    with torch.no_grad():
        plain, guided = unet(x, t).sample, wrapper(x, t).sample
        # fresh guidance objects with the same seed draw the same cutouts as the guided call did
        before = make().loss((predict_x0(plain, x, a, "epsilon") + 1).div(2).clamp(0, 1))
        after = make().loss((predict_x0(guided, x, a, "epsilon") + 1).div(2).clamp(0, 1))
    assert after < before


@pytest.mark.parametrize("cutouts", ["classic", "disco"])
def test_a_guided_call_syncs_only_to_read_the_timestep_and_check_the_gradient(perceptor, cutouts):
    # On a GPU each sync makes the host wait for all queued work. One after the UNet call is queued would leave the
    # GPU idle while the host launches the cutouts, CLIP, loss and backward: the two here come before and after.
    unet, scheduler = tiny_unet()
    guidance = CLIPGuidance("a red circle on a blue background:1:0.1 | blurry:-0.5", perceptor, cutn=4,
                            cutouts=cutouts, augment=Augment(shift=0.05, scale=(0.9, 1.05), rotate=10.0,
                                                              perspective=0.1, noise=0.03))
    wrapper = GuidedForward(unet.forward, scheduler, guidance, decoder_for(None), DiffusionGuidanceConfig(end=1.0))
    x, t = torch.randn(2, 3, 16, 16, generator=gen(3)), torch.tensor(500)   # samplers pass tensor timesteps
    with torch.no_grad():
        wrapper(x, t)   # the first call makes the constants it reuses
        with HostSyncs() as syncs:
            wrapper(x, t)
    assert syncs.sites == [("diffusion.py", "_first_value"), ("diffusion.py", "steer")]   # window, gradient


@pytest.mark.parametrize("timestep", [torch.tensor([500, 500]), 500])
def test_a_non_finite_gradient_is_an_error_naming_the_timestep(perceptor, timestep):
    unet, scheduler = tiny_unet()
    nan_decode = lambda x0: decoder_for(None)(x0) * math.nan   # every pixel NaN: so is the gradient
    wrapper = GuidedForward(unet.forward, scheduler, CLIPGuidance("a red circle", perceptor, cutn=2), nan_decode,
                            DiffusionGuidanceConfig(end=1.0))
    with torch.no_grad(), pytest.raises(GuidanceError, match="not finite at timestep 500$"):
        wrapper(torch.randn(2, 3, 16, 16, generator=gen(3)), timestep)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_the_sampling_loop_leaves_the_reads_to_the_scheduler(perceptor, scheduler):
    # The loop decides from its timesteps read back once before it starts, and keeps alpha_bar and the polish's
    # timestep on the device; what syncs is each guided call's gradient check and diffusers' scheduler (DDPM's and
    # DDIM's steps index their host tables by the device timestep), which an unguided step pays too.
    model = tiny_latent_model()
    guidance = CLIPGuidance("a red circle", perceptor, cutn=2)
    make = lambda scale: DiffusionGenerator(1, 16, 16, generator=gen(), model=model, scheduler=scheduler,
                                            scale=scale, end=1.0, recurrence=2, recurrence_below=1.0, candidates=1,
                                            polish=2)
    for scale, guided_calls in ((0.0, 0), (100.0, 2 * 3 + 1)):   # every step but the last taken twice
        make(scale).sample(guidance, 4, gen())
        sampler = make(scale)
        with HostSyncs() as syncs:
            sampler.sample(guidance, 4, gen())
        ours = [site for site in syncs.sites if not site[0].startswith("scheduling_")]
        assert ours == [("diffusion.py", "steer")] * guided_calls and len(syncs.sites) > len(ours)


def test_guidance_window_skips_steps_outside_it():
    unet, scheduler = tiny_unet()
    config = DiffusionGuidanceConfig(scale=10.0, start=0.5, end=0.9)
    wrapper = GuidedForward(unet.forward, scheduler, Quadratic(torch.zeros(1, 3, 16, 16)), decoder_for(None), config)
    assert [wrapper.guided_at(t) for t in (999, 600, 400, 101, 50)] == [False, False, True, True, False]


# ------------------------------------------------------------------------------------------------ attach

@pytest.mark.parametrize("pipeline_cls", [DDPMPipeline, DDIMPipeline])
def test_attach_at_scale_zero_is_bit_identical_and_detach_restores(pipeline_cls, perceptor):
    unet, scheduler = tiny_unet()
    if pipeline_cls is DDIMPipeline:
        scheduler = DDIMScheduler.from_config(scheduler.config)
    pipe = pipeline_cls(unet=unet, scheduler=scheduler)
    run = lambda: pipe(generator=gen(4), num_inference_steps=4, output_type="np").images
    reference = run()
    guidance = CLIPGuidance("a red circle", perceptor, cutn=2)
    with attach(pipe, guidance, scale=0.0):
        assert np.array_equal(run(), reference)
    handle = attach(pipe, guidance, scale=200.0, grad_clamp=None)
    steered = run()
    assert handle.guided.last_images is not None and not np.array_equal(steered, reference)
    handle.detach()
    assert "forward" not in pipe.unet.__dict__ and np.array_equal(run(), reference)


def test_attach_refuses_a_second_handle_and_unusable_schedulers(perceptor):
    unet, scheduler = tiny_unet()
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    guidance = CLIPGuidance("a red circle", perceptor, cutn=2)
    with attach(pipe, guidance):
        with pytest.raises(ClipguideError, match="already guided"):
            attach(pipe, guidance)
    with pytest.raises(ClipguideError, match="alphas_cumprod"):
        attach(DDPMPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler()), guidance)
    with pytest.raises(ClipguideError, match="unknown prediction type 'flow'"):
        attach(DDPMPipeline(unet=unet, scheduler=DDPMScheduler(prediction_type="flow")), guidance)
    with pytest.raises(ClipguideError, match="start <= end"):
        attach(pipe, guidance, start=0.8, end=0.2)


def tiny_tokenizer(folder):
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A StableDiffusionPipeline from small random components (no download): 16 px images, 8 px latents."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=514, max_position_embeddings=77,
                                        bos_token_id=512, eos_token_id=513, pad_token_id=513))
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(tmp_path_factory.mktemp("tok")),
                                   unet=unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def test_latent_pipeline_with_cfg_runs_guided_through_attach(tiny_sd, perceptor):
    run = lambda: tiny_sd("a red circle", num_inference_steps=3, height=16, width=16, guidance_scale=7.5,
                          generator=gen(0), output_type="np").images
    reference = run()
    guidance = CLIPGuidance("a red circle on a blue background", perceptor, cutn=2)
    with attach(tiny_sd, guidance, scale=0.0):
        assert np.array_equal(run(), reference)
    with attach(tiny_sd, guidance, scale=500.0, grad_clamp=None, checkpointing=True) as handle:
        steered = run()
        assert tiny_sd.unet.is_gradient_checkpointing and tiny_sd.vae.is_gradient_checkpointing
    assert not tiny_sd.unet.is_gradient_checkpointing
    assert handle.guided.last_images.shape == (1, 3, 16, 16)    # x0 of the CFG-combined prediction, decoded
    assert np.isfinite(steered).all() and not np.array_equal(steered, reference)
    with attach(tiny_sd, guidance, scale=500.0, decode_scale=0.5) as handle:   # 4 x 4 latents into the decoder
        cheaper = run()
    assert handle.guided.last_images.shape == (1, 3, 8, 8)
    assert np.isfinite(cheaper).all() and not np.array_equal(cheaper, reference)


# ------------------------------------------------------------------------------------------------ guide()

def run(perceptor, path, **options):
    steps = options.pop("steps", 4)
    size = options.pop("size", 16)
    return guide("a red circle on a blue background", backend="diffusion", clip=perceptor, steps=steps, size=size,
                 cutn=2, seed=options.pop("seed", 0), batch=options.pop("batch", 1),
                 init_image=options.pop("init_image", None), backend_options={"model": str(path), **options})


@pytest.mark.parametrize("scheduler", SCHEDULERS.names())
def test_every_scheduler_runs_guided(perceptor, tiny_diffusion_path, scheduler):
    plain = run(perceptor, tiny_diffusion_path, scheduler=scheduler, scale=0.0)
    steered = run(perceptor, tiny_diffusion_path, scheduler=scheduler, scale=500.0, grad_clamp=None, end=1.0)
    assert steered.tensor.shape == (1, 3, 16, 16) and torch.isfinite(steered.tensor).all()
    assert not torch.equal(plain.tensor, steered.tensor)
    assert len(steered.losses) == 4 and all(math.isfinite(l["total"]) for l in steered.losses)


def test_guided_sampling_is_seeded_and_batch_items_follow_their_own_seeds(perceptor, tiny_diffusion_path):
    a, b = (run(perceptor, tiny_diffusion_path, scale=300.0) for _ in range(2))
    assert torch.equal(a.tensor, b.tensor)
    pair = run(perceptor, tiny_diffusion_path, scale=0.0, seed=5, batch=2)
    single = run(perceptor, tiny_diffusion_path, scale=0.0, seed=6)
    torch.testing.assert_close(pair.tensor[1:], single.tensor)


def test_renoise_draws_the_forward_processs_marginal():
    # x_s drawn from q(x_s | x0) and jumped back to t must be distributed as q(x_t | x0) = N(sqrt(a_t) x0, 1 - a_t)
    a_t, a_s = torch.tensor(0.3), torch.tensor(0.8)
    x0 = torch.linspace(-1, 1, 5).view(5, 1, 1, 1)
    x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * torch.randn(5, 1, 200, 200, generator=gen(1))
    x_t = renoise(x_s, a_t, a_s, torch.randn(x_s.shape, generator=gen(2)))
    torch.testing.assert_close(x_t.mean(dim=(1, 2, 3)), a_t.sqrt() * x0.flatten(), atol=0.01, rtol=0)
    torch.testing.assert_close(x_t.var(dim=(1, 2, 3)), (1 - a_t).expand(5), atol=0.01, rtol=0)


def test_recurrence_retakes_the_low_noise_steps_and_keeps_per_image_seeds(perceptor, tiny_diffusion_path):
    model = load_diffusion(str(tiny_diffusion_path))
    calls = []
    forward = model.unet.forward
    model.unet.forward = lambda x, t, *a, **k: calls.append(int(t)) or forward(x, t, *a, **k)
    steps, below = 10, 0.35
    sampler = DiffusionGenerator(1, 16, 16, generator=gen(), model=model, scale=0.0, recurrence=3,
                                 recurrence_below=below, polish=0)
    sampler.sample(None, steps, gen())
    timesteps = sampler.model.scheduler.timesteps.tolist()
    low = [t for t in timesteps[:-1] if t < below * 1000]
    assert low and len(calls) == steps + 2 * len(low)
    assert all(calls.count(t) == (3 if t in low else 1) for t in timesteps)
    # guided steps recur too: here the first half of the trajectory, where guidance is on (end 0.5)
    calls.clear()
    sampler = DiffusionGenerator(1, 16, 16, generator=gen(), model=model, scale=100.0, end=0.5, recurrence=3,
                                 recurrence_below=below, polish=0, screen=1)   # screened steps are unguided
    sampler.sample(CLIPGuidance("a red circle", perceptor=perceptor, cutn=2), steps, gen())
    guided = [t for t in timesteps if 1 - t / 999 <= 0.5]
    assert guided and not set(guided) & set(low)
    assert all(calls.count(t) == (3 if t in low + guided else 1) for t in timesteps)
    model.unet.forward = forward
    pair = run(perceptor, tiny_diffusion_path, steps=steps, scale=0.0, seed=5, batch=2, recurrence=3)
    single = run(perceptor, tiny_diffusion_path, steps=steps, scale=0.0, seed=6, recurrence=3)
    plain = run(perceptor, tiny_diffusion_path, steps=steps, scale=0.0, seed=6, recurrence=1)
    torch.testing.assert_close(pair.tensor[1:], single.tensor)
    assert not torch.equal(single.tensor, plain.tensor)


def test_polish_averages_the_models_x0_estimates_of_noisy_copies_of_the_sample(tiny_diffusion_path):
    model = load_diffusion(str(tiny_diffusion_path))
    calls = []
    forward = model.unet.forward

    def spy(x, t, *args, **kwargs):
        out = forward(x, t, *args, **kwargs)
        calls.append((int(t), x, out.sample))
        return out

    model.unet.forward = spy
    make = lambda **o: DiffusionGenerator(2, 16, 16, generator=gen(3), model=model, scale=0.0, **o)
    plain = make(polish=0).sample(None, 5, gen(3))
    assert len(calls) == 5   # timesteps 800, 600, 400, 200, 0: none recurs (the last never does), no polish
    calls.clear()
    polished = make(polish=4, polish_at=0.3).sample(None, 5, gen(3))
    model.unet.forward = forward
    copies = calls[-4:]
    assert [t for t, _, _ in copies] == [300] * 4 and all(t != 300 for t, _, _ in calls[:-4])
    a = alpha_bar(model.scheduler.alphas_cumprod, 300, 2)
    x0 = plain * 2 - 1   # the unpolished sample in the model's [-1, 1] frame (the trajectory is the same)
    noises = [(x_t - a.sqrt() * x0) / (1 - a).sqrt() for _, x_t, _ in copies]
    for i, n in enumerate(noises):   # each copy is the sample noised along q(x_t | x0), with its own draw
        assert abs(float(n.mean())) < 0.1 and abs(float(n.std()) - 1) < 0.1
        assert all(not torch.allclose(n, m) for m in noises[i + 1:])
    mean = sum(predict_x0(out, x_t, a, "epsilon") for _, x_t, out in copies) / 4
    torch.testing.assert_close(polished, ((mean + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    assert not torch.allclose(polished, plain, atol=1e-3)


def test_polish_options_are_checked(tiny_diffusion_path):
    make = lambda **o: DiffusionGenerator(1, 16, 16, generator=gen(), model=str(tiny_diffusion_path), **o)
    assert (make().polish, make().polish_at) == (16, 0.16)
    assert_refused(make, "polish", (-1, 2.5, True), "polish must be a non-negative integer")
    assert_refused(make, "polish_at", (0, 1, "low"), r"polish_at must be a number in \(0, 1\)")


def test_candidates_go_on_with_each_images_lowest_loss_candidate(tiny_diffusion_path):
    model = load_diffusion(str(tiny_diffusion_path))
    target = torch.full((1, 3, 16, 16), 0.8)
    steps, select = 6, 3   # select_at 0.5 of 6 steps: candidates are compared after step index 3
    options = dict(model=model, scale=50.0, end=1.0, select_at=0.5, polish=0, recurrence=1, screen=1, finalists=1)

    def sample(batch, seed, candidates):
        rows, previews, losses = [], [], {}
        forward = model.unet.forward
        model.unet.forward = lambda x, t, *a, **k: rows.append(len(x)) or forward(x, t, *a, **k)
        try:
            image = DiffusionGenerator(batch, 16, 16, generator=gen(seed), candidates=candidates, **options).sample(
                Quadratic(target), steps, gen(seed),
                callback=lambda step, l, im: previews.append(im.shape) or losses.setdefault(step, l["total"]))
        finally:
            model.unet.forward = forward
        return image, rows, previews, losses[select + 1]

    # candidate j of image 0 is what its j-th seed draws alone; its loss at the selection step decides
    seeds = [5] + torch.randint(2**32, (2,), generator=gen(5)).tolist()
    alone = [sample(1, seed, 1) for seed in seeds]
    image, rows, previews, _ = sample(1, 5, 3)
    best = min(range(3), key=lambda j: alone[j][3])
    assert best != 0   # so that keeping candidate 0 would fail here
    close = dict(atol=1e-3, rtol=0)   # a batch of 3 and a batch of 1 round differently inside the UNet
    torch.testing.assert_close(image, alone[best][0], **close)
    assert all(not torch.allclose(image, alone[j][0], atol=0.1) for j in range(3) if j != best)
    assert rows == [3] * (select + 1) + [1] * (steps - select - 1)
    assert previews == [(1, 3, 16, 16)] * steps
    # an image's candidates depend on its own seed alone
    pair = sample(2, 5, 3)[0]
    torch.testing.assert_close(pair[:1], image, **close)
    torch.testing.assert_close(pair[1:], sample(1, 6, 3)[0], **close)


class Recording(Quadratic):
    """Quadratic that keeps the images of its last call."""

    def per_image(self, images):
        self.last = images.clone()
        return super().per_image(images)


def test_finalists_go_on_to_the_end_and_the_one_whose_picture_has_the_lowest_loss_is_returned(tiny_diffusion_path):
    model = load_diffusion(str(tiny_diffusion_path))
    steps, select = 6, 3
    options = dict(model=model, scale=50.0, end=1.0, select_at=0.5, polish=0, recurrence=1, screen=1, candidates=3)
    rows = []
    forward = model.unet.forward
    model.unet.forward = lambda x, t, *a, **k: rows.append(len(x)) or forward(x, t, *a, **k)
    try:
        pictures = {}
        for finalists in (1, 2, 3):
            guidance = Recording(torch.full((1, 3, 16, 16), 0.8))
            image = DiffusionGenerator(1, 16, 16, generator=gen(5), finalists=finalists, **options).sample(
                guidance, steps, gen(5))
            pictures[finalists] = image, guidance.last
    finally:
        model.unet.forward = forward
    # 3 candidates until the selection, then the finalists side by side to the end (for finalists 1, 2, 3)
    assert rows == sum(([3] * (select + 1) + [n] * (steps - select - 1) for n in (1, 2, 3)), [])
    image, finals = pictures[3]   # the last call judged all three finished pictures
    assert finals.shape == (3, 3, 16, 16)
    losses = (finals - 0.8).pow(2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(image, finals[losses.argmin()][None], atol=0, rtol=0)
    # finalist 0 is the candidate that finalists=1 keeps (best first at the selection); here the end judges otherwise
    close = dict(atol=1e-3, rtol=0)   # batches of different sizes round differently inside the UNet
    torch.testing.assert_close(finals[:1], pictures[1][0], **close)
    assert losses.argmin() != 0
    torch.testing.assert_close(pictures[2][1], finals[:2], **close)   # the two best at the selection, in order


def test_finalists_default_to_two_and_are_checked(tiny_diffusion_path):
    make = lambda **o: DiffusionGenerator(1, 16, 16, generator=gen(), model=str(tiny_diffusion_path), **o)
    assert make().finalists == 2 and make(candidates=1).finalists == 1 and make(scale=0.0).finalists == 1
    assert make(candidates=3, finalists=3).finalists == 3
    with pytest.raises(ClipguideError, match="finalists 5 must be at most candidates 4"):
        make(finalists=5)
    assert_refused(make, "finalists", (0, 1.5, True), "finalists must be a positive integer")


def test_screening_keeps_each_images_lowest_loss_candidates_best_first():
    unet, scheduler = tiny_unet("sample")   # x0 is the output itself
    guided = GuidedForward(unet.forward, scheduler, Quadratic(torch.zeros(1, 3, 4, 4)), decoder_for(None),
                           DiffusionGuidanceConfig())
    values = torch.tensor([0.5, -0.9, 0.1, -0.5, -0.2, 0.9, -1.0, 0.0])   # images (v + 1) / 2: losses rank as below
    out = values.view(8, 1, 1, 1).expand(8, 3, 4, 4)
    images = _x0_images(guided, out, torch.zeros_like(out), 500, decoder_for(None))
    rows = DiffusionGenerator._judged_rows(guided.guidance, images, 4, 2)
    assert rows.tolist() == [1, 3, 6, 4]


def test_screening_samples_unguided_then_goes_on_with_the_kept_candidates(tiny_diffusion_path):
    model = load_diffusion(str(tiny_diffusion_path))
    target = torch.full((1, 3, 16, 16), 0.8)
    options = dict(model=model, scale=50.0, end=1.0, candidates=2, screen=6, screen_at=0.2, select_at=0.5,
                   finalists=1, polish=0, recurrence=1)
    calls, previews = [], []
    forward = model.unet.forward
    model.unet.forward = lambda x, t, *a, **k: calls.append((len(x), x.requires_grad)) or forward(x, t, *a, **k)
    try:
        sample = lambda batch, seed: DiffusionGenerator(batch, 16, 16, generator=gen(seed), **options).sample(
            Quadratic(target), 10, gen(seed), callback=lambda step, losses, images: previews.append(images))
        image = sample(1, 5)
        # screened after step index 2 (0.2 of 10), candidates compared after step index 5
        assert calls == [(6, False)] * 3 + [(2, True)] * 3 + [(1, True)] * 4
        torch.testing.assert_close(sample(1, 5), image, atol=0, rtol=0)
        previews.clear()
        pair = sample(2, 5)
    finally:
        model.unet.forward = forward
    close = dict(atol=1e-3, rtol=0)   # batches of different sizes round differently inside the UNet
    torch.testing.assert_close(pair[:1], image, **close)
    pair_previews = previews[:]
    previews.clear()
    torch.testing.assert_close(pair[1:], sample(1, 6), **close)
    # every step's preview of image 1 is its own candidate's, the screening step's included
    assert len(pair_previews) == len(previews) == 10
    for both, alone in zip(pair_previews, previews):
        torch.testing.assert_close(both[1:], alone, **close)


def test_screening_defaults_to_twelve_per_kept_candidate_and_is_checked(tiny_diffusion_path):
    make = lambda **o: DiffusionGenerator(1, 16, 16, generator=gen(), model=str(tiny_diffusion_path), **o)
    assert make().screen == 48 and make(candidates=2).screen == 24 and make(candidates=1).screen == 1
    assert make(scale=0.0).screen == 1 and make(scheduler="euler").screen == 1
    assert make(candidates=1, screen=8).screen == 8   # screening alone: keep the best one
    with pytest.raises(ClipguideError, match="screen 8 needs a sampler whose step depends only on its timestep"):
        make(scheduler="dpm", screen=8)
    with pytest.raises(ClipguideError, match=r"screen 4 is chosen by the guidance loss, which is off \(scale 0\)"):
        make(scale=0.0, screen=4)
    with pytest.raises(ClipguideError, match=r"screen 2 must be at least candidates 4 \(or 1: no screening\)"):
        make(screen=2)
    assert_refused(make, "screen", (0, 2.5, True), "screen must be a positive integer")
    assert_refused(make, "screen_at", (0, 1, "soon"), r"screen_at must be a number in \(0, 1\)")


def test_candidates_default_to_what_the_sampler_and_the_guidance_allow(tiny_diffusion_path):
    make = lambda **o: DiffusionGenerator(1, 16, 16, generator=gen(), model=str(tiny_diffusion_path), **o)
    assert make().candidates == 4 and make(scheduler="ddim").candidates == 4
    assert make(scale=0.0).candidates == 1 and make(scheduler="euler").candidates == 1
    with pytest.raises(ClipguideError, match="candidates 2 need a sampler whose step depends only on its timestep"):
        make(scheduler="dpm", candidates=2)
    with pytest.raises(ClipguideError, match=r"chosen by the guidance loss, which is off \(scale 0\)"):
        make(scale=0.0, candidates=2)
    assert_refused(make, "candidates", (0, 1.5, True), "candidates must be a positive integer")
    assert_refused(make, "select_at", (0, 1, "early"), r"select_at must be a number in \(0, 1\)")
    # guidance that starts after the selection cannot choose: asked for, that is an error before any sampling;
    # by default, the images are sampled without candidates
    quadratic = Quadratic(torch.full((1, 3, 16, 16), 0.8))
    late = dict(start=0.6, select_at=0.2, polish=0)
    with pytest.raises(ClipguideError, match="no step up to there is guided"):
        make(candidates=2, **late).sample(quadratic, 5, gen())
    sampler = make(**late)
    rows = []
    forward = sampler.model.unet.forward
    sampler.model.unet.forward = lambda x, t, *a, **k: rows.append(len(x)) or forward(x, t, *a, **k)
    sampler.sample(quadratic, 5, gen())
    assert rows and set(rows) == {1}


def test_recurrence_defaults_to_what_the_sampler_can_do_and_refuses_what_it_cannot(tiny_diffusion_path):
    make = lambda **o: DiffusionGenerator(1, 16, 16, generator=gen(), model=str(tiny_diffusion_path), **o)
    assert make().recurrence == 3 and make(scheduler="ddim").recurrence == 3
    assert make(scheduler="euler").recurrence == 1 and make(scheduler="dpm").recurrence == 1
    with pytest.raises(ClipguideError, match="recurrence 2 needs a sampler whose step depends only on its timestep"):
        make(scheduler="euler", recurrence=2)
    assert_refused(make, "recurrence", (0, 2.5, True), "recurrence must be a positive integer")
    assert_refused(make, "recurrence_below", (0, 1.5, "half"), r"recurrence_below must be a number in \(0, 1\]")


def test_img2img_strength_controls_how_far_from_the_init(perceptor, tiny_diffusion_path):
    init = torch.rand(1, 3, 16, 16, generator=gen(9)) * 0.5 + 0.25
    # no polish: a random UNet's x0 estimates would move even an untouched init
    far = lambda s: float((run(perceptor, tiny_diffusion_path, steps=10, scale=0.0, scheduler="ddim", polish=0,
                               init_image=init, strength=s).tensor - init).abs().mean())
    assert far(0.1) < 0.05 < far(1.0)


def test_previews_are_x0_estimates(perceptor, tiny_diffusion_path):
    seen = []
    guide("a red circle", backend="diffusion", clip=perceptor, steps=3, size=16, cutn=2,
          backend_options={"model": str(tiny_diffusion_path), "scheduler": "ddim"},
          callback=lambda step, losses, images: seen.append((step, images)))
    assert [s for s, _ in seen] == [1, 2, 3]
    assert all(im.shape == (1, 3, 16, 16) and 0 <= im.min() and im.max() <= 1 for _, im in seen)


def test_latent_unet_through_guide_and_size_checks(perceptor):
    model = tiny_latent_model()
    assert model.size_multiple == 4 and model.native_size == (16, 16)
    result = guide("a red circle", backend="diffusion", clip=perceptor, steps=2, size=16, cutn=2,
                   backend_options={"model": model, "scheduler": None, "scale": 100.0})
    assert result.tensor.shape == (1, 3, 16, 16) and torch.isfinite(result.tensor).all()
    with pytest.raises(ClipguideError, match="multiple of 4"):
        guide("a red circle", backend="diffusion", clip=perceptor, steps=2, size=18,
              backend_options={"model": model})


def test_bad_models_and_options_are_named_before_sampling(perceptor, tiny_diffusion_path, tmp_path):
    with pytest.raises(ClipguideError, match="neither a shipped name"):
        DiffusionGenerator(1, 16, 16, generator=gen(), model=str(tmp_path))
    with pytest.raises(ClipguideError, match="multiple of 2"):
        DiffusionGenerator(1, 15, 16, generator=gen(), model=str(tiny_diffusion_path))
    with pytest.raises(ClipguideError, match="strength"):
        DiffusionGenerator(1, 16, 16, generator=gen(), model=str(tiny_diffusion_path), strength=0)
    with pytest.raises(ClipguideError, match="has no option 'lr'.*scale"):
        DiffusionGenerator(1, 16, 16, generator=gen(), model=str(tiny_diffusion_path), lr=0.1)
    with pytest.raises(ClipguideError, match="unknown scheduler 'plms'"):
        DiffusionGenerator(1, 16, 16, generator=gen(), model=str(tiny_diffusion_path), scheduler="plms")
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    conditional = DiffusionModel(unet, DDIMScheduler())
    with pytest.raises(ClipguideError, match="conditional"):
        DiffusionGenerator(1, 16, 16, generator=gen(), model=conditional)


def test_progress_bar_shows_the_last_guided_loss_never_nan(perceptor, tiny_diffusion_path, capsys):
    # 4 DDPM steps: the first two are guided (guidance ends at 0.6 of the way), the last two report NaN losses
    result = guide("a red circle", backend="diffusion", clip=perceptor, steps=4, size=16, cutn=2, progress=True,
                   backend_options={"model": str(tiny_diffusion_path)})
    assert math.isnan(result.losses[-1]["total"]) and math.isfinite(result.losses[0]["total"])
    err = capsys.readouterr().err
    assert "loss=" in err and "nan" not in err
