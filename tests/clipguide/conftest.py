"""Fixtures for clipguide: a frozen random CLIP of ShapesWorld size (guidance freezes the models it is given)."""
import pytest
import torch

import core_clip
from clipguide import Perceptor
from clipguide.vqgan_model import VQGAN, VQGANConfig

# A VQGAN small enough for tests (taming's GroupNorm needs channels in multiples of 32); factor 2.
TINY_VQGAN = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
                  num_res_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope="session")
def perceptor() -> Perceptor:
    torch.manual_seed(0)
    return Perceptor(core_clip.load("shapes-tiny", device="cpu", seed=1))


@pytest.fixture(scope="session")
def model(perceptor):
    return perceptor.members[0].model


@pytest.fixture(scope="session")
def tiny_vqgan_path(tmp_path_factory):
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(ddconfig=TINY_VQGAN, n_embed=16, embed_dim=4)).save(tmp_path_factory.mktemp("vq") / "tiny")


def tiny_unet(prediction_type: str = "epsilon", sample_size: int = 16):
    """A random pixel-space UNet2DModel (2 levels, factor 2) and its DDPM scheduler."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return unet, DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def tiny_latent_model():
    """A random latent UNet2DModel (8 px latents, 4 channels) with an AutoencoderKL (factor 2) and a DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    from clipguide.generators.diffusion import DiffusionModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return DiffusionModel(unet, DDIMScheduler(), vae)


@pytest.fixture(scope="session")
def tiny_diffusion_path(tmp_path_factory):
    from clipguide.train_diffusion import save_pipeline

    path = tmp_path_factory.mktemp("diffusion") / "tiny"
    save_pipeline(*tiny_unet(), path)
    return path


@pytest.fixture(scope="session")
def backend_options(tiny_vqgan_path, tiny_diffusion_path):
    """Per-backend options that make every registered backend run in tests without shipped weights."""
    paths = {"vqgan": tiny_vqgan_path, "diffusion": tiny_diffusion_path}
    return lambda name: {"model": str(paths[name])} if name in paths else {}


@pytest.fixture
def crash_and_resume(tmp_path, monkeypatch):
    """``crash_and_resume(module, config_cls, crash_step, **config)`` trains ``module`` (a training script with
    ``train`` and ``shapes_batch``) straight into tmp_path/"straight", then into tmp_path/"resumed" with a crash as
    batch ``crash_step`` is drawn, then ``--resume`` there; returns the two folders."""
    def run(module, config_cls, crash_step: int, **config):
        module.train(config_cls(out=str(tmp_path / "straight"), **config))
        real_batch = module.shapes_batch

        def crash(step, *args):
            if step == crash_step:
                raise KeyboardInterrupt
            return real_batch(step, *args)

        monkeypatch.setattr(module, "shapes_batch", crash)
        with pytest.raises(KeyboardInterrupt):
            module.train(config_cls(out=str(tmp_path / "resumed"), **config))
        monkeypatch.setattr(module, "shapes_batch", real_batch)
        module.train(config_cls(out=str(tmp_path / "resumed"), resume=True, **config))
        return tmp_path / "straight", tmp_path / "resumed"
    return run
