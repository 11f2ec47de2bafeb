"""Guidance negatives: the climb raises caption similarity, climbed images match only the null caption, training
with them resumes exactly, and bad settings are refused."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core_clip.data import NULL_CAPTION, positives
from core_clip.errors import CoreClipError
from core_clip.negatives import NegativeBuffer, NegativeConfig, _on_grid
from core_clip.train import Trainer, TrainError

from .test_train import _cfg, _losses


def _first_batch(trainer: Trainer):
    return next(trainer._batches(epoch=0, start_step=0))[0]


def _similarity(model, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    with torch.no_grad():
        image = model.encode_image(model.preprocess.normalize(images))
        return (image * model.encode_text(captions)).sum(-1)


def test_the_climb_raises_similarity_to_each_chain_caption_and_is_reproducible(tmp_path):
    trainer = Trainer(_cfg(tmp_path, augment=False))
    model, batch = trainer.model, _first_batch(trainer)
    cfg = NegativeConfig(count=8, steps=2, buffer=8, restart=1.0)
    climbed_buffer = NegativeBuffer(cfg, image_size=model.image_size, seed=3)
    climbed = climbed_buffer.draw(model, batch)
    assert climbed.shape == (8, 3, model.image_size, model.image_size)
    assert 0 <= climbed.min() and climbed.max() <= 1
    # the same seed with a zero step: the same starts, captions and views, no climb
    still_buffer = NegativeBuffer(replace(cfg, step_size=0.0), image_size=model.image_size, seed=3)
    still = still_buffer.draw(model, batch)
    captions = climbed_buffer.captions
    assert still_buffer.captions == captions and all(c in batch.captions for c in captions)
    gain = _similarity(model, climbed, captions) - _similarity(model, still, captions)
    assert (gain > 0).all(), gain  # every chain climbed (a random-init model: small steps in similarity)
    # the chains keep where they got to (the buffer holds every climbed image)
    assert all(any(torch.equal(c, b) for b in climbed_buffer.images) for c in climbed)
    assert torch.equal(NegativeBuffer(cfg, image_size=model.image_size, seed=3).draw(model, batch), climbed)


def test_climbed_images_match_only_the_null_caption(tmp_path):
    trainer = Trainer(_cfg(tmp_path, augment=False))
    batch = _first_batch(trainer)
    buffer = NegativeBuffer(NegativeConfig(count=4, steps=1, buffer=4), image_size=trainer.model.image_size, seed=0)
    negatives = buffer.draw(trainer.model, batch)
    tokenizer = trainer.model.tokenizer
    extended = buffer.extend(batch, negatives, tokenizer)
    n = len(batch)
    assert len(extended) == n + 4 and extended.captions[n:] == [buffer.cfg.caption] * 4
    assert torch.equal(extended.tokens, tokenizer(extended.captions))  # the loader's token ids, extended
    with pytest.raises(CoreClipError, match="needs the tokenizer"):
        buffer.extend(batch, negatives)
    pos = positives(extended.facts, extended.claims)
    assert torch.equal(pos[:n, :n], positives(batch.facts, batch.claims))
    assert not pos[:n, n:].any() and not pos[n:, :n].any() and pos[n:, n:].all()


def test_own_chains_start_on_a_true_picture_of_their_caption(tmp_path):
    trainer = Trainer(_cfg(tmp_path, augment=False))
    model, batch = trainer.model, _first_batch(trainer)
    cfg = NegativeConfig(count=8, steps=1, buffer=8, restart=1.0, own=1.0, step_size=0.0)
    buffer = NegativeBuffer(cfg, image_size=model.image_size, seed=5)
    buffer.draw(model, batch)
    for start, caption in zip(buffer.images, buffer.captions):   # by buffer slot
        assert any(torch.equal(start, image) for image, c in zip(batch.images, batch.captions) if c == caption)
    # without own, the same draw starts most chains on noise or on pictures of other captions
    buffer = NegativeBuffer(replace(cfg, own=0.0), image_size=model.image_size, seed=5)
    buffer.draw(model, batch)
    own = [any(torch.equal(start, image) for image, c in zip(batch.images, batch.captions) if c == caption)
           for start, caption in zip(buffer.images, buffer.captions)]
    assert sum(own) <= 2


def test_coarse_grids_keep_only_coarse_gradients():
    grad = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_on_grid(grad, 16), grad)
    coarse = _on_grid(grad, 1)
    assert torch.allclose(coarse, grad.mean(dim=(1, 2), keepdim=True).expand_as(grad))
    four = _on_grid(grad, 4)
    # it is a smooth field: far less energy at the highest frequencies than the white-noise gradient
    def roughness(x):
        return (x[:, 1:] - x[:, :-1]).pow(2).mean() / x.pow(2).mean()
    assert roughness(four) < 0.2 * roughness(grad)


def test_training_with_negatives_and_flaws_resumes_exactly(tmp_path):
    settings = dict(negatives=4, negative_steps=1, negative_start=1, flaws=0.3, max_steps=4, save_every=2)
    cfg = _cfg(tmp_path / "straight", **settings)
    Trainer(cfg).run()
    straight = _losses(Path(cfg.out))
    assert len(straight) == 4
    state = torch.load(Path(cfg.out) / "checkpoints" / "step_0000004" / "state.pt", weights_only=True)
    assert state["negatives"][0]["images"].shape[0] == NegativeConfig().buffer
    assert NULL_CAPTION in _first_batch(Trainer(_cfg(tmp_path / "peek", **settings))).captions  # flawed pictures

    resumed = _cfg(tmp_path / "resumed", **settings)
    Trainer(resumed).run()
    checkpoints = Path(resumed.out) / "checkpoints"
    (checkpoints / "latest").write_text("step_0000002\n")  # as if killed after the step-2 checkpoint
    Trainer(replace(resumed, resume=True)).run()
    assert _losses(Path(resumed.out)) == straight


def test_bad_negative_settings_are_refused(tmp_path):
    with pytest.raises(TrainError, match="multi-positive"):
        Trainer(_cfg(tmp_path / "a", negatives=4, multi_positive=False))
    with pytest.raises(TrainError, match="--negatives must be >= 0"):
        Trainer(_cfg(tmp_path / "b", negatives=-1))
    with pytest.raises(CoreClipError, match="cannot exceed the buffer"):
        NegativeConfig(count=9, buffer=8)
    with pytest.raises(CoreClipError, match="own is a probability"):
        NegativeConfig(own=1.5)
    with pytest.raises(TrainError, match="--negative-own needs --negatives"):
        Trainer(_cfg(tmp_path / "c", negative_own=0.5))
