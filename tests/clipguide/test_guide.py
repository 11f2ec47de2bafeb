"""guide(): determinism, results, callbacks, frames, early stop, failures, and every plugin through one step."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clipguide import ClipguideError, GuidanceError, PromptError, UnknownNameError, guide
from clipguide.cutouts import CUTOUTS
from clipguide.generators import GENERATORS
from clipguide.losses import EMBEDDING_LOSSES, IMAGE_LOSSES


def run(perceptor, prompt="a red circle on a blue background", **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("cutn", 2)
    kw.setdefault("size", 32)
    return guide(prompt, clip=perceptor, **kw)


def test_same_seed_same_image_and_other_seed_differs(perceptor):
    a, b, c = run(perceptor, seed=1), run(perceptor, seed=1), run(perceptor, seed=2)
    assert torch.equal(a.tensor, b.tensor)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not torch.equal(a.tensor, c.tensor)


def test_result_fields(perceptor, model):
    result = run(perceptor, batch=2, size="48x32")
    assert result.tensor.shape == (2, 3, 32, 48)
    assert [im.size for im in result.images] == [(48, 32)] * 2 and result.image.size == (48, 32)
    assert np.array_equal(np.asarray(result.image), np.asarray(result.images[0]))
    assert result.steps == 3 and len(result.losses) == 3 and result.seconds > 0
    assert set(result.losses[0]) == {"total", "a red circle on a blue background"}
    # clip_score is core_clip's 100 * max(cos, 0) of the final images against the prompt
    emb = model.embed_images(result.tensor)
    text = model.encode_text(["a red circle on a blue background"])
    expected = (100 * (emb @ text.T).clamp(min=0))[:, 0]
    assert result.clip_score == pytest.approx(expected.tolist(), abs=1e-3)


def test_callback_sees_every_step(perceptor):
    seen = []
    run(perceptor, steps=4, callback=lambda step, losses, images: seen.append((step, images.shape)))
    assert seen == [(s, (1, 3, 32, 32)) for s in range(1, 5)]


def test_early_stop_when_every_prompt_is_below_its_stop(perceptor):
    assert run(perceptor, prompt="a red circle:1:10", steps=20).steps == 1
    assert run(perceptor, prompt="a red circle:1:10 | blue", steps=5).steps == 5  # "blue" never stops


def test_negative_and_image_prompts(perceptor, tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    result = run(perceptor, negative="blurry:0.5", image_prompts=[f"{path}:2"])
    assert set(result.losses[0]) == {"total", "a red circle on a blue background", "blurry", "image p.png"}
    assert result.losses[0]["blurry"] < 0  # reported signed: pushing away lowers the loss


def test_init_image_is_the_start(perceptor, tmp_path):
    path = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (30, 170, 50)).save(path)
    first = []
    run(perceptor, init_image=path, backend_options={"resolution": None, "lr": 1e-9},
        callback=lambda s, l, images: first.append(images) if s == 1 else None)
    torch.testing.assert_close(first[0], torch.tensor([30, 170, 50]).view(1, 3, 1, 1).expand(1, 3, 32, 32) / 255)


def test_frames_and_video(perceptor, tmp_path):
    run(perceptor, steps=4, frames=tmp_path / "frames", frame_every=2)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["frame_00002.png", "frame_00004.png",
                                                                     "frames.mp4"]
    assert (tmp_path / "frames" / "frames.mp4").stat().st_size > 0


def test_non_finite_loss_stops_with_the_step(perceptor, monkeypatch):
    calls = []

    def breaks_at_step_2(images):
        calls.append(1)
        return images.sum(dim=(1, 2, 3)) * (math.nan if len(calls) == 2 else 0.0)

    monkeypatch.setitem(IMAGE_LOSSES._items, "breaks", breaks_at_step_2)
    with pytest.raises(GuidanceError, match="step 2"):
        run(perceptor, regularisers={"breaks": 1.0})


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(backend="nope"), UnknownNameError, "pixels"),
    (dict(steps=0), ClipguideError, "steps"),
    (dict(size=0), ClipguideError, "size"),
    (dict(size="12xx"), ClipguideError, "size"),
    (dict(batch=0), ClipguideError, "batch"),
    (dict(image_prompts=["/no/such.png"]), PromptError, "not found"),
    (dict(init_image="/no/such.png"), ValueError, "not found"),
    (dict(prompt="a:nan"), PromptError, "finite"),
    (dict(backend_options={"lr": 0.1, "sharpnes": 3}), ClipguideError,
     "no option 'sharpnes'; its options: choice_sharpness, colors, lr"),
])
def test_bad_input_raises_value_errors(perceptor, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(perceptor, **kwargs)


@pytest.mark.parametrize("backend", GENERATORS.names())
@pytest.mark.parametrize("loss", EMBEDDING_LOSSES.names())
@pytest.mark.parametrize("cutouts", CUTOUTS.names())
def test_every_backend_loss_and_cutout_scheme_runs_a_step(perceptor, backend_options, backend, loss, cutouts):
    # 2 steps: diffusion guides its first (t = 500) and leaves the clean end (t = 0) to the model
    result = run(perceptor, backend=backend, backend_options=backend_options(backend), loss=loss, cutouts=cutouts,
                 steps=2,
                 regularisers={name: 0.1 for name in IMAGE_LOSSES.names()})
    assert math.isfinite(result.losses[0]["total"])
    assert set(IMAGE_LOSSES.names()) <= set(result.losses[0])
