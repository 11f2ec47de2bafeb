"""The taming VQGAN built without taming's training code: strict round trips, straight-through gradients, steering."""
import sys
import types

import pytest
import torch

from clipguide import ClipguideError, CLIPGuidance, taming_hub
from clipguide.generators.vqgan import (BLOB_SHARE, VQGANGenerator, blob_masks, onto_blend,
                                       start_pictures)
from clipguide.palettes import parse_palette
from clipguide.vqgan_model import VQGAN, VQGANConfig, load_vqgan, nearest_codes
from core_clip import CheckpointError

from .conftest import TINY_VQGAN as TINY


@pytest.fixture(scope="module")
def tiny_path(tiny_vqgan_path):
    return tiny_vqgan_path


def test_save_load_round_trip_is_exact(tiny_path):
    a, b = load_vqgan(tiny_path), load_vqgan(tiny_path)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(a(x)[0], b(x)[0])
    assert a.config.factor == 2 and not any(p.requires_grad for p in a.parameters())


def test_parameter_names_follow_taming(tiny_path):
    names = set(load_vqgan(tiny_path).state_dict())
    assert {"quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.weight",
            "encoder.conv_in.weight", "decoder.conv_out.weight"} <= names
    assert not any(n.startswith("loss.") for n in names)


def test_mismatched_config_is_a_strict_error(tiny_path, tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(tiny_path.read_bytes())
    wrong.with_suffix(".json").write_text(tiny_path.with_suffix(".json").read_text().replace('"n_embed": 16',
                                                                                             '"n_embed": 32'))
    with pytest.raises(CheckpointError, match="quantize.embedding.weight"):
        load_vqgan(wrong)


def test_unknown_names_and_kinds():
    with pytest.raises(ClipguideError, match="no VQGAN called 'nope'"):
        load_vqgan("nope")
    with pytest.raises(ClipguideError, match="kind"):
        VQGANConfig(ddconfig=TINY, kind="lfq")
    assert VQGAN(VQGANConfig(ddconfig=TINY, n_embed=16, embed_dim=4, kind="gumbel")).codebook.shape == (16, 4)


def test_quantisation_snaps_to_codes_and_passes_the_gradient_straight_through(tiny_path):
    vq = load_vqgan(tiny_path)
    z = torch.randn(1, 4, 3, 3, requires_grad=True)
    codes = vq.codebook
    z_q = vq.quantize_st(z)[0]
    nearest = torch.cdist(z.detach().permute(0, 2, 3, 1).reshape(-1, 4), codes).argmin(1)
    torch.testing.assert_close(z_q.detach().permute(0, 2, 3, 1).reshape(-1, 4), codes[nearest], atol=1e-6, rtol=0)
    weights = torch.randn(z_q.shape)
    (z_q * weights).sum().backward()
    assert torch.equal(z.grad, weights)  # d z_q / d z is the identity on the straight-through path


@pytest.mark.parametrize("autocast", [False, True])
def test_nearest_codes_is_the_brute_force_nearest_code_in_chunks(autocast):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(600, 8, generator=generator, requires_grad=True)      # 600 rows: two full chunks of 256, a part
    codes = torch.randn(300, 8, generator=generator)
    expected = (z.detach()[:, None] - codes[None]).square().sum(-1).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):    # the search stays in fp32
        assert torch.equal(nearest_codes(z, codes), expected)
    assert torch.equal(nearest_codes(z[:5], codes, chunk=2), expected[:5])


def test_generator_steers_latents_within_the_codebook_range(tiny_path, perceptor):
    backend = VQGANGenerator(2, 16, 16, generator=torch.Generator().manual_seed(0), model=str(tiny_path), lr=0.5)
    before = backend.decode().detach().clone()
    assert before.shape == (2, 3, 16, 16) and 0 <= before.min() and before.max() <= 1
    out = backend.sample(CLIPGuidance("a red circle", perceptor, cutn=2), 3, torch.Generator())
    assert not torch.equal(out, before)
    assert (backend.z >= backend.z_min).all() and (backend.z <= backend.z_max).all()


def test_generator_starts_from_the_encoded_init_image(tiny_path):
    vq = load_vqgan(tiny_path)
    init = torch.rand(1, 3, 16, 16)
    backend = VQGANGenerator(1, 16, 16, generator=torch.Generator(), init=init, model=str(tiny_path))
    expected = ((vq.decode(vq.quantize_st(vq.encode(init * 2 - 1))[0]) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(backend.decode(), expected)


def test_flat_start_encodes_one_seeded_colour_per_image(tiny_path):
    vq = load_vqgan(tiny_path)
    backend = VQGANGenerator(3, 16, 16, generator=torch.Generator().manual_seed(5), model=str(tiny_path),
                             start="flat")
    colours = torch.rand(3, 3, 1, 1, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(backend.z.detach(), vq.encode(colours.expand(3, 3, 16, 16) * 2 - 1))
    with pytest.raises(ClipguideError, match="start must be one of codes, flat, blob, got 'grey'"):
        VQGANGenerator(1, 16, 16, generator=torch.Generator(), model=str(tiny_path), start="grey")


def test_blob_masks_cover_a_fifth_of_each_picture_in_a_few_smooth_blobs():
    masks = blob_masks(4, 64, 48, torch.Generator().manual_seed(3))
    assert masks.shape == (4, 1, 64, 48) and set(masks.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(masks.mean(dim=(1, 2, 3)), torch.full((4,), BLOB_SHARE), atol=2 / (64 * 48), rtol=0)
    # smooth: a mask's outline (pixels whose right or lower neighbour differs) is a small part of its area
    edges = ((masks[..., :, 1:] != masks[..., :, :-1]).sum(dim=(1, 2, 3))
             + (masks[..., 1:, :] != masks[..., :-1, :]).sum(dim=(1, 2, 3)))
    assert (edges < 0.5 * masks.sum(dim=(1, 2, 3))).all()
    assert torch.equal(masks, blob_masks(4, 64, 48, torch.Generator().manual_seed(3)))
    assert not torch.equal(masks, blob_masks(4, 64, 48, torch.Generator().manual_seed(4)))


def test_blob_start_encodes_a_field_with_a_blob_of_two_seeded_colours(tiny_path):
    vq = load_vqgan(tiny_path)
    backend = VQGANGenerator(2, 16, 16, generator=torch.Generator().manual_seed(5), model=str(tiny_path),
                             start="blob")
    seeded = torch.Generator().manual_seed(5)
    colours = torch.rand(2, 2, 3, 1, 1, generator=seeded)                  # per image: background, blob
    mask = blob_masks(2, 16, 16, seeded)
    pictures = colours[:, 0] * (1 - mask) + colours[:, 1] * mask
    torch.testing.assert_close(backend.z.detach(), vq.encode(pictures * 2 - 1))


def test_palette_starts_offer_every_colour_and_every_ordered_pair():
    palette = parse_palette("#ff0000,#00ff00,#0000ff")
    flat, flat_colours = start_pictures("flat", palette, 2, 8, 8, torch.Generator())
    assert flat.shape == (2, 3, 3, 8, 8)
    torch.testing.assert_close(flat[1, :, :, 4, 4], palette)
    torch.testing.assert_close(flat_colours[1, :, 0], palette)
    blob, blob_colours = start_pictures("blob", palette, 2, 8, 8, torch.Generator().manual_seed(1))
    mask = blob_masks(2, 8, 8, torch.Generator().manual_seed(1))           # a palette start draws only the masks
    assert blob.shape == (2, 6, 3, 8, 8)
    inside, outside = mask[1, 0].nonzero()[0], (1 - mask[1, 0]).nonzero()[0]
    pairs = {(tuple(p[:, outside[0], outside[1]].tolist()), tuple(p[:, inside[0], inside[1]].tolist()))
             for p in blob[1]}
    colours = [tuple(c.tolist()) for c in palette]
    assert pairs == {(a, b) for a in colours for b in colours if a != b}
    assert [(tuple(a.tolist()), tuple(b.tolist())) for a, b in blob_colours[1]] == [
        (tuple(p[:, outside[0], outside[1]].tolist()), tuple(p[:, inside[0], inside[1]].tolist())) for p in blob[1]]


class _Redness:
    """A stand-in guidance whose CLIP score is an image's mean red channel."""

    @staticmethod
    def clip_score(images):
        return images[:, 0].mean(dim=(1, 2))


@pytest.mark.parametrize("blend", [False, True])
def test_a_palette_start_begins_from_the_candidate_the_clip_score_ranks_first(tiny_path, blend):
    """With blend, each candidate is ranked as the blend of its own pair, and the chosen pair is kept."""
    vq = load_vqgan(tiny_path)
    palette = parse_palette("#ff0000,#00ff00,#0000ff,#ffffff")
    backend = VQGANGenerator(2, 16, 16, generator=torch.Generator().manual_seed(2), model=str(tiny_path),
                             start="blob", palette=palette.mul(255).round().int().tolist(), blend=blend)
    pictures, colours = start_pictures("blob", palette, 2, 16, 16, torch.Generator().manual_seed(2))
    firsts, expected, expected_pairs = [], [], []
    with torch.no_grad():
        for image in range(2):
            latents = vq.encode(pictures[image] * 2 - 1)
            decoded = ((vq.decode(vq.quantize_st(latents)[0]) + 1) / 2).clamp(0, 1)
            scores = _Redness.clip_score(onto_blend(decoded, colours[image]) if blend else decoded)
            best = int(scores.argmax())
            assert best > 0                                           # the ranking changes the start
            firsts.append(latents[0])
            expected.append(latents[best])
            expected_pairs.append(colours[image, best])
    torch.testing.assert_close(backend.z.detach(), torch.stack(firsts))   # before the guidance is known
    with torch.no_grad():
        backend.choose_start(_Redness())
    torch.testing.assert_close(backend.z.detach(), torch.stack(expected))
    if blend:
        torch.testing.assert_close(backend.pair, torch.stack(expected_pairs))
    else:
        assert backend.pair is None


def test_a_palette_flat_start_encodes_the_palette_once_and_starts_every_image_from_its_best_field(tiny_path):
    vq = load_vqgan(tiny_path)
    palette = parse_palette("#00ff00,#ff0000,#0000ff")
    backend = VQGANGenerator(3, 16, 16, generator=torch.Generator(), model=str(tiny_path), start="flat",
                             palette="#00ff00,#ff0000,#0000ff")
    with torch.no_grad():
        latents = vq.encode(palette[:, :, None, None].expand(3, 3, 16, 16) * 2 - 1)
        decoded = ((vq.decode(vq.quantize_st(latents)[0]) + 1) / 2).clamp(0, 1)
    assert backend.candidates.shape == (1, *latents.shape)
    torch.testing.assert_close(backend.candidates[0], latents)
    torch.testing.assert_close(backend.z.detach(), latents[0].expand(3, -1, -1, -1))   # before the guidance is known
    best = int(_Redness.clip_score(decoded).argmax())
    assert best > 0                                                                    # the ranking changes the start
    with torch.no_grad():
        backend.choose_start(_Redness())
    torch.testing.assert_close(backend.z.detach(), latents[best].expand(3, -1, -1, -1))


def test_onto_blend_moves_each_pixel_to_its_nearest_point_on_the_segment():
    pairs = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],                 # red -> blue
                          [[0.2, 0.2, 0.2], [0.6, 0.6, 0.6]]])                # dark grey -> light grey
    images = torch.zeros(2, 3, 1, 3)
    images[0, :, 0, 0] = torch.tensor([0.5, 0.3, 0.5])    # t = 0.5: the green that no blend holds goes
    images[0, :, 0, 1] = torch.tensor([0.0, 0.5, 1.0])    # t = 1
    images[0, :, 0, 2] = torch.tensor([1.0, 1.0, 0.0])    # t = 0
    images[1, :, 0, 0] = torch.tensor([1.0, 1.0, 1.0])    # t = 2, clamped to the light grey
    images[1, :, 0, 1] = torch.tensor([0.0, 0.0, 0.0])    # t = -0.5, clamped to the dark grey
    images[1, :, 0, 2] = torch.tensor([0.5, 0.3, 0.4])    # t = (0.3 + 0.1 + 0.2) / 3 / 0.4 = 0.5
    expected = torch.tensor([[[0.5, 0.0, 0.5], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
                             [[0.6, 0.6, 0.6], [0.2, 0.2, 0.2], [0.4, 0.4, 0.4]]]).permute(0, 2, 1)[:, :, None]
    torch.testing.assert_close(onto_blend(images, pairs), expected)
    t = torch.rand(2, 1, 5, 5)                                                   # pictures made of blends stay
    blends = pairs[:, 0, :, None, None] + t * (pairs[:, 1] - pairs[:, 0])[:, :, None, None]
    torch.testing.assert_close(onto_blend(blends, pairs), blends)


def test_onto_blend_gradient_matches_finite_differences_and_leads_back_onto_the_segment():
    pairs = torch.tensor([[[0.9, 0.1, 0.2], [0.1, 0.3, 0.8]]], dtype=torch.double)
    inside = (pairs[:, 0, :, None, None] + 0.3 * (pairs[:, 1] - pairs[:, 0])[:, :, None, None]
              + 0.05 * torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.double))
    assert torch.autograd.gradcheck(lambda x: onto_blend(x, pairs), inside.requires_grad_())
    axis = (pairs[0, 1] - pairs[0, 0]).view(1, 3, 1, 1)
    beyond = (pairs[:, 1, :, None, None] + 0.1 * axis).requires_grad_()   # t = 1.1: past the second colour
    (onto_blend(beyond, pairs) * axis).sum().backward()                   # descending moves t down: allowed
    assert beyond.grad.abs().sum() > 0
    beyond.grad = None
    (-onto_blend(beyond, pairs) * axis).sum().backward()                  # descending would push t past 1: blocked
    assert beyond.grad.abs().sum() == 0


def test_blend_keeps_every_picture_on_the_blob_starts_two_colours(tiny_path):
    vq = load_vqgan(tiny_path)
    plain = VQGANGenerator(2, 16, 16, generator=torch.Generator().manual_seed(5), model=str(tiny_path),
                           start="blob")
    backend = VQGANGenerator(2, 16, 16, generator=torch.Generator().manual_seed(5), model=str(tiny_path),
                             start="blob", blend=True)
    colours = torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(5))   # per image: background, blob
    torch.testing.assert_close(backend.pair, colours)
    with torch.no_grad():
        torch.testing.assert_close(backend.decode(), onto_blend(plain.decode(), colours))
    assert plain.pair is None
    for start in ("codes", "flat"):                           # like palette, only a blob start has colours to keep
        other = VQGANGenerator(1, 16, 16, generator=torch.Generator(), model=vq, start=start, palette="shapes",
                               blend=True)
        assert other.pair is None
        with torch.no_grad():
            other.choose_start(_Redness())
            assert other.decode().shape == (1, 3, 16, 16)


def test_size_must_be_a_multiple_of_the_factor(tiny_path):
    with pytest.raises(ClipguideError, match="multiple of 2"):
        VQGANGenerator(1, 15, 16, generator=torch.Generator(), model=str(tiny_path))


# --- taming yaml + Lightning ckpt ---------------------------------------------------------------------------------

def _taming_yaml(path, target, config, first_stage=False):
    import yaml

    params = {"embed_dim": config.embed_dim, "n_embed": config.n_embed, "ddconfig": config.ddconfig,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}
    model = {"target": target, "params": params}
    if first_stage:
        model = {"target": "taming.models.cond_transformer.Net2NetTransformer",
                 "params": {"first_stage_config": model, "transformer_config": {"target": "x"}}}
    path.write_text(yaml.safe_dump({"model": model}))
    return path


@pytest.mark.parametrize("first_stage", [False, True])
def test_lightning_checkpoint_with_yaml_round_trips_exactly(tmp_path, first_stage):
    torch.manual_seed(1)
    source = VQGAN(VQGANConfig(ddconfig=TINY, n_embed=16, embed_dim=4))
    prefix = "first_stage_model." if first_stage else ""
    state = {prefix + k: v for k, v in source.state_dict().items()}
    state[prefix + "loss.discriminator.main.0.weight"] = torch.zeros(2)  # training-only keys are dropped
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100}, tmp_path / "m.ckpt")
    _taming_yaml(tmp_path / "m.yaml", "taming.models.vqgan.VQModel", source.config, first_stage)
    loaded = load_vqgan(tmp_path / "m.yaml")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded(x)[0], source.eval()(x)[0])


def test_gumbel_kind_comes_from_the_config_not_the_file_name(tmp_path):
    config = VQGANConfig(ddconfig=TINY, n_embed=16, embed_dim=8, kind="gumbel")
    source = VQGAN(config)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "vqgan_imagenet_f16.ckpt")
    _taming_yaml(tmp_path / "vqgan_imagenet_f16.yaml", "taming.models.vqgan.GumbelVQ", config)
    loaded = load_vqgan(tmp_path / "vqgan_imagenet_f16.yaml")
    assert loaded.config.kind == "gumbel"
    assert torch.equal(loaded.codebook, source.codebook)


def test_yaml_ckpt_mismatch_and_pickled_code_are_refused(tmp_path):
    source = VQGAN(VQGANConfig(ddconfig=TINY, n_embed=16, embed_dim=4))
    _taming_yaml(tmp_path / "m.yaml", "taming.models.vqgan.VQModel",
                 VQGANConfig(ddconfig=TINY, n_embed=32, embed_dim=4))
    torch.save({"state_dict": source.state_dict()}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="quantize.embedding.weight"):
        load_vqgan(tmp_path / "m.yaml")
    _taming_yaml(tmp_path / "m.yaml", "taming.models.vqgan.VQModel", source.config)
    torch.save({"state_dict": source.state_dict(), "callback": print}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="refusing"):
        load_vqgan(tmp_path / "m.yaml")


def test_imagenet_f16_architecture_decodes_256px_and_backpropagates():
    from clipguide.vqgan_model import TAMING_CONFIGS

    torch.manual_seed(0)
    model = VQGAN(TAMING_CONFIGS["imagenet-f16-16384"]).requires_grad_(False)
    z = (0.1 * torch.randn(1, 256, 16, 16)).requires_grad_(True)
    image = model.decode(model.quantize_st(z)[0])
    assert image.shape == (1, 3, 256, 256)
    image.square().mean().backward()
    assert z.grad.isfinite().all() and z.grad.abs().sum() > 0


# --- published Lightning checkpoints and named public models --------------------------------------------------------

def _save_like_lightning(path, payload, monkeypatch, classes):
    """torch.save ``payload(classes)`` while importable stand-ins for Lightning's classes exist (dotted name ->
    base type), as Lightning pickles them into its checkpoints; the modules are gone again afterwards."""
    made = {}
    with monkeypatch.context() as m:
        for dotted, base in classes.items():
            module, name = dotted.rsplit(".", 1)
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                if ".".join(parts[:i]) not in sys.modules:
                    m.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
            cls = type(name, (base,), {"__module__": module})
            setattr(sys.modules[module], name, cls)
            made[name] = cls
        torch.save(payload(made), path)
    assert "pytorch_lightning" not in sys.modules


def test_published_lightning_checkpoint_with_callback_classes_loads(tmp_path, monkeypatch):
    source = VQGAN(VQGANConfig(ddconfig=TINY, n_embed=16, embed_dim=4))

    def payload(c):  # the layout of the published taming ckpts (Lightning 1.0)
        return {"state_dict": source.state_dict(), "epoch": 3, "global_step": 100,
                "callbacks": {c["ModelCheckpoint"]: {"best_model_score": torch.tensor(0.5), "best_model_path": "x"}},
                "hyper_parameters": c["AttributeDict"](lr=4.5e-6)}

    _save_like_lightning(tmp_path / "m.ckpt", payload, monkeypatch, {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": object,
        "pytorch_lightning.utilities.parsing.AttributeDict": dict})
    with pytest.raises(Exception, match="ModelCheckpoint"):  # what a plain weights-only load says
        torch.load(tmp_path / "m.ckpt", weights_only=True)
    _taming_yaml(tmp_path / "m.yaml", "taming.models.vqgan.VQModel", source.config)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(load_vqgan(tmp_path / "m.yaml")(x)[0], source.eval()(x)[0])


def test_lightning_classes_outside_the_allow_list_are_refused(tmp_path, monkeypatch):
    source = VQGAN(VQGANConfig(ddconfig=TINY, n_embed=16, embed_dim=4))
    _save_like_lightning(tmp_path / "m.ckpt", lambda c: {"state_dict": source.state_dict(), "trainer": c["Trainer"]()},
                         monkeypatch, {"pytorch_lightning.trainer.trainer.Trainer": object})
    _taming_yaml(tmp_path / "m.yaml", "taming.models.vqgan.VQModel", source.config)
    with pytest.raises(CheckpointError, match="refusing.*Trainer"):
        load_vqgan(tmp_path / "m.yaml")


@pytest.fixture
def published_tiny(tmp_path, monkeypatch):
    """A tiny taming model published at file:// URLs under the name "tiny", and an empty cache folder."""
    source = VQGAN(VQGANConfig(ddconfig=TINY, n_embed=16, embed_dim=4))
    torch.save({"state_dict": source.state_dict()}, tmp_path / "last.ckpt")
    _taming_yaml(tmp_path / "model.yaml", "taming.models.vqgan.VQModel", source.config)
    monkeypatch.setitem(taming_hub.TAMING_CHECKPOINTS, "tiny", taming_hub.TamingCheckpoint(
        (tmp_path / "model.yaml").as_uri(), (tmp_path / "last.ckpt").as_uri()))
    monkeypatch.setenv("CLIPGUIDE_CACHE", str(tmp_path / "cache"))
    return source


def test_named_public_model_is_fetched_once_then_loads_offline(published_tiny, tmp_path, monkeypatch):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(load_vqgan("tiny")(x)[0], published_tiny.eval()(x)[0])
    assert sorted(p.name for p in (tmp_path / "cache" / "taming").iterdir()) == ["tiny.ckpt", "tiny.yaml"]
    (tmp_path / "last.ckpt").unlink()  # the host is gone: the cached copy is used without asking it
    monkeypatch.setattr("core_clip.hub.hub_reachable", lambda url=None: pytest.fail("network probed"))
    assert torch.equal(load_vqgan("tiny")(x)[0], published_tiny.eval()(x)[0])


def test_named_public_model_offline_says_which_file_goes_where(published_tiny, tmp_path, capsys, monkeypatch):
    from clipguide.cli import main
    from core_clip import WeightsUnavailableError

    monkeypatch.setattr("core_clip.hub.hub_reachable", lambda url=None: False)
    with pytest.raises(WeightsUnavailableError) as error:
        load_vqgan("tiny")
    cache = tmp_path / "cache" / "taming"
    for url, path in ((tmp_path / "model.yaml").as_uri(), cache / "tiny.yaml"), \
                     ((tmp_path / "last.ckpt").as_uri(), cache / "tiny.ckpt"):
        assert f"download {url} to {path}" in str(error.value)
    assert not cache.exists() or not any(cache.iterdir())
    code = main(["generate", "a red circle", "--backend", "vqgan", "--model", "imagenet-f16-16384",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "imagenet-f16-16384" in err


def test_unknown_vqgan_name_lists_shipped_and_public_names():
    with pytest.raises(ClipguideError, match="public: imagenet-f16-1024, imagenet-f16-16384, gumbel-f8"):
        load_vqgan("nonesuch")
