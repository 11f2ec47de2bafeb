"""guide()'s retries: a picture that its CLIP scores below the accepted score is drawn again from a fresh seed, and
the best-scoring picture is kept."""
import pytest
import torch

from clipguide import ClipguideError, guide, retry_seed
from clipguide.generators import GENERATORS

PROMPT = "a red circle on a blue background"


def run(perceptor, **kw):
    kw.setdefault("steps", 2)
    kw.setdefault("cutn", 2)
    kw.setdefault("size", 32)
    return guide(PROMPT, clip=perceptor, **kw)


def test_retry_seeds_are_reproducible_and_distinct():
    seeds = {(s, i, k): retry_seed(s, i, k) for s in (0, 1, 2**40) for i in range(3) for k in (1, 2)}
    assert len(set(seeds.values())) == len(seeds)
    assert retry_seed(5, 1, 2) == retry_seed(5, 1, 2) and 0 <= retry_seed(-1, 0, 1) < 2**32


def test_unreachable_score_draws_every_retry_and_keeps_the_best(perceptor):
    result = run(perceptor, seed=3, retries=2, accept_score=100.0)
    assert result.attempts == [3] and result.steps == 6 and len(result.losses) == 6
    # each attempt is exactly the picture a plain run with its seed makes
    drawn = [run(perceptor, seed=s, retries=0) for s in (3, retry_seed(3, 0, 1), retry_seed(3, 0, 2))]
    scores = [d.clip_score[0] for d in drawn]
    assert len(set(scores)) == 3
    best = max(range(3), key=scores.__getitem__)
    assert torch.equal(result.tensor, drawn[best].tensor)
    assert result.clip_score == pytest.approx([scores[best]], abs=1e-5)


def test_an_accepted_picture_is_not_retried(perceptor):
    plain = run(perceptor, seed=3, retries=0)
    result = run(perceptor, seed=3, retries=2, accept_score=0.0)
    assert result.attempts == [1] and result.steps == 2 and torch.equal(result.tensor, plain.tensor)


def test_only_the_rows_below_the_score_are_retried_and_the_callback_sees_the_whole_batch(perceptor):
    plain = run(perceptor, seed=0, batch=2, retries=0)
    low, high = sorted(range(2), key=plain.clip_score.__getitem__)
    assert plain.clip_score[low] < plain.clip_score[high]
    seen = []
    result = run(perceptor, seed=0, batch=2, retries=1, accept_score=sum(plain.clip_score) / 2,
                 callback=lambda step, losses, images: seen.append((step, tuple(images.shape))))
    assert result.attempts[low] == 2 and result.attempts[high] == 1
    assert torch.equal(result.tensor[high], plain.tensor[high])
    assert seen == [(s, (2, 3, 32, 32)) for s in range(1, 5)]  # steps count on through the retry
    retry = run(perceptor, seed=retry_seed(0, low, 1), retries=0)
    kept = retry if retry.clip_score[0] > plain.clip_score[low] else plain
    assert torch.equal(result.tensor[low], kept.tensor[0 if kept is retry else low])


def test_defaults_come_from_the_backend_and_the_calibrated_clip(perceptor, model, monkeypatch):
    diffusion, pixels = GENERATORS.get("diffusion"), GENERATORS.get("pixels")
    assert diffusion.default_retries() == 2 and diffusion.default_retries(scale=0.0) == 0
    assert pixels.default_retries(lr=0.1) == 0
    # uncalibrated CLIP and no accept_score: the default is no retries
    assert model.match_score is None
    assert run(perceptor, backend="fourier").attempts == [1]
    monkeypatch.setattr(pixels, "default_retries", classmethod(lambda cls, **_: 1))
    assert run(perceptor, accept_score=100.0).attempts == [2]
    monkeypatch.setattr(model.config, "match_score", 100.0)  # a calibrated CLIP sets the score
    assert run(perceptor).attempts == [2]
    assert run(perceptor, accept_score=0.0).attempts == [1]


@pytest.mark.parametrize("kwargs, match", [
    ({"retries": 1}, "no calibrated match_score"),
    ({"retries": -1, "accept_score": 50.0}, "retries must be a non-negative integer"),
    ({"retries": 1.5, "accept_score": 50.0}, "retries must be a non-negative integer"),
    ({"retries": 1, "accept_score": 101}, r"accept_score must be a CLIP score in \[0, 100\]"),
    ({"retries": 1, "accept_score": float("nan")}, "accept_score must be a CLIP score"),
])
def test_bad_retry_settings_raise_before_sampling(perceptor, kwargs, match):
    calls = []
    with pytest.raises(ClipguideError, match=match):
        run(perceptor, callback=lambda *a: calls.append(a), **kwargs)
    assert calls == []


def test_retries_need_a_positive_prompt(perceptor):
    with pytest.raises(ClipguideError, match="every prompt here is negative"):
        guide("blurry:-1", clip=perceptor, steps=1, size=32, cutn=2, retries=1, accept_score=50.0)


@pytest.mark.parametrize("name", GENERATORS.names())
def test_every_backend_answers_default_retries(name):
    retries = GENERATORS.get(name).default_retries()
    assert isinstance(retries, int) and retries >= 0


@pytest.mark.parametrize("backend, module, loader", [("vqgan", "clipguide.vqgan_model", "load_vqgan"),
                                                     ("diffusion", "clipguide.generators.diffusion", "_load_folder")])
def test_retries_reuse_the_loaded_model(perceptor, monkeypatch, backend, module, loader):
    import importlib

    target = importlib.import_module(module)
    real, loads = getattr(target, loader), []
    monkeypatch.setattr(target, loader, lambda *a, **kw: loads.append(a) or real(*a, **kw))
    result = run(perceptor, backend=backend, seed=3, retries=2, accept_score=100.0)
    assert result.attempts == [3] and len(loads) == 1
    # sharing the model changes nothing: the kept picture is the best plain run of the three seeds
    drawn = [run(perceptor, backend=backend, seed=s, retries=0) for s in (3, retry_seed(3, 0, 1), retry_seed(3, 0, 2))]
    best = max(drawn, key=lambda d: d.clip_score[0])
    assert torch.equal(result.tensor, best.tensor)
