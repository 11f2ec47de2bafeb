"""Fixtures for clipguide: a frozen random CLIP of ShapesWorld size (guidance freezes the models it is given)."""
import pytest
import torch

import core_clip
from clipguide import Perceptor


@pytest.fixture(scope="session")
def perceptor() -> Perceptor:
    torch.manual_seed(0)
    return Perceptor(core_clip.load("shapes-tiny", device="cpu", seed=1))


@pytest.fixture(scope="session")
def model(perceptor):
    return perceptor.members[0].model
