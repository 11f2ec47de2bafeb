"""The shipped diffusion model's training script: its loss weighting and an exact resume after a crash."""
import pytest
import torch
from diffusers import DDPMPipeline

from clipguide import train_diffusion
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


def test_a_crashed_run_resumes_exactly(crash_and_resume):
    straight, resumed = crash_and_resume(train_diffusion, DiffusionTrainConfig, 3, steps=4, batch_size=2,
                                         save_every=2, warmup=1)
    for name in ("unet.safetensors", "ema.safetensors"):
        a, b = read_state_dict(straight / name), read_state_dict(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    pipe = DDPMPipeline.from_pretrained(resumed / "pipeline", local_files_only=True)
    ema = read_state_dict(resumed / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in pipe.unet.state_dict().items())
    assert pipe.scheduler.config.prediction_type == "v_prediction"
