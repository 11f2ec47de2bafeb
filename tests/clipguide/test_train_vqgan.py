"""The shipped VQGAN's training script: dead-code restarts and an exact resume after a crash."""
from dataclasses import replace

import pytest
import torch

from clipguide import train_vqgan
from clipguide.errors import ClipguideError
from clipguide.train_vqgan import (VQGANTrainConfig, _restart_dead_codes, blend_error, frame_error,
                                    outline_error, shape_blend_error, shape_outline_error, shapes_ddconfig,
                                    texture_error)
from clipguide.vqgan_model import VQGAN, VQGANConfig, latent_rows, load_vqgan
from core_clip import CheckpointError
from core_clip.checkpoint import read_state_dict


def test_dead_codes_move_onto_batch_latents_and_live_codes_stay():
    model = VQGAN(VQGANConfig(ddconfig=shapes_ddconfig(), n_embed=8, embed_dim=4))
    before = model.codebook.detach().clone()
    usage = torch.tensor([5.0, 0.1, 2.0, 0.0, 1.0, 0.4, 3.0, 0.6])
    z = torch.randn(2, 4, 3, 3)
    _restart_dead_codes(model, z, usage, 0.5, torch.Generator().manual_seed(0))
    dead = usage.new_tensor([0, 1, 0, 1, 0, 1, 0, 0]).bool()
    latents = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(model.codebook[~dead], before[~dead])
    for code in model.codebook[dead]:
        assert (latents == code).all(dim=1).any()      # each restarted code is one of the batch's latents
    assert (usage[dead] == 1).all()


def test_a_crashed_run_resumes_exactly(crash_and_resume):
    straight, resumed = crash_and_resume(train_vqgan, VQGANTrainConfig, 4, steps=6, batch_size=2, save_every=3,
                                         restart_every=2, warmup=1, eval_images=0, full_steps=2, codes=16,
                                         texture=1.0, blend=1.0, outline=1.0, shape_blend=1.0,
                                         shape_outline=1.0)
    a, b = read_state_dict(straight / "vqgan.safetensors"), read_state_dict(resumed / "vqgan.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["quantize.embedding.weight"].shape == (16, 32)


def test_resume_refuses_changed_settings_and_a_missing_run(tmp_path, capsys):
    config = dict(steps=2, batch_size=2, save_every=1, warmup=1, eval_images=0)
    train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "run"), **config))
    changed = dict(config, steps=4)
    with pytest.raises(ClipguideError, match=r"other settings \(steps=2 -> 4\)"):
        train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "run"), resume=True, **changed))
    # where it writes and how often may change; the trajectory may not
    train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "run"), resume=True, **dict(config, save_every=2)))

    capsys.readouterr()
    assert train_vqgan.main(["--out", str(tmp_path / "none"), "--resume", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to resume" in err and "no state.pt" in err


def test_texture_error_is_blind_to_offsets_and_counts_each_step_twice():
    target = torch.zeros(1, 1, 3, 3)
    assert texture_error(target + 0.3, target) == 0
    bump = target.clone()
    bump[0, 0, 1, 1] = 0.6
    # the bump makes two of the six horizontal and two of the six vertical differences 0.6 in size
    torch.testing.assert_close(texture_error(bump, target), torch.tensor(2 * 2 * 0.6 / 6))


def test_blend_error_is_the_distance_from_the_segment_between_the_two_colours():
    bg, fg = torch.tensor([0.2, 0.3, 0.4]), torch.tensor([0.8, 0.1, 0.4])
    target = bg.view(1, 3, 1, 1).repeat(1, 1, 8, 8)
    target[0, :, 3:6, 3:6] = fg.view(3, 1, 1)
    target[0, :, 3, 6] = (bg + fg) / 2                       # an anti-aliased edge pixel
    floor = 1e-3                                             # sqrt(0 + 1e-6): every pixel on the segment
    torch.testing.assert_close(blend_error(target, target), torch.tensor(floor))
    along = target.clone()
    along[0, :, 0, 0] = bg + 0.3 * (fg - bg)                 # another blend: still on the segment
    torch.testing.assert_close(blend_error(along, target), torch.tensor(floor))
    off = target.clone()
    off[0, 2, 4, 4] += 0.3                                   # blue is the same in both colours: 0.3 off the segment
    beyond = target.clone()
    beyond[0, :, 4, 5] = fg + 0.5 * (fg - bg)                # past the shape colour: its distance from fg
    for image, distance in ((off, 0.3), (beyond, 0.5 * float((fg - bg).norm()))):
        expected = (63 * floor + (distance ** 2 + 1e-6) ** 0.5) / 64
        torch.testing.assert_close(blend_error(image, target), torch.tensor(expected))


def test_shape_blend_error_averages_over_each_shape_and_its_rim():
    bg, fg = torch.tensor([0.2, 0.3, 0.4]), torch.tensor([0.8, 0.1, 0.4])
    target = bg.view(1, 3, 1, 1).repeat(2, 1, 8, 8)
    target[0, :, 3:5, 3:5] = fg.view(3, 1, 1)               # picture 0: a 2x2 shape, a 4x4 region with its rim
    target[1, :, 1:7, 1:7] = fg.view(3, 1, 1)               # picture 1: a 6x6 shape, the whole 8x8 picture
    floor = 1e-3                                             # sqrt(0 + 1e-6)
    torch.testing.assert_close(shape_blend_error(target, target), torch.tensor(floor))
    recon = target.clone()
    recon[:, 2, 2, 2] += 0.3                                 # on each rim, 0.3 off the segment (blue is shared)
    recon[0, 2, 7, 7] += 0.3                                 # outside picture 0's region: not counted
    per_picture = [(15 * floor + (0.09 + 1e-6) ** 0.5) / 16, (63 * floor + (0.09 + 1e-6) ** 0.5) / 64]
    torch.testing.assert_close(shape_blend_error(recon, target), torch.tensor(sum(per_picture) / 2))
    # the whole-picture mean weighs every error of picture 0 at 1/64, its rim error at a quarter of the above
    torch.testing.assert_close(blend_error(recon[:1], target[:1]), torch.tensor((62 * floor + 2 * 0.3) / 64),
                               atol=1e-5, rtol=0)


def test_outline_error_compares_sharpened_coverage_in_units_of_the_pictures_contrast():
    bg, fg = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.6, 0.5, 0.5])   # a low-contrast pair: 0.1 apart
    target = bg.view(1, 3, 1, 1).repeat(1, 1, 8, 8)
    target[0, :, 2:6, 2:6] = fg.view(3, 1, 1)
    assert outline_error(target, target) == 0
    recon = target.clone()
    recon[0, 0, 2, 2] = 0.57          # coverage 0.7 -> sharpened 0.9: 0.1 short of the target's 1
    recon[0, 0, 0, 0] = 0.52          # coverage 0.2 -> sharpened 0 (clamped), as the background's: no error
    recon[0, 0, 7, 7] = 0.545         # coverage 0.45 -> sharpened 0.4 where the target has 0
    recon[0, 1, 4, 4] = 0.9           # off the colour axis: coverage unchanged, no error
    torch.testing.assert_close(outline_error(recon, target), torch.tensor((0.1 + 0.4) / 64))
    # the same coverage errors on a pair ten times as far apart give the same value
    wide = target.clone()
    wide[0, 0] = 0.5 + (target[0, 0] - 0.5) * 10
    wide_recon = recon.clone()
    wide_recon[0, 0] = 0.5 + (recon[0, 0] - 0.5) * 10
    torch.testing.assert_close(outline_error(wide_recon, wide), torch.tensor((0.1 + 0.4) / 64))
    # a background pixel pushed far below the background still gets the gradient back towards it; one pushed to
    # coverage -0.5 where the target is background has no error and no gradient
    deep = target.clone()
    deep[0, 0, 3, 3] = 0.3            # inside the shape: coverage -2, sharpened clamped to 0, target 1
    deep[0, 0, 0, 1] = 0.45           # background: coverage -0.5 -> 0 = target
    deep.requires_grad_(True)
    outline_error(deep, target).backward()
    assert deep.grad[0, 0, 3, 3] < 0 and deep.grad[0, 0, 0, 1] == 0


def test_shape_outline_error_averages_the_outline_error_over_each_shape_and_its_rim():
    bg, fg = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.6, 0.5, 0.5])
    target = bg.view(1, 3, 1, 1).repeat(2, 1, 8, 8)
    target[0, :, 3:5, 3:5] = fg.view(3, 1, 1)               # picture 0: a 2x2 shape, a 4x4 region with its rim
    target[1, :, 1:7, 1:7] = fg.view(3, 1, 1)               # picture 1: a 6x6 shape, the whole 8x8 picture
    assert shape_outline_error(target, target) == 0
    recon = target.clone()
    recon[0, 0, 2, 2] = 0.545         # on picture 0's rim: coverage 0.45 -> sharpened 0.4 where the target has 0
    recon[1, 0, 0, 0] = 0.545         # the same on picture 1's rim
    recon[0, 0, 7, 7] = 0.545         # outside picture 0's region: not counted
    torch.testing.assert_close(shape_outline_error(recon, target), torch.tensor((0.4 / 16 + 0.4 / 64) / 2))
    # the whole-picture mean counts both errors of picture 0, each at 1/64
    torch.testing.assert_close(outline_error(recon[:1], target[:1]), torch.tensor(2 * 0.4 / 64))


def test_frame_error_is_the_mean_error_of_the_outer_frame_only():
    target = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert frame_error(target, target) == 0
    recon = target.clone()
    recon[0, 0, 0, 5] += 0.6     # in the 1-pixel frame
    recon[1, 2, 7, 7] -= 0.3     # in the frame (a corner)
    recon[0, 1, 3, 3] += 1.0     # inside: not counted
    # a 1-pixel frame of an 8 x 8 picture has 64 - 36 = 28 pixels, x 3 channels x 2 pictures
    torch.testing.assert_close(frame_error(recon, target, width=1), torch.tensor(0.9 / (28 * 3 * 2)))
    # the default 3-pixel frame leaves a 2 x 2 inside (rows and columns 3-4), which still holds (3, 3)
    torch.testing.assert_close(frame_error(recon, target), torch.tensor(0.9 / ((64 - 4) * 3 * 2)))
    recon.requires_grad_(True)
    frame_error(recon, target).backward()
    assert recon.grad[0, 1, 3, 3] == 0 and recon.grad[0, 0, 0, 5] > 0 and recon.grad[1, 2, 7, 7] < 0


def test_init_starts_from_a_saved_model_of_the_same_architecture(tmp_path, capsys):
    config = dict(steps=1, batch_size=2, warmup=1, eval_images=0, codes=16, restart_every=100)
    train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "a"), **config))
    saved = tmp_path / "a" / "vqgan.safetensors"
    train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "b"), init=str(saved), **dict(config, lr=0.0)))
    a, b = read_state_dict(saved), read_state_dict(tmp_path / "b" / "vqgan.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)     # lr 0: the run kept its starting weights
    with pytest.raises(CheckpointError, match="quantize.embedding.weight"):   # fewer codes than the init's
        train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "c"), init=str(saved), **dict(config, codes=8)))
    capsys.readouterr()
    assert train_vqgan.main(["--out", str(tmp_path / "d"), "--init", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint not found" in err


def test_init_with_a_smaller_codebook_grows_it(tmp_path):
    config = dict(steps=1, batch_size=2, warmup=1, eval_images=0, codes=16, restart_every=100)
    train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "a"), **config))
    saved = tmp_path / "a" / "vqgan.safetensors"
    before = read_state_dict(saved)
    old = before["quantize.embedding.weight"]
    grown = VQGAN(VQGANConfig(ddconfig=shapes_ddconfig(), n_embed=40, embed_dim=32))
    usage = torch.ones(40)
    train_vqgan._load_init(grown, str(saved), usage, torch.Generator().manual_seed(0))
    assert torch.equal(grown.codebook[:16], old)
    assert all((old == code).all(dim=1).any() for code in grown.codebook[16:])   # each new code copies an old one
    assert usage[:16].eq(1).all() and usage[16:].eq(0).all()
    after = grown.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "quantize.embedding.weight")
    # in a run, the first restart moves every new code onto a latent of its batch and leaves the old codes be
    train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "b"), init=str(saved),
                                       **dict(config, codes=40, steps=2, restart_every=1, lr=0.0)))
    codebook = read_state_dict(tmp_path / "b" / "vqgan.safetensors")["quantize.embedding.weight"]
    assert torch.equal(codebook[:16], old)
    assert not any((old == code).all(dim=1).any() for code in codebook[16:])


@pytest.mark.parametrize("factor", train_vqgan.FACTORS)
def test_the_factor_sets_the_latent_grid(factor):
    model = VQGAN(VQGANConfig(ddconfig=shapes_ddconfig(factor), n_embed=8, embed_dim=32))
    assert model.config.factor == factor
    with torch.no_grad():
        z = model.encode(torch.zeros(1, 3, 64, 64))
        assert z.shape == (1, 32, 64 // factor, 64 // factor)
        assert model.decode(model.quantize_st(z)[0]).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("argv, message", [
    (["--frame", "-1"], "--frame must be >= 0, got -1.0"),
    (["--texture", "nan"], "--texture must be >= 0, got nan"),
    (["--steps", "0"], "--steps must be > 0, got 0"),
    (["--lr=-1e-3"], "--lr must be >= 0, got -0.001"),
    (["--crop", "30"], "--crop must be a multiple of 4 from 4 to 64, got 30"),
    (["--crop", "128"], "--crop must be a multiple of 4 from 4 to 64, got 128"),
    (["--factor", "3"], "--factor must be one of 2, 4, 8, got 3"),
    (["--factor", "8", "--crop", "12"], "--crop must be a multiple of 8 from 8 to 64, got 12"),
    (["--steps", "5", "--continuous-steps", "6"], "--continuous-steps must be at most --steps (5), got 6"),
    (["--continuous-steps", "1", "--kmeans-pictures", "3"],
     "--kmeans-pictures 3 give 768 latents, fewer than the 1024 codes fitted to them"),
    (["--latent-noise", "0.3"], "--latent-noise applies only with --continuous-steps; set them too"),
    (["--decoder-only"], "--decoder-only applies only with --continuous-steps; set them too"),
    (["--continuous-steps", "1", "--latent-noise=-1"], "--latent-noise must be >= 0, got -1.0"),
    (["--kmeans-pictures", "0"], "--kmeans-pictures must be > 0, got 0"),
    (["--refill-rounds", "1"], "--refill-rounds applies only with --continuous-steps; set them too"),
    (["--kmeans-flat", "1.5"], "--kmeans-flat must be at most 1, got 1.5"),
    (["--kmeans-flat", "0"], "--kmeans-flat must be > 0, got 0.0"),
    (["--continuous-steps", "1", "--codes", "32768", "--kmeans-flat", "0.1"],
     "--kmeans-pictures 1024 with --kmeans-flat 0.1 give as few as 26214 latents, fewer than the 32768 codes fitted "
     "to them"),
    (["--continuous-steps", "1", "--refill-rounds", "1", "--refill-codes", "2000"],
     "--refill-codes must be at most --codes (1024) and the 262144 latents of --refill-pictures 1024, got 2000"),
    (["--continuous-steps", "1", "--code-dims", "8"],
     "--code-dims applies only to a codebook fitted after the last step; set --continuous-steps to --steps (3300)"),
    (["--steps", "5", "--continuous-steps", "5", "--code-dims", "33"],
     "--code-dims must be at most the 32 latent channels, got 33"),
    (["--code-dims=-1"], "--code-dims must be >= 0, got -1"),
    (["--kmeans-groups", "0"], "--kmeans-groups must be > 0, got 0"),
    (["--kmeans-groups", "2000"], "--kmeans-groups must be at most --codes (1024), got 2000"),
    (["--continuous-steps", "1", "--refill-rounds", "1", "--refill-pictures", "1"],
     "--refill-codes must be at most --codes (1024) and the 256 latents of --refill-pictures 1, got 2048"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert train_vqgan.main(["--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"python -m clipguide.train_vqgan: {message}"
    assert not (tmp_path / "run").exists()


TINY_RECIPE = ({"steps": 2}, {"steps": 4, "lr": 0.0, "texture": 1.0})


def test_a_recipe_chains_its_stages_and_writes_the_last_one(tmp_path, monkeypatch):
    monkeypatch.setitem(train_vqgan.RECIPES, "tiny", TINY_RECIPE)
    config = dict(batch_size=2, warmup=1, eval_images=0, codes=16, restart_every=100)
    train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "run"), recipe="tiny", **config))
    first, final = (read_state_dict(tmp_path / "run" / p) for p in ("stage1/vqgan.safetensors", "vqgan.safetensors"))
    assert all(torch.equal(first[k], final[k]) for k in first)   # stage 2 (lr 0) started from stage 1's weights
    fresh = VQGAN(VQGANConfig(ddconfig=shapes_ddconfig(), n_embed=16, embed_dim=32)).state_dict()
    assert not torch.equal(first["encoder.conv_in.weight"], fresh["encoder.conv_in.weight"])
    stage2 = torch.load(tmp_path / "run" / "stage2" / "state.pt", weights_only=True)
    assert stage2["step"] == 4 and stage2["settings"]["texture"] == 1.0 and stage2["settings"]["batch_size"] == 2
    assert stage2["settings"]["init"] == str(tmp_path / "run" / "stage1" / "vqgan.safetensors")


def test_a_recipe_killed_in_its_second_stage_resumes_exactly(crash_and_resume, monkeypatch):
    monkeypatch.setitem(train_vqgan.RECIPES, "tiny", ({"steps": 2}, {"steps": 4, "texture": 1.0, "seed": 1}))
    # batch 3 is drawn only in stage 2, after its step-2 checkpoint
    straight, resumed = crash_and_resume(train_vqgan, VQGANTrainConfig, 3, recipe="tiny", batch_size=2, save_every=2,
                                         warmup=1, eval_images=0, codes=16, restart_every=100)
    a, b = read_state_dict(straight / "vqgan.safetensors"), read_state_dict(resumed / "vqgan.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "shapes", "--steps", "5"], "--recipe shapes sets --steps itself; leave it out"),
    (["--recipe", "shapes", "--seed", "3", "--lr", "1"], "--recipe shapes sets --lr, --seed itself; leave them out"),
    (["--recipe", "imagenet"], "--recipe must be one of shapes, shapes-13, got 'imagenet'"),
])
def test_bad_recipe_settings_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert train_vqgan.main(["--out", str(tmp_path / "run"), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"python -m clipguide.train_vqgan: {message}"
    assert not (tmp_path / "run").exists()


def test_resuming_a_recipe_that_never_started_exits_2(tmp_path, capsys):
    assert train_vqgan.main(["--out", str(tmp_path / "run"), "--recipe", "shapes", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to resume" in err and "no stage has a state.pt" in err
    assert not (tmp_path / "run").exists()


def test_picture_terms_apply_to_whole_pictures_only(tmp_path):
    """A crop's edge is no background, so the terms that read one there are off on crop steps: with crops only,
    a blend weight changes nothing; with whole pictures it changes the run."""
    config = dict(steps=2, batch_size=2, warmup=1, eval_images=0, codes=16, restart_every=100, crop=32)

    def weights(name: str, **settings) -> dict:
        train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / name), **dict(config, **settings)))
        return read_state_dict(tmp_path / name / "vqgan.safetensors")

    plain, blended = weights("plain", full_steps=0), weights("blended", full_steps=0, blend=5.0, frame=5.0)
    assert all(torch.equal(plain[k], blended[k]) for k in plain)
    whole, whole_blended = weights("whole", full_steps=1), weights("whole-blended", full_steps=1, blend=5.0)
    assert not torch.equal(whole["decoder.conv_out.weight"], whole_blended["decoder.conv_out.weight"])
    textured = weights("textured", full_steps=0, texture=5.0)    # texture is local: it counts on crops too
    assert not torch.equal(plain["decoder.conv_out.weight"], textured["decoder.conv_out.weight"])


def test_kmeans_finds_the_means_of_separated_clusters():
    points = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 10.0], [10.0, 12.0], [10.0, 11.0]])
    for seed in range(5):   # whichever two points it starts from, even both in one cluster
        centroids = train_vqgan.kmeans(points, 2, 5, torch.Generator().manual_seed(seed))
        assert sorted(centroids.tolist()) == [[0.0, 1.0], [10.0, 11.0]]
    # a point's own cluster: k = N gives the points back
    assert sorted(train_vqgan.kmeans(points, 5, 3, torch.Generator()).tolist()) == sorted(points.tolist())


def test_kmeans_moves_an_empty_centroid_onto_a_point():
    points = torch.tensor([[0.0, 0.0]] * 4 + [[3.0, 4.0]])
    seed = next(s for s in range(100) if (torch.randperm(5, generator=torch.Generator().manual_seed(s))[:2] < 4).all())
    # this seed starts both centroids on copies of (0, 0): the tie leaves the second without points, and it moves
    # onto random points until it lands on (3, 4) (60 draws miss it with probability 0.8^60)
    centroids = train_vqgan.kmeans(points, 2, 60, torch.Generator().manual_seed(seed))
    assert sorted(centroids.tolist()) == [[0.0, 0.0], [3.0, 4.0]]


@pytest.mark.parametrize("steps, quantised", [(3, [2]), (2, [])])
def test_continuous_steps_end_with_a_kmeans_codebook_of_fresh_latents(tmp_path, monkeypatch, steps, quantised):
    """The first --continuous-steps decode the encoder's latents as they are (no codebook); then the codebook
    becomes the k-means centroids of the latents of --kmeans-pictures pictures the run never trains on. When they
    are all the steps, the codebook is fitted after the last one."""
    config = dict(batch_size=2, warmup=1, eval_images=0, codes=16, restart_every=100, kmeans_pictures=2, seed=3)
    seen = []
    real_quantize = VQGAN.quantize_st
    monkeypatch.setattr(VQGAN, "quantize_st", lambda self, z: seen.append(len(z)) or real_quantize(self, z))
    torch.manual_seed(3)
    start = VQGAN(VQGANConfig(ddconfig=shapes_ddconfig(), n_embed=16, embed_dim=32))
    train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "run"), steps=steps, continuous_steps=2, lr=0.0, **config))
    assert seen == quantised                            # the batches (of 2) of the steps after the continuous two
    with torch.no_grad():
        pictures = train_vqgan.shapes_batch(steps, 2, 64, 3)   # batch "steps + 0": after the run's last
        latents = start.encode(pictures).permute(0, 2, 3, 1).reshape(-1, 32)
    expected = train_vqgan.kmeans(latents, 16, train_vqgan.KMEANS_ITERATIONS, torch.Generator().manual_seed(3))
    trained = read_state_dict(tmp_path / "run" / "vqgan.safetensors")
    assert torch.equal(trained["quantize.embedding.weight"], expected)
    fresh = start.state_dict()
    assert all(torch.equal(trained[k], fresh[k]) for k in fresh if k != "quantize.embedding.weight")   # lr 0


def test_decoder_only_steps_leave_the_encoder_and_the_fitted_codebook_as_they_were(tmp_path, monkeypatch):
    at_fit = {}
    real_fit = train_vqgan._fit_codebook

    def fit(model, *args):
        model = real_fit(model, *args)
        at_fit.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(train_vqgan, "_fit_codebook", fit)
    model = train_vqgan.train(VQGANTrainConfig(
        out=str(tmp_path / "run"), steps=4, continuous_steps=2, decoder_only=True, batch_size=2, warmup=1,
        eval_images=0, codes=16, kmeans_pictures=1, restart_every=1, dead_usage=2.0, full_steps=4, blend=1.0))
    trained = model.state_dict()
    kept = [k for k in trained if not k.startswith(("decoder.", "post_quant_conv."))]
    assert "quantize.embedding.weight" in kept and any(k.startswith("encoder.") for k in kept)
    # restarts (every step, and any code picked less than twice counts as dead) would have moved codes
    assert all(torch.equal(trained[k], at_fit[k]) for k in kept)
    assert not torch.equal(trained["decoder.conv_out.weight"], at_fit["decoder.conv_out.weight"])
    assert not torch.equal(trained["post_quant_conv.weight"], at_fit["post_quant_conv.weight"])


@pytest.mark.parametrize("crash_step", [4, 5])
def test_a_run_killed_at_the_codebook_fit_resumes_exactly(crash_and_resume, crash_step):
    # the fit draws batch "steps + 0" (4) for k-means and "steps + 1" (5) for its refill round after step 2's update
    # and before its checkpoint: the crash comes in the fit, and the run resumes from step 1's checkpoint
    straight, resumed = crash_and_resume(train_vqgan, VQGANTrainConfig, crash_step, steps=4, continuous_steps=2,
                                         kmeans_pictures=1, refill_rounds=1, refill_pictures=1, refill_codes=4,
                                         batch_size=2, save_every=1, restart_every=1, warmup=1, eval_images=0,
                                         full_steps=4, codes=16, blend=1.0, latent_noise=0.5)
    a, b = read_state_dict(straight / "vqgan.safetensors"), read_state_dict(resumed / "vqgan.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_edge_patches_flag_the_patches_whose_pixels_span_more_than_the_edge_range():
    x = torch.full((2, 3, 8, 12), -0.5)
    x[0, 1, 5, 2] += 0.2             # picture 0: one pixel in patch (row 1, column 0) of its 2 x 3 grid of 4 px
    x[1, 0, 0:4, 10:12] += 0.05      # picture 1: patch (0, 2) changes, but by less than the edge range
    x[1, 2, 7, 11] = 1.0             # and patch (1, 2) holds a bright corner
    flags = train_vqgan.edge_patches(x, 4)
    assert flags.tolist() == [False, False, False, True, False, False] + [False, False, False, False, False, True]
    assert train_vqgan.edge_patches(x, 2).sum() == 2  # the same two pixels, in 2 px patches


def test_kmeans_flat_keeps_every_edge_latent_and_a_share_of_the_flat_ones(tmp_path, monkeypatch):
    fitted = []
    monkeypatch.setattr(train_vqgan, "kmeans", lambda points, *args: fitted.append(points) or points[:args[0]])
    torch.manual_seed(3)
    start = VQGAN(VQGANConfig(ddconfig=shapes_ddconfig(), n_embed=16, embed_dim=32))
    train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "run"), steps=1, continuous_steps=1, lr=0.0, batch_size=2,
                                       warmup=1, eval_images=0, codes=16, kmeans_pictures=4, kmeans_flat=0.2, seed=3))
    with torch.no_grad():
        pictures = train_vqgan.shapes_batch(1, 4, 64, 3)
        latents = start.encode(pictures).permute(0, 2, 3, 1).reshape(-1, 32)
    edges = train_vqgan.edge_patches(pictures, 4)
    points = fitted[0]
    kept = (points[:, None] == latents[None]).all(-1)       # [kept, all]: which latent each point is
    assert kept.any(1).all() and (kept.sum(0) <= 1).all()    # the points are latents, each at most once
    kept = kept.any(0)
    assert kept[edges].all()                                 # every edge patch's latent
    flat_share = kept[~edges].float().mean().item()
    assert 0 < edges.sum() < len(edges) and 0.1 < flat_share < 0.3   # and about a fifth of the flat ones


def test_refill_moves_the_least_used_codes_onto_the_worst_served_latents():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    seen = torch.tensor([[0.1, 0.0], [-0.2, 0.0], [0.0, 0.3], [1.1, 0.0], [0.9, 0.1], [9.0, 0.0]])  # uses 3, 2, 1, 0
    fresh = torch.tensor([[0.1, 0.0], [5.0, 5.0], [30.0, 0.0], [10.0, 0.2]])   # squared errors 0.01, 41, 100, 0.04
    refilled = train_vqgan.refill(codebook, seen, fresh, 2)
    assert refilled.tolist() == [[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [30.0, 0.0]]
    assert codebook[3].tolist() == [20.0, 0.0]                  # the input is left as it was
    # among equally used codes the lower index moves first; the farthest latent goes to the least-used code
    refilled = train_vqgan.refill(codebook, torch.tensor([[0.0, 0.0], [20.0, 0.0]]), fresh, 1)
    assert refilled.tolist() == [[0.0, 0.0], [30.0, 0.0], [10.0, 0.0], [20.0, 0.0]]


def test_refill_rounds_follow_the_kmeans_fit_with_more_fresh_pictures(tmp_path):
    """Round r refills the k-means codebook from the pictures of batch "steps + 1 + r", counting the use of each
    code over the k-means pictures and every earlier round's."""
    torch.manual_seed(3)
    start = VQGAN(VQGANConfig(ddconfig=shapes_ddconfig(), n_embed=16, embed_dim=32))
    train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "run"), steps=2, continuous_steps=2, lr=0.0, batch_size=2,
                                       warmup=1, eval_images=0, codes=16, kmeans_pictures=1, refill_rounds=2,
                                       refill_pictures=1, refill_codes=4, seed=3))
    with torch.no_grad():
        latents = [start.encode(train_vqgan.shapes_batch(2 + i, 1, 64, 3)).permute(0, 2, 3, 1).reshape(-1, 32)
                   for i in range(3)]
    expected = train_vqgan.kmeans(latents[0], 16, train_vqgan.KMEANS_ITERATIONS, torch.Generator().manual_seed(3))
    expected = train_vqgan.refill(expected, latents[0], latents[1], 4)
    expected = train_vqgan.refill(expected, torch.cat(latents[:2]), latents[2], 4)
    trained = read_state_dict(tmp_path / "run" / "vqgan.safetensors")["quantize.embedding.weight"]
    assert torch.equal(trained, expected)
    moved = (trained != train_vqgan.kmeans(latents[0], 16, train_vqgan.KMEANS_ITERATIONS,
                                           torch.Generator().manual_seed(3))).any(dim=1)
    assert 4 <= moved.sum() <= 8                       # two rounds of four (a code may move twice)


def test_shares_split_the_codes_in_proportion_by_largest_remainders():
    assert train_vqgan._shares(torch.tensor([5, 3, 2]), 4).tolist() == [2, 1, 1]    # 2.0, 1.2, 0.8
    assert train_vqgan._shares(torch.tensor([1, 1, 1]), 2).tolist() == [1, 1, 0]    # ties: the lower index first
    assert train_vqgan._shares(torch.tensor([7, 0, 3]), 10).tolist() == [7, 0, 3]
    counts = torch.randint(0, 50, (200,), generator=torch.Generator().manual_seed(0))
    shares = train_vqgan._shares(counts, 1000)
    assert shares.sum() == 1000 and (shares <= counts).all()
    assert ((shares - counts * 1000 / counts.sum()).abs() < 1).all()


def sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    return torch.tensor(sorted(rows.tolist()))


def test_grouped_kmeans_splits_the_codes_between_coarse_groups_by_their_points():
    # two far groups: 6 points in three tight pairs near the origin, 2 points far away; 4 codes go 3 : 1
    points = torch.tensor([[0.0, 0.0], [0.0, 0.2], [0.0, 3.0], [0.0, 3.2], [3.0, 0.0], [3.2, 0.0],
                           [100.0, 0.0], [100.0, 0.4]])
    for seed in range(5):   # whichever points the coarse k-means starts from
        centroids = sorted_rows(train_vqgan.grouped_kmeans(points, 4, 2, 8, torch.Generator().manual_seed(seed)))
        assert (centroids[:3, 0] < 5).all() and torch.allclose(centroids[3], torch.tensor([100.0, 0.2]))
    # within a group it is Lloyd's k-means, local minima and all: from seed 0's starts it finds the three pairs
    centroids = train_vqgan.grouped_kmeans(points, 4, 2, 8, torch.Generator().manual_seed(0))
    assert torch.allclose(sorted_rows(centroids), torch.tensor([[0.0, 0.1], [0.0, 3.1], [3.1, 0.0], [100.0, 0.2]]))
    # a group too small for a share of the codes gets none; its points are left to the nearest other group's codes
    lonely = torch.cat([points[:6], torch.tensor([[100.0, 0.0]])])
    centroids = train_vqgan.grouped_kmeans(lonely, 3, 2, 8, torch.Generator().manual_seed(0))
    assert torch.allclose(sorted_rows(centroids), torch.tensor([[0.0, 0.1], [0.0, 3.1], [3.1, 0.0]]))


def test_principal_axes_match_the_singular_vectors():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 6, generator=g) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]) @ torch.linalg.qr(
        torch.randn(6, 6, generator=g))[0] + 7
    mean, axes = train_vqgan.principal_axes(rows, 3)
    reference = torch.linalg.svd(rows - rows.mean(0), full_matrices=False).Vh[:3]
    assert torch.allclose(mean, rows.mean(0))
    assert torch.allclose((axes * reference).sum(1).abs(), torch.ones(3), atol=1e-4)   # the same axes, up to sign
    assert torch.allclose(axes @ axes.T, torch.eye(3), atol=1e-5)


def test_a_folded_vqgan_codes_the_projected_latents_and_decodes_them_as_the_original_would():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(ddconfig=shapes_ddconfig(), n_embed=16, embed_dim=32)).eval()
    x = train_vqgan.shapes_batch(0, 2, 64, 0)
    with torch.no_grad():
        z = model.encode(x)
        mean, axes = train_vqgan.principal_axes(latent_rows(z), 5)
        folded = train_vqgan.fold_projection(model, mean, axes)
        assert folded.config.embed_dim == 5 and folded.codebook.shape == (16, 5)
        coordinates = folded.encode(x)
        assert torch.allclose(latent_rows(coordinates), (latent_rows(z) - mean) @ axes.T, atol=1e-5)
        in_span = (latent_rows(coordinates) @ axes + mean).reshape(2, 16, 16, 32).permute(0, 3, 1, 2)
        assert torch.allclose(folded.decode(coordinates), model.decode(in_span), atol=1e-4)
        # quantised: the folded model's codes, lifted into the original space, serve the original the same way
        model.codebook.copy_(folded.codebook @ axes + mean)
        assert torch.equal(folded.quantize_st(coordinates)[2], model.quantize_st(z)[2])
        assert torch.allclose(folded(x)[0], model(x)[0], atol=1e-4)
        # in units of 1 / scale: the coordinates scale, the pictures stay
        quarter = train_vqgan.fold_projection(model, mean, axes, scale=0.25)
        assert torch.allclose(quarter.encode(x), coordinates * 0.25, atol=1e-5)
        assert torch.allclose(quarter.codebook, folded.codebook * 0.25, atol=1e-5)
        assert torch.allclose(quarter.decode(coordinates * 0.25), folded.decode(coordinates), atol=1e-4)


def test_unit_scale_is_the_power_of_two_nearest_the_inverse_spread():
    unit = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])                 # spread 1 about the mean (0, 0)
    assert train_vqgan.unit_scale(unit * 62 + 5) == 1 / 64         # log2 62 = 5.95
    assert train_vqgan.unit_scale(unit * 3) == 1 / 4                # log2 3 = 1.58
    assert train_vqgan.unit_scale(unit * 0.3) == 4.0                # log2 0.3 = -1.74
    assert train_vqgan.unit_scale(unit) == 1.0


def test_code_dims_fold_the_run_and_fit_its_codes_in_groups(tmp_path):
    torch.manual_seed(3)
    start = VQGAN(VQGANConfig(ddconfig=shapes_ddconfig(), n_embed=16, embed_dim=32))
    config = VQGANTrainConfig(out=str(tmp_path / "run"), steps=2, continuous_steps=2, lr=0.0, batch_size=2, warmup=1,
                              eval_images=0, codes=16, kmeans_pictures=1, code_dims=4, kmeans_groups=3, seed=3)
    trained = train_vqgan.train(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():   # batch "steps + 0", as the k-means test above spells it out
        latents = train_vqgan._fresh_latents(start, config, 0, 1, generator)
    mean, axes = train_vqgan.principal_axes(latents, 4)
    coordinates = (latents - mean) @ axes.T
    coordinates = coordinates * train_vqgan.unit_scale(coordinates)
    expected = train_vqgan.grouped_kmeans(coordinates, 16, 3, train_vqgan.KMEANS_ITERATIONS, generator)
    saved = load_vqgan(str(tmp_path / "run" / "vqgan.safetensors"))
    assert saved.config.embed_dim == 4 and torch.equal(saved.codebook, expected)
    assert torch.equal(trained.codebook, expected)
    resumed = train_vqgan.train(replace(config, resume=True))      # a finished run resumes as its folded self
    assert torch.equal(resumed.codebook, expected)


def test_a_bf16_run_keeps_float32_weights_resumes_exactly_and_differs_from_fp32(crash_and_resume):
    config = dict(steps=4, batch_size=2, save_every=2, restart_every=1, warmup=1, eval_images=0, full_steps=2,
                  codes=16, blend=1.0)
    straight, resumed = crash_and_resume(train_vqgan, VQGANTrainConfig, 3, precision="bf16", **config)
    a, b = read_state_dict(straight / "vqgan.safetensors"), read_state_dict(resumed / "vqgan.safetensors")
    assert all(a[k].dtype == torch.float32 for k in a)      # autocast: the weights stay float32
    assert all(torch.equal(a[k], b[k]) for k in a)
    fp32 = train_vqgan.train(VQGANTrainConfig(out=str(straight.parent / "fp32"), **config)).state_dict()
    assert not torch.equal(fp32["decoder.conv_out.weight"], a["decoder.conv_out.weight"])
    with pytest.raises(ClipguideError, match=r"other settings \(precision='bf16' -> 'fp32'\)"):
        train_vqgan.train(VQGANTrainConfig(out=str(straight), resume=True, **config))


def test_a_compiled_run_trains_the_eager_runs_model(tmp_path):
    """torch.compile fuses the encoder's and decoder's kernels; the arithmetic is the same up to rounding."""
    config = dict(steps=2, batch_size=2, warmup=1, eval_images=0, full_steps=2, codes=16, restart_every=100, lr=1e-3)
    eager, fused = (train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / name), compile=name == "fused", **config))
                    for name in ("eager", "fused"))
    torch.manual_seed(0)                           # as the runs did before building theirs
    start = VQGAN(VQGANConfig(ddconfig=shapes_ddconfig(), n_embed=16, embed_dim=32)).state_dict()
    a, b = eager.state_dict(), fused.state_dict()
    moved = (torch.cat([(a[k] - start[k]).flatten() for k in start]),      # what two Adam steps changed
             torch.cat([(b[k] - a[k]).flatten() for k in start]))          # where the two runs part
    assert moved[0].norm() > 0.1                   # the comparison is of trained weights, not of two copies of one
    # rounding differs, and Adam turns a near-zero gradient's rounding into a full step of either sign: a few of the
    # weights part by 2 lr (1.2% of the update's norm measured); a step lost or wired wrongly parts by far more
    assert moved[1].norm() < 0.05 * moved[0].norm()


def test_training_batches_are_contiguous_nchw():
    # a channels-last batch carries its layout through every conv: the bf16 GroupNorm backward then runs ~4x slower
    x = train_vqgan.shapes_batch(0, 2, 64, 0)
    assert x.shape == (2, 3, 64, 64) and x.is_contiguous()


def test_latent_noise_is_scaled_by_each_channels_spread():
    z = torch.randn(64, 2, 16, 16) * torch.tensor([1.0, 10.0])[:, None, None] + 5
    assert train_vqgan._noisy(z, 0.0, torch.Generator()) is z
    noise = train_vqgan._noisy(z, 0.3, torch.Generator().manual_seed(0)) - z
    torch.testing.assert_close(noise.std(dim=(0, 2, 3)), 0.3 * z.std(dim=(0, 2, 3)), rtol=0.02, atol=0)
    # zero mean: within 5 standard errors (16,384 draws a channel)
    assert (noise.mean(dim=(0, 2, 3)).abs() / noise.std(dim=(0, 2, 3)) < 5 / 128).all()


def test_latent_noise_perturbs_the_continuous_steps_only(tmp_path, monkeypatch):
    """Noise on the latents that the decoder sees while there is no codebook (a stand-in for the quantisation error
    to come); the steps through the codebook decode its codes as they are."""
    scales = []
    real_noisy = train_vqgan._noisy
    monkeypatch.setattr(train_vqgan, "_noisy", lambda z, scale, g: scales.append(scale) or real_noisy(z, scale, g))
    config = dict(steps=3, continuous_steps=2, batch_size=2, warmup=1, eval_images=0, codes=16, kmeans_pictures=1,
                  restart_every=100, full_steps=3)
    plain = train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "plain"), **config)).state_dict()
    noisy = train_vqgan.train(VQGANTrainConfig(out=str(tmp_path / "noisy"), latent_noise=0.5, **config)).state_dict()
    assert scales == [0.0, 0.0, 0.5, 0.5]             # two continuous steps per run, none through the codebook
    assert not torch.equal(plain["decoder.conv_out.weight"], noisy["decoder.conv_out.weight"])
