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


@pytest.fixture(scope="session")
def backend_options(tiny_vqgan_path):
    """Per-backend options that make every registered backend run in tests without shipped weights."""
    return lambda name: {"model": str(tiny_vqgan_path)} if name == "vqgan" else {}
