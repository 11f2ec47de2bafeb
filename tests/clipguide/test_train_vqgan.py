"""The shipped VQGAN's training script: dead-code restarts and an exact resume after a crash."""
import pytest
import torch

from clipguide import train_vqgan
from clipguide.errors import ClipguideError
from clipguide.train_vqgan import SHAPES_DDCONFIG, VQGANTrainConfig, _restart_dead_codes
from clipguide.vqgan_model import VQGAN, VQGANConfig
from core_clip.checkpoint import read_state_dict


def test_dead_codes_move_onto_batch_latents_and_live_codes_stay():
    model = VQGAN(VQGANConfig(ddconfig=SHAPES_DDCONFIG, n_embed=8, embed_dim=4))
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
                                         restart_every=2, warmup=1, eval_images=0, full_steps=2, codes=16)
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
