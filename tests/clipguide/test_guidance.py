"""CLIPGuidance against hand-assembled losses on a random CLIP: weights, signs, stops, members, targets."""
import math

import pytest
import torch

from clipguide import CLIPGuidance, ClipguideError, Perceptor, Prompt, UnknownNameError
from clipguide.cutouts import Augment
from clipguide.losses import EMBEDDING_LOSSES, IMAGE_LOSSES
from clipguide.prompts import noise_target
from core_clip.preprocess import as_image_batch

# One cut that is the image itself: "pooled" at the image's own size is the identity, and Augment() does nothing.
EXACT = dict(cutn=1, cutouts="pooled", augment=Augment())


def images(batch=2, seed=0):
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def embed(model, x):
    return model.encode_image(model.preprocess.normalize(x), grad=True)


def test_loss_is_weighted_sum_of_spherical_distances(perceptor, model):
    g = CLIPGuidance("a red circle:2 | blurry:-0.5", perceptor, **EXACT)
    x = images()
    text = model.encode_text(["a red circle", "blurry"])
    e = embed(model, x)
    theta = torch.arccos((e @ text.T).clamp(-1, 1))              # [B, 2] angles
    expected = 2 * theta[:, 0] ** 2 / 2 - 0.5 * theta[:, 1] ** 2 / 2  # spherical distance = theta^2 / 2
    per_image = g.per_image(x)
    torch.testing.assert_close(per_image["total"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.loss(x), expected.sum(), atol=1e-5, rtol=1e-5)
    # "prompts" reports the signed distance of each prompt
    torch.testing.assert_close(per_image["prompts"], torch.stack([theta[:, 0] ** 2 / 2, -theta[:, 1] ** 2 / 2]),
                               atol=1e-5, rtol=1e-5)


def test_batch_items_are_independent(perceptor):
    g = CLIPGuidance("a green square", perceptor, **EXACT)
    x = images(3)
    _, grad = g.gradient(x)
    for b in range(3):
        _, single = g.gradient(x[b:b + 1])
        torch.testing.assert_close(grad[b:b + 1], single, atol=1e-6, rtol=1e-5)


def test_gradient_matches_finite_differences(perceptor):
    g = CLIPGuidance("a blue triangle", perceptor, **EXACT)
    x = images(1).double().float()
    _, grad = g.gradient(x)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    direction /= direction.norm()
    eps = 1e-2
    numeric = (g.loss(x + eps * direction) - g.loss(x - eps * direction)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=0.05, abs=1e-5)


def test_stop_switches_gradient_off_and_reports_done(perceptor):
    x = images(1)
    free = CLIPGuidance("a red circle", perceptor, **EXACT)
    stopped = CLIPGuidance([Prompt("text", "a red circle", 1.0, stop=10.0)], perceptor, **EXACT)
    assert free.loss(x).item() == pytest.approx(stopped.loss(x).item())  # the value is unchanged
    assert stopped.gradient(x)[1].abs().max() == 0
    assert free.gradient(x)[1].abs().max() > 0
    assert stopped.done() and not free.done()


def test_members_are_weighted(model):
    x = images(1)
    single = CLIPGuidance("a red circle", Perceptor(model), **EXACT).loss(x)
    double = CLIPGuidance("a red circle", Perceptor([(model, 1.0), (model, 0.25)]), **EXACT).loss(x)
    assert double.item() == pytest.approx(1.25 * single.item(), rel=1e-5)


def test_image_and_noise_targets(perceptor, model, tmp_path):
    from PIL import Image

    x = images(1)
    path = tmp_path / "target.png"
    Image.fromarray((x[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    quantised = as_image_batch(Image.open(path))
    g = CLIPGuidance([Prompt("image", str(path)), Prompt("noise", "7", 0.5)], perceptor, **EXACT)
    torch.testing.assert_close(g.targets[0][0], embed(model, quantised)[0].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.targets[0][1], noise_target(7, model.embed_dim))
    assert g.per_image(quantised)["prompts"][0].item() == pytest.approx(0, abs=1e-5)


def test_regularisers_add_weighted_image_losses(perceptor):
    x = images()
    plain = CLIPGuidance("a red circle", perceptor, **EXACT).per_image(x)["total"]
    reg = CLIPGuidance("a red circle", perceptor, regularisers={"tv": 2.0, "saturation": -1.0}, **EXACT).per_image(x)
    expected = plain + 2.0 * IMAGE_LOSSES.get("tv")(x) - IMAGE_LOSSES.get("saturation")(x)
    torch.testing.assert_close(reg["total"], expected, atol=1e-6, rtol=1e-6)
    assert set(reg) == {"total", "prompts", "tv", "saturation"}


@pytest.mark.parametrize("name", EMBEDDING_LOSSES.names())
def test_every_embedding_loss_is_used_as_registered(perceptor, model, name):
    x = images(1)
    got = CLIPGuidance("a red circle", perceptor, loss=name, **EXACT).loss(x)
    expected = EMBEDDING_LOSSES.get(name)(embed(model, x), model.encode_text(["a red circle"]))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_same_seed_same_loss_with_random_cutouts(perceptor):
    x = images()
    a = [CLIPGuidance("a red circle", perceptor, seed=3).loss(x).item() for _ in range(2)]
    b = CLIPGuidance("a red circle", perceptor, seed=4).loss(x).item()
    assert a[0] == a[1] and a[0] != b


def test_text_embeddings_are_cached(perceptor, monkeypatch):
    CLIPGuidance("a cached prompt", perceptor)
    calls = []
    model = perceptor.members[0].model
    monkeypatch.setattr(model, "encode_text", lambda texts, **kw: calls.append(texts))
    CLIPGuidance("a cached prompt", perceptor)
    assert calls == []


@pytest.mark.parametrize("options, error, match", [
    (dict(cutn=0), ClipguideError, "cutn"),
    (dict(loss="nope"), UnknownNameError, "spherical"),
    (dict(cutouts="nope"), UnknownNameError, "classic"),
    (dict(regularisers={"nope": 1.0}), UnknownNameError, "tv"),
    (dict(regularisers={"tv": math.nan}), ClipguideError, "finite"),
    (dict(cutout_options={"cut_power": 2}), ClipguideError, "cut_power"),
    (dict(colour=1), ClipguideError, "colour"),
])
def test_bad_options_raise_value_errors(perceptor, options, error, match):
    with pytest.raises(error, match=match):
        CLIPGuidance("a red circle", perceptor, **options)


def test_bad_images_raise(perceptor):
    g = CLIPGuidance("a red circle", perceptor)
    with pytest.raises(ClipguideError, match=r"\[B, 3, H, W\]"):
        g.loss(torch.rand(3, 64, 64))
