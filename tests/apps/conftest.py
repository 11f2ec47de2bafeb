"""Fixtures for the apps: a tiny random diffusion pipeline folder and a Text2Image app with small limits.

The handlers are tested on these; the end-to-end tests (test_e2e.py) serve the app over loopback.
"""
import time
from pathlib import Path

import pytest

from apps.text2image import Limits, Text2Image
from tests.clipguide.conftest import tiny_unet

# Small enough that every handler test runs in about a second on a 2-core CPU.
SMALL = dict(max_steps=20, max_size=64, max_batch=2, concurrency=1, queue_size=4)


@pytest.fixture(scope="session")
def tiny_diffusion_folder(tmp_path_factory) -> Path:
    """A random pixel-space DDPM pipeline (16 px, size multiple 2) saved as a diffusers folder."""
    from clipguide.train_diffusion import save_pipeline

    path = tmp_path_factory.mktemp("app-diffusion") / "tiny"
    save_pipeline(*tiny_unet(), path)
    return path


@pytest.fixture(scope="session")
def app(tiny_diffusion_folder) -> Text2Image:
    """The app over the tiny diffusion model and no VQGAN (so one backend is unavailable), previews after every
    step."""
    return Text2Image(Limits(**SMALL), diffusion_model=tiny_diffusion_folder,
                      vqgan_model="/nonexistent/vqgan.safetensors", preview_every=1)


def inputs(**overrides) -> dict:
    """Keyword inputs of Text2Image.generate (pixels, 16 px, few steps and cutouts), with overrides."""
    values = dict(prompt="a red circle on a blue background", negative="", backend="pixels", steps=3, size=16,
                  seed=0, random_seed=False, batch=1, cutn=2, cutouts="classic", lr=None, scale=None,
                  scheduler=None, clip=["shapes"], history=[], retries=None)
    values.update(overrides)
    return values


def wait_until(condition, timeout: float = 10.0) -> bool:
    """Poll ``condition()`` every 20 ms until it is true or ``timeout`` seconds have passed; its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
