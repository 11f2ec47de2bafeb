"""The shipped diffusion model's training script: its loss weighting, an exact resume after a crash (fp32 and bf16),
and the settings a resume must keep."""
import pytest
import torch
from diffusers import DDPMPipeline

from clipguide import ClipguideError, train_diffusion
from clipguide.train_diffusion import DiffusionTrainConfig, v_loss_weight
from core_clip.checkpoint import read_state_dict


def test_v_loss_weight_makes_the_v_loss_the_floored_snr_weighted_x0_loss():
    torch.manual_seed(0)
    a = torch.rand(64, 1, 1, 1).clamp(1e-4, 1 - 1e-4)
    x_t, v, v_hat = torch.randn(3, 64, 3, 4, 4).unbind(0)
    x0 = lambda v_: a.sqrt() * x_t - (1 - a).sqrt() * v_      # x0 from x_t and a v prediction
    snr = a / (1 - a)
    for floor in (0.0, 0.1, 1.0):
        weighted_v = v_loss_weight(a, floor) * (v_hat - v).square()
        weighted_x0 = torch.maximum(snr, torch.tensor(floor)) * (x0(v_hat) - x0(v)).square()
        torch.testing.assert_close(weighted_v, weighted_x0, rtol=1e-4, atol=1e-6)
    assert v_loss_weight(torch.tensor(0.5), 0.1) == pytest.approx(0.5)      # SNR 1: 1 / (1 + 1)
    assert v_loss_weight(torch.tensor(0.01), 0.1) == pytest.approx(0.1 * 0.99)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_crashed_run_resumes_exactly(crash_and_resume, precision):
    straight, resumed = crash_and_resume(train_diffusion, DiffusionTrainConfig, 3, steps=4, batch_size=2,
                                         save_every=2, warmup=1, precision=precision)
    for name in ("unet.safetensors", "ema.safetensors"):
        a, b = read_state_dict(straight / name), read_state_dict(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    pipe = DDPMPipeline.from_pretrained(resumed / "pipeline", local_files_only=True)
    ema = read_state_dict(resumed / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in pipe.unet.state_dict().items())
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_bf16_autocast_changes_the_steps_and_a_resume_keeps_the_precision(tmp_path, capsys):
    config = dict(steps=2, batch_size=2, save_every=1, warmup=1)
    runs = {p: train_diffusion.train(DiffusionTrainConfig(out=str(tmp_path / p), precision=p, **config))
            for p in ("fp32", "bf16")}
    a, b = (dict(runs[p].named_parameters()) for p in ("fp32", "bf16"))
    assert all(b[k].dtype == torch.float32 for k in b)     # autocast: the weights stay float32
    assert not all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ClipguideError, match=r"other settings \(precision='fp32' -> 'bf16'\)"):
        train_diffusion.train(DiffusionTrainConfig(out=str(tmp_path / "fp32"), precision="bf16", resume=True,
                                                   **config))
    # a run saved before the setting existed ran at its default, fp32
    state = torch.load(tmp_path / "fp32" / "state.pt", weights_only=True)
    del state["settings"]["precision"]
    torch.save(state, tmp_path / "fp32" / "state.pt")
    with pytest.raises(ClipguideError, match="precision='fp32' -> 'bf16'"):
        train_diffusion.train(DiffusionTrainConfig(out=str(tmp_path / "fp32"), precision="bf16", resume=True,
                                                   **config))
    train_diffusion.train(DiffusionTrainConfig(out=str(tmp_path / "fp32"), resume=True, **dict(config, steps=2)))

    capsys.readouterr()
    assert train_diffusion.main(["--out", str(tmp_path / "x"), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--precision must be one of fp32, bf16, got 'fp16'" in err


@pytest.mark.parametrize("argv, message", [
    (["--snr-floor", "-0.1"], "--snr-floor must be >= 0, got -0.1"),
    (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["--lr", "inf"], "--lr must be >= 0, got inf"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1.0"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert train_diffusion.main(["--out", str(tmp_path / "run"), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"python -m clipguide.train_diffusion: {message}"
    assert not (tmp_path / "run").exists()
