"""Loading: names, paths, formats, strict keys, safe unpickling, offline behaviour; the embedding API."""
import json
import logging
import os
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import core_clip
from core_clip import hub
from core_clip.errors import CheckpointError, ModelNotFoundError, WeightsUnavailableError


def _embeddings(model):
    torch.manual_seed(1)
    images = torch.rand(3, 3, 64, 64)
    return model.embed_images(images), model.encode_text(["a red circle", "a small blue square on the left"])


def test_random_init_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="core_clip"):
        model = core_clip.load("shapes-tiny", device="cpu")
    assert any("randomly initialised" in r.message for r in caplog.records)
    image_emb, text_emb = _embeddings(model)
    assert image_emb.shape == (3, model.embed_dim) and text_emb.shape == (2, model.embed_dim)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not image_emb.requires_grad
    state = torch.random.get_rng_state()
    again = core_clip.load("shapes-tiny", device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state), "loading must not consume the caller's RNG"
    assert torch.equal(_embeddings(again)[0], image_emb), "random init is seeded: same model on every load"


@pytest.mark.parametrize("layout", ["folder", "file.safetensors"])
def test_save_load_round_trip_gives_identical_embeddings(tiny_model, tmp_path, layout):
    path = tiny_model.save(tmp_path / layout)
    loaded = core_clip.load(str(path), device="cpu")
    for a, b in zip(_embeddings(tiny_model), _embeddings(loaded)):
        assert torch.equal(a, b)
    assert loaded.config.tokenizer == tiny_model.config.tokenizer


def test_pt_state_dict_with_arch_and_training_wrapper_loads(tiny_model, tmp_path):
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tiny_model.clip.state_dict().items()}}
    path = tmp_path / "epoch_3.pt"
    torch.save(wrapped, path)
    loaded = core_clip.load(str(path), device="cpu", arch="shapes-tiny")
    assert torch.equal(_embeddings(tiny_model)[0], _embeddings(loaded)[0])


def test_renamed_key_raises_strict_error_naming_both_keys(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m.safetensors")
    state = load_file(str(path))
    state["visual.ln_post.weight_renamed"] = state.pop("visual.ln_post.weight")
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        core_clip.load(str(path), device="cpu")
    message = str(err.value)
    assert "missing keys: visual.ln_post.weight" in message
    assert "unexpected keys: visual.ln_post.weight_renamed" in message


def test_shape_mismatch_is_reported(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m.safetensors")
    state = load_file(str(path))
    state["visual.proj"] = torch.zeros(3, 3)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"shape mismatches: visual.proj \(checkpoint \(3, 3\)"):
        core_clip.load(str(path), device="cpu")


def test_pickled_callable_is_refused(tiny_model, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_model.clip.state_dict(), "hook": os.system}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*pickled objects"):
        core_clip.load(str(path), device="cpu", arch="shapes-tiny")


def test_unknown_names_and_missing_files():
    with pytest.raises(ModelNotFoundError, match="did you mean ViT-B-32"):
        core_clip.load("ViT-B-33")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        core_clip.load("no/such/weights.safetensors")
    with pytest.raises(ModelNotFoundError, match="unknown pretrained tag 'nope'.*laion2b_s34b_b79k"):
        core_clip.load("ViT-B-32:nope")
    with pytest.raises(core_clip.CoreClipError, match="unknown precision"):
        core_clip.load("shapes-tiny", precision="int3")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty hub cache and an endpoint that refuses connections (a closed local port)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hub"


@pytest.mark.parametrize("name, repo", [("ViT-B-32:laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
                                        ("hf-hub:acme/clip-test", "acme/clip-test")])
def test_offline_pretrained_fails_fast_with_instructions(offline_hub, name, repo):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as err:
        core_clip.load(name, device="cpu")
    assert time.monotonic() - start < hub.PROBE_TIMEOUT_S + 2
    message = str(err.value)
    assert repo in message and "hf download" in message and str(offline_hub) in message


def test_hf_hub_name_loads_from_local_cache(offline_hub, tiny_model, tmp_path):
    snapshot = offline_hub / "models--acme--tiny" / "snapshots" / ("0" * 40)
    tiny_model.save(snapshot)
    (offline_hub / "models--acme--tiny" / "refs").mkdir()
    (offline_hub / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    loaded = core_clip.load("hf-hub:acme/tiny", device="cpu")
    assert torch.equal(_embeddings(tiny_model)[1], _embeddings(loaded)[1])


def test_truncated_text_path_matches_open_clip(tiny_model):
    texts = ["a red circle", "a small blue square on the left on a yellow background", "x"]
    tokens = tiny_model.tokenize(texts)
    with torch.no_grad():
        reference = F.normalize(tiny_model.clip.encode_text(tokens), dim=-1)
    assert torch.allclose(tiny_model.encode_text(texts), reference, atol=1e-6)


def test_grad_flag_controls_autograd(tiny_model):
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    assert not tiny_model.embed_images(images).requires_grad
    tiny_model.embed_images(images, grad=True).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_chunked_encoding_equals_one_batch(tiny_model):
    images = torch.rand(5, 3, 64, 64)
    assert torch.allclose(tiny_model.embed_images(images, batch_size=2), tiny_model.embed_images(images), atol=1e-6)


def test_bf16_precision_serves_float32_embeddings_close_to_fp32(tmp_path, tiny_model):
    path = tiny_model.save(tmp_path / "m")
    half = core_clip.load(str(path), device="cpu", precision="bf16")
    assert half.dtype == torch.bfloat16
    a, b = _embeddings(tiny_model)[0], _embeddings(half)[0]
    assert b.dtype == torch.float32
    assert (a * b).sum(-1).min() > 0.98


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither an open_clip model folder"):
        core_clip.load(str(tmp_path / "empty"))


def test_saved_files_get_the_usual_permissions(tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        path = tiny_model.save(tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert oct(path.with_suffix(".json").stat().st_mode & 0o777) == oct(0o644)


def test_training_forward_gives_open_clip_features_and_gradients(tiny_model):
    model = core_clip.load("shapes-tiny", device="cpu")
    pixels = torch.randn(3, 3, 64, 64)
    tokens = model.tokenize(["a red circle", "a small blue square on the left", "x"])

    def grads(forward):
        model.zero_grad()
        image, text, scale = forward()
        (scale * image @ text.T).log_softmax(-1).diagonal().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = grads(lambda: model(pixels, tokens))
    reference = grads(lambda: model.clip(pixels, tokens)[:3])
    assert ours.keys() == reference.keys()
    for name in ours:  # the same math on shorter sequences: fp32 sums differ only in order
        assert (ours[name] - reference[name]).norm() <= 1e-5 * reference[name].norm() + 1e-7, name


def _count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


def test_image_activation_replaces_every_relu_of_a_resnet_tower_and_round_trips(tmp_path):
    relu = core_clip.load("shapes-rn", device="cpu")
    path = relu.save(tmp_path / "rn.safetensors")
    config = json.loads(path.with_suffix(".json").read_text())
    assert "image_activation" not in config
    (tmp_path / "smooth.json").write_text(json.dumps({**config, "image_activation": "gelu"}))
    (tmp_path / "smooth.safetensors").write_bytes(path.read_bytes())
    smooth = core_clip.load(str(tmp_path / "smooth.safetensors"), device="cpu")

    relus = _count(relu.clip.visual, torch.nn.ReLU)
    assert relus > 0 and _count(smooth.clip.visual, torch.nn.ReLU) == 0
    assert _count(smooth.clip.visual, torch.nn.GELU) == relus
    seen = {}
    smooth.clip.visual.act1.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    (image, text), (image_relu, text_relu) = _embeddings(smooth), _embeddings(relu)
    assert torch.equal(seen["y"], F.gelu(seen["x"])) and (seen["x"] < 0).any()
    assert torch.equal(text, text_relu) and not torch.allclose(image, image_relu, atol=1e-3)

    again = core_clip.load(str(smooth.save(tmp_path / "again.safetensors")), device="cpu")
    assert again.config.image_activation == "gelu"
    assert torch.equal(_embeddings(again)[0], image)


def test_bad_image_activations_are_clear_errors(tmp_path, tiny_model):
    from core_clip.errors import CoreClipError
    from core_clip.model import replace_image_activation

    path = tiny_model.save(tmp_path / "m.safetensors")
    config = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**config, "image_activation": "tanh"}))
    with pytest.raises(CheckpointError, match="unknown image_activation 'tanh'"):
        core_clip.load(str(path))
    with pytest.raises(CoreClipError, match="has no ReLU to replace"):  # a ViT's MLPs are GELUs already
        replace_image_activation(tiny_model.clip, "gelu")
