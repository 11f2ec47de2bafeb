"""The denoise judge: a picture's denoise error by hand, its independence of the batch, the calibration, and
guide()'s retries judged by it."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipguide import ClipguideError, guide, retry_seed
from clipguide import CLIPGuidance
from clipguide.denoise_judge import calibrate, calibrated_error, denoise_error, main, purified
from clipguide.generators.diffusion import DiffusionModel, WEIGHTS
from clipguide.training import shapes_batch

from .conftest import tiny_latent_model, tiny_unet

PROMPT = "a red circle on a blue background"


def zero_model(size=8):
    """A sample-predicting model whose output layer is zero: it estimates x0 = 0 from any noisy copy."""
    unet, scheduler = tiny_unet("sample", sample_size=size)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    return DiffusionModel(unet, scheduler)


def test_error_is_the_rms_distance_from_the_estimate_in_grey_levels():
    # x0 = 0 is mid-grey: the error is the RMS of (2 * area(image) - 1) over the model's 8 px, times 255 / 2
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = (F.avg_pool2d(images, 4) * 2 - 1).pow(2).mean(dim=(1, 2, 3)).sqrt() * 127.5
    torch.testing.assert_close(denoise_error(images, zero_model()), expected, rtol=1e-5, atol=0)
    grey = torch.full((1, 3, 32, 32), 0.5)
    assert float(denoise_error(grey, zero_model())) == pytest.approx(0.0, abs=1e-4)


def test_a_pictures_error_depends_on_the_picture_and_the_seed_alone():
    unet, scheduler = tiny_unet("epsilon")
    model = DiffusionModel(unet, scheduler)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    together = denoise_error(images, model, copies=4)
    alone = torch.cat([denoise_error(images[i:i + 1], model, copies=4) for i in range(5)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(denoise_error(images, model, copies=4, batch_size=4), together, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(denoise_error(images, model, copies=4, seed=1), together)
    assert (together > 0).all()


def test_purified_pictures_are_the_models_estimates_of_noised_copies_resized_back():
    unet, scheduler = tiny_unet("epsilon", sample_size=8)
    model = DiffusionModel(unet, scheduler)
    images = torch.rand(3, 3, 32, 24, generator=torch.Generator().manual_seed(4))
    out = purified(images, model, level=0.3, copies=2, seed=5)
    assert out.shape == (3, 2, 3, 32, 24)
    # by hand: area-average to the model's 8 px, noise to t = int(0.3 * 999) with the seed's draws, estimate x0
    x = F.interpolate(images, size=(8, 8), mode="area") * 2 - 1
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    t = int(0.3 * 999)
    a = scheduler.alphas_cumprod[t]
    for copy in range(2):
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise[copy]
        with torch.no_grad():
            eps = unet(x_t, torch.full((3,), t)).sample
        x0 = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        expected = (F.interpolate(x0, size=(32, 24), mode="bilinear", align_corners=False) + 1) / 2
        torch.testing.assert_close(out[:, copy], expected, rtol=1e-4, atol=1e-5)
    # a picture's copies depend on the picture and the seed alone
    alone = torch.cat([purified(images[i:i + 1], model, level=0.3, copies=2, seed=5) for i in range(3)])
    torch.testing.assert_close(alone, out, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(purified(images, model, level=0.3, copies=2, seed=6), out)
    for level in (0, 1, True, math.nan):
        with pytest.raises(ClipguideError, match="purify must be a number in"):
            purified(images, model, level=level)


def test_purification_undoes_a_picture_that_fools_the_shipped_clip():
    from core_clip import shapes

    triangle = shapes.render(shapes.Scene("triangle", "blue", "yellow", "large", "center"), 64)
    x = torch.from_numpy(triangle).permute(2, 0, 1)[None].float() / 255
    circle = CLIPGuidance("a blue circle on a yellow background", "shapes")
    truth = CLIPGuidance("a blue triangle on a yellow background", circle.perceptor)
    model = circle.perceptor.members[0].model
    # signed-gradient ascent of the circle caption's cosine, within 64/255 of the true picture, as guidance would
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(40):
        embedding = model.embed_images((x + delta).clamp(0, 1), grad=True)
        (embedding / embedding.norm(dim=-1, keepdim=True) @ circle.targets[0].T).sum().backward()
        with torch.no_grad():
            delta += 4 / 255 * delta.grad.sign()
            delta.clamp_(-64 / 255, 64 / 255)
            delta.grad = None
    fooling = (x + delta).detach().clamp(0, 1)
    assert circle.clip_score(fooling) > model.match_score > truth.clip_score(fooling)
    copies = purified(fooling, "shapes", level=0.2)[0]
    assert truth.clip_score(copies).mean() > model.match_score > circle.clip_score(copies).mean()


def test_calibration_is_the_quantile_of_the_real_pictures_errors():
    levels = torch.linspace(0, 1, 11)
    images = levels.view(-1, 1, 1, 1).expand(-1, 3, 16, 16).contiguous()
    known = (2 * levels - 1).abs() * 127.5                  # constant pictures under the zero model
    for q in (0.5, 0.9):
        assert calibrate(images, zero_model(), quantile=q, batch_size=4) == pytest.approx(
            float(np.quantile(known.numpy(), q)), rel=1e-5)
    with pytest.raises(ClipguideError, match=r"quantile must be in \(0, 1\)"):
        calibrate(images, zero_model(), quantile=1.0)


def test_the_shipped_calibration_passes_real_pictures_and_fails_noisy_ones():
    stored = json.loads((WEIGHTS / "diffusion-shapes" / "calibration.json").read_text())
    assert calibrated_error("shapes") == stored["denoise_error"]
    real = (shapes_batch(7, 8, 64, seed=99) + 1) / 2            # fresh pictures, not the calibration's
    noisy = (real + 0.08 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    limit = calibrated_error("shapes")
    assert (denoise_error(real) < limit).sum() >= 7
    assert (denoise_error(noisy) > limit).all()


def test_calibrated_error_of_folders_and_models(tiny_diffusion_path, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_diffusion_path, folder)
    assert calibrated_error(folder) is None and calibrated_error(zero_model()) is None
    assert main(["--model", str(folder), "--n", "6", "--quantile", "0.5", "--write"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["written"] == str(folder / "calibration.json")
    assert calibrated_error(folder) == record["denoise_error"] > 0
    assert calibrate((shapes_batch(0, 6, 64, 1234) + 1) / 2, str(folder), 0.5) == pytest.approx(
        record["denoise_error"], abs=5e-4)
    (folder / "calibration.json").write_text('{"denoise_error": -1}')
    with pytest.raises(ClipguideError, match="denoise_error must be a positive number"):
        calibrated_error(folder)
    with pytest.raises(SystemExit) as info:
        main(["--model", str(folder), "--n", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--n: expected a positive integer, got 0" in err
    assert main(["--model", "nope", "--n", "2"]) == 2
    assert "diffusion model 'nope' is neither a shipped name" in capsys.readouterr().err


def run(perceptor, judge, **kw):
    return guide(PROMPT, clip=perceptor, steps=2, cutn=2, size=32, denoise_judge=str(judge), **kw)


def test_retries_redraw_pictures_the_judge_rejects(perceptor, tiny_diffusion_path):
    strict = run(perceptor, tiny_diffusion_path, seed=3, retries=2, accept_score=0.0, accept_error=1e-3)
    assert strict.attempts == [3]
    torch.testing.assert_close(torch.tensor(strict.denoise_error), denoise_error(strict.tensor, tiny_diffusion_path))
    lenient = run(perceptor, tiny_diffusion_path, seed=3, retries=2, accept_score=0.0, accept_error=1e6)
    assert lenient.attempts == [1]
    assert guide(PROMPT, clip=perceptor, steps=1, cutn=2, size=32).denoise_error is None


def test_the_kept_picture_passes_more_tests_before_it_scores_higher(perceptor, tiny_diffusion_path):
    # no picture reaches CLIP score 100; only the attempt with the lowest denoise error passes the judge, so it is
    # kept whatever the CLIP scores of the others
    seeds = (3, retry_seed(3, 0, 1), retry_seed(3, 0, 2))
    drawn = [run(perceptor, tiny_diffusion_path, seed=s, retries=0, accept_error=1.0) for s in seeds]
    errors = [d.denoise_error[0] for d in drawn]
    assert len(set(errors)) == 3
    best = min(range(3), key=errors.__getitem__)
    threshold = (errors[best] + sorted(errors)[1]) / 2
    result = run(perceptor, tiny_diffusion_path, seed=3, retries=2, accept_score=100.0, accept_error=threshold)
    assert result.attempts == [3]
    assert torch.equal(result.tensor, drawn[best].tensor)


def test_with_purify_retries_judge_the_score_of_the_purified_picture(perceptor, tiny_diffusion_path):
    probe = run(perceptor, tiny_diffusion_path, seed=3, retries=0, purify=0.5, accept_error=1e6)
    raw, judged = probe.clip_score[0], probe.purified_score[0]
    guidance = CLIPGuidance(PROMPT, perceptor)
    copies = purified(probe.tensor, str(tiny_diffusion_path), level=0.5)[0]
    assert judged == pytest.approx(float(guidance.clip_score(copies).mean()), abs=1e-4)
    assert abs(raw - judged) > 1e-3
    # a threshold between the two scores: exactly one of the judged and the plain runs accepts the first picture
    threshold = (raw + judged) / 2
    with_purify = run(perceptor, tiny_diffusion_path, seed=3, retries=1, accept_score=threshold, purify=0.5,
                      accept_error=1e6)
    plain = run(perceptor, tiny_diffusion_path, seed=3, retries=1, accept_score=threshold, accept_error=1e6)
    assert with_purify.attempts == ([1] if judged >= threshold else [2])
    assert plain.attempts == ([1] if raw >= threshold else [2]) and plain.purified_score is None


@pytest.mark.parametrize("kwargs, match", [
    ({"accept_error": 3.0}, "accept_error needs a denoise_judge"),
    ({"denoise_judge": "TINY"}, "has no calibrated denoise error"),
    ({"denoise_judge": "TINY", "accept_error": 0}, "accept_error must be a positive number"),
    ({"denoise_judge": "TINY", "accept_error": math.nan}, "accept_error must be a positive number"),
    ({"denoise_judge": "TINY", "accept_error": True}, "accept_error must be a positive number"),
    ({"denoise_judge": "nope"}, "diffusion model 'nope' is neither a shipped name"),
    ({"purify": 0.2}, "purify needs a denoise_judge"),
    ({"denoise_judge": "TINY", "accept_error": 3.0, "purify": 1.0}, r"purify must be a number in \(0, 1\)"),
])
def test_bad_judge_settings_raise_before_sampling(perceptor, tiny_diffusion_path, kwargs, match):
    if kwargs.get("denoise_judge") == "TINY":
        kwargs = {**kwargs, "denoise_judge": str(tiny_diffusion_path)}
    calls = []
    with pytest.raises(ClipguideError, match=match):
        guide(PROMPT, clip=perceptor, steps=1, cutn=2, size=32, callback=lambda *a: calls.append(a), **kwargs)
    assert calls == []


def test_a_latent_model_cannot_judge(perceptor):
    with pytest.raises(ClipguideError, match="pixel-space diffusion model, got a latent one"):
        denoise_error(torch.rand(1, 3, 16, 16), tiny_latent_model())
