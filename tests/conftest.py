"""Shared fixtures. Torch gets a fixed thread count: with 2 cores, intra-op threads otherwise fight each other."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

import core_clip

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model() -> core_clip.ClipModel:
    """A randomly initialised ShapesWorld-sized CLIP (fixed seed)."""
    torch.manual_seed(0)
    return core_clip.load("shapes-tiny", device="cpu")
