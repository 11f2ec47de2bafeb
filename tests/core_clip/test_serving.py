"""CLIP score, zero-shot ensembles, retrieval and the embedding index, each against a hand computation."""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import core_clip
from core_clip import EmbeddingIndex, ZeroShotClassifier, clip_score, recall_at_k, top_k
from core_clip.errors import CoreClipError
from core_clip.preprocess import Preprocess, as_image_batch
from core_clip.tokenizer import ByteTokenizer


def _hand_embed(model, images, texts):
    with torch.no_grad():
        img = F.normalize(model.clip.encode_image(model.preprocess(images)), dim=-1)
        txt = F.normalize(model.clip.encode_text(model.tokenizer(texts)), dim=-1)
    return img, txt


def test_clip_score_equals_hand_computation(tiny_model):
    torch.manual_seed(0)
    images = torch.rand(4, 3, 72, 90)
    texts = ["a red circle", "a blue square", "a red circle", "a green triangle"]
    img, txt = _hand_embed(tiny_model, images, texts)
    expected = 100 * torch.clamp((img * txt).sum(-1), min=0)
    assert torch.allclose(clip_score(images, texts, tiny_model), expected, atol=1e-4)
    # one prompt broadcast to every image
    one = 100 * torch.clamp(img @ txt[0], min=0)
    assert torch.allclose(clip_score(images, "a red circle", tiny_model), one, atol=1e-4)


class _FixedTextModel:
    """Stands in for a ClipModel whose text embeddings are given, to pin down the score arithmetic."""

    device = torch.device("cpu")

    def __init__(self, table):
        self.table = table
        self.calls = []

    def encode_text(self, texts, batch_size=64):
        self.calls.append(list(texts))
        return torch.stack([self.table[t] for t in texts])


def test_score_embeddings_clamps_negative_pairs_and_encodes_each_text_once():
    from core_clip.score import score_embeddings

    s = 0.6
    table = {"up": torch.tensor([1.0, 0.0]), "down": torch.tensor([-1.0, 0.0]), "side": torch.tensor([0.0, 1.0])}
    model = _FixedTextModel(table)
    image_emb = torch.tensor([[1.0, 0.0], [s, (1 - s * s) ** 0.5], [1.0, 0.0], [0.0, 1.0]])
    scores = score_embeddings(image_emb, ["up", "up", "down", "side"], model)
    assert torch.allclose(scores, torch.tensor([100.0, 60.0, 0.0, 100.0]))
    assert model.calls == [["up", "down", "side"]]


def test_clip_score_rejects_mismatched_lengths(tiny_model):
    with pytest.raises(CoreClipError, match="2 images but 3 texts"):
        clip_score(torch.rand(2, 3, 64, 64), ["a", "b", "c"], tiny_model)


def test_clip_score_accepts_pil_and_uint8_identically(tiny_model):
    array = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    from_pil = clip_score([Image.fromarray(array)], ["a red circle"], tiny_model)
    from_uint8 = clip_score(torch.from_numpy(array).permute(2, 0, 1)[None], ["a red circle"], tiny_model)
    assert torch.allclose(from_pil, from_uint8)


def test_zero_shot_ensemble_equals_hand_computation(tiny_model):
    classes, templates = ["circle", "square", "triangle"], ["a {}", "a photo of a {}", "a {} shape"]
    clf = ZeroShotClassifier(tiny_model, classes, templates)
    weights = []
    for c in classes:
        _, txt = _hand_embed(tiny_model, torch.rand(1, 3, 64, 64), [t.format(c) for t in templates])
        mean = txt.mean(0)
        weights.append(mean / mean.norm())
    weights = torch.stack(weights)
    assert torch.allclose(clf.weights, weights, atol=1e-5)
    images = torch.rand(5, 3, 64, 64)
    img, _ = _hand_embed(tiny_model, images, ["x"])
    logits = tiny_model.clip.logit_scale.exp().item() * img @ weights.T
    assert torch.allclose(clf.logits(images), logits, atol=1e-3)
    assert clf.predict(images) == [classes[i] for i in logits.argmax(-1)]
    assert torch.allclose(clf.probs(images).sum(-1), torch.ones(5))


@pytest.mark.parametrize("classes, templates, message", [
    (["a"], ["{}"], "at least two"),
    (["a", "a"], ["{}"], "unique"),
    (["a", "b"], ["no slot"], "exactly one"),
])
def test_zero_shot_rejects_bad_setups(tiny_model, classes, templates, message):
    with pytest.raises(CoreClipError, match=message):
        ZeroShotClassifier(tiny_model, classes, templates)


def test_top_k_matches_a_full_sort():
    g = torch.Generator().manual_seed(0)
    q, idx = F.normalize(torch.randn(4, 8, generator=g), dim=-1), F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    scores, indices = top_k(q, idx, 5)
    full = (q @ idx.T).sort(dim=1, descending=True)
    assert torch.equal(indices, full.indices[:, :5]) and torch.allclose(scores, full.values[:, :5])
    assert top_k(q, idx, 50)[1].shape == (4, 20)
    with pytest.raises(CoreClipError):
        top_k(q, idx, 0)


def test_recall_at_k_counts_same_group_items_as_hits():
    index = torch.eye(4)
    # query 0 is nearest item 0 (same group), query 1 is nearest item 2, whose group equals query 1's
    queries = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0.6, 0.8], [0.8, 0.6, 0, 0]])
    recall = recall_at_k(queries, index, ["a", "b", "c", "d"], ["a", "x", "b", "d"], ks=(1, 2))
    # q0 -> item0 (a) hit@1; q1 -> item2 (b) hit@1; q2 (c) no c in index: miss;
    # q3 (d): item0, item1 then item3 -> miss@2
    assert recall == {1: 0.5, 2: 0.5}


def test_embedding_index_round_trip_and_skips_unreadable_files(tiny_model, tmp_path, caplog):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in [("a.png", (64, 64)), ("b.jpg", (50, 80)), ("sub/c.png", (100, 70))]:
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        index = EmbeddingIndex.build(folder, tiny_model, progress=False)
    assert index.paths == ["a.png", "b.jpg", "sub/c.png"]
    assert any("broken.png" in r.message for r in caplog.records)
    path = index.save(tmp_path / "index.safetensors")
    loaded = EmbeddingIndex.load(path)
    assert loaded.paths == index.paths and torch.equal(loaded.embeddings, index.embeddings)
    assert loaded.model == "shapes-tiny"
    hits = loaded.search(index.embeddings[1:2], k=2)[0]
    assert hits[0][0] == "b.jpg" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(CoreClipError, match="cannot read index"):
        EmbeddingIndex.load(folder / "a.png")


def test_preprocess_resizes_shortest_side_and_center_crops():
    pre = Preprocess(size=4, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest")
    x = torch.arange(8 * 12, dtype=torch.float32).view(1, 1, 8, 12).expand(1, 3, 8, 12)
    out = pre(x)
    assert out.shape == (1, 3, 4, 4)
    # nearest resize to 4x6, then the middle 4 columns: source columns 2, 4, 6, 8 of every other row
    assert torch.equal(out[0, 0, 0], torch.tensor([2.0, 4, 6, 8]))


def test_as_image_batch_accepts_every_form_and_rejects_garbage():
    array = np.zeros((5, 6, 3), np.uint8)
    array[..., 0] = 255
    for form in (array, Image.fromarray(array), torch.from_numpy(array).permute(2, 0, 1), [array, array]):
        batch = as_image_batch(form)
        assert batch.dtype == torch.float32 and batch.shape[1:] == (3, 5, 6) and batch[0, 0].min() == 1.0
    for bad, message in [(np.zeros((5, 6)), "H x W x 3"), ([array, np.zeros((4, 4, 3), np.uint8)], "share a size"),
                         (torch.zeros(2, 4, 5, 5), r"\[B, 3, H, W\]"), ("a string", "unsupported image type")]:
        with pytest.raises(CoreClipError, match=message):
            as_image_batch(bad)


def test_byte_tokenizer_layout():
    tok = ByteTokenizer(context_length=8)
    ids = tok(["Ab", "a very long caption"])
    assert ids[0].tolist() == [257, ord("a") + 1, ord("b") + 1, 258, 0, 0, 0, 0]
    assert ids[1, -1] == 258 and ids[1].argmax() == 7  # truncated, end token kept, argmax pooling finds it


def test_load_of_unreadable_image_file_is_an_image_read_error(tiny_model, tmp_path):
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(core_clip.ImageReadError, match="cannot read image"):
        tiny_model.embed_files([tmp_path / "x.png"])
    with pytest.raises(core_clip.ImageReadError, match="image not found"):
        tiny_model.embed_files([tmp_path / "missing.png"])
