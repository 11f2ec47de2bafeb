"""Recipes: the settings that steer one CLIP model's backend best, as its authors measured them.

A backend's own defaults have to suit every CLIP; the best settings for one model do not. The shipped ``shapes`` CLIP,
say, paints readable ShapesWorld pictures with ``pixels`` only on a coarse grid of ShapesWorld's colours, under a
diffusion prior, with retries judged by a denoiser; a ViT-B-32 would be crippled by that palette. So a recipe is
registered per (CLIP model name, backend) and :func:`clipguide.guide` fills every setting its caller leaves unset
from the recipe of its (single) CLIP model and backend. ``recipe=None`` turns that off; a :class:`Recipe` passed as
``recipe`` is used instead of the registered one. Registering one for your own model::

    RECIPES.register("my-clip/fourier")(Recipe(steps=400, guidance={"cutn": 32}))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import ClipguideError
from .registry import Registry


@dataclass(frozen=True)
class Recipe:
    """Settings for :func:`clipguide.guide`; each one applies only where the caller leaves it unset.

    Attributes:
        steps: optimisation / sampling steps.
        backend_options: the backend's options; a key the caller passes wins.
        guidance: :class:`~clipguide.guidance.GuidanceConfig` fields (cutn, regularisers, ...); a field the caller
            passes wins (a caller's ``regularisers`` replaces the recipe's whole dict).
        retries: redraws of a picture that fails its tests.
        denoise_judge: a pixel diffusion model that also judges each picture (see
            :mod:`clipguide.denoise_judge`); used when the caller sets no judge.
        accept_error: the denoise error a picture may have under the recipe's judge, used with that judge when the
            caller sets no limit; None: the judge's calibrated value (the error 99% of real pictures stay under).
        purify: the noise level at which the denoise judge purifies a picture before its CLIP score is tested
            (``guide(purify=...)``); used when the caller leaves it unset and a judge is in use.
    """

    steps: Optional[int] = None
    backend_options: dict = field(default_factory=dict)
    guidance: dict = field(default_factory=dict)
    retries: Optional[int] = None
    denoise_judge: Optional[str] = None
    accept_error: Optional[float] = None
    purify: Optional[float] = None

    def __post_init__(self) -> None:
        if self.accept_error is not None and self.denoise_judge is None:
            raise ClipguideError("a recipe's accept_error needs its denoise_judge")


RECIPES: Registry[Recipe] = Registry("recipe")


def recipe_for(clip: Optional[str], backend: str) -> Optional[Recipe]:
    """The recipe registered as ``"clip/backend"``, or None."""
    key = f"{clip}/{backend}"
    return RECIPES.get(key) if clip is not None and key in RECIPES else None


# Over the 42 seen-pair ShapesWorld prompts (python -m clipguide.evaluate --backend pixels), judged by the oracle:
# 86% fully right (36 of 42), 2.6 pictures drawn and about 38 s per prompt on a 2-core CPU, where the pixels
# backend's own defaults read 0% (README, "Quality today").
RECIPES.register("shapes/pixels")(Recipe(
    steps=300,
    backend_options={"colors": 2, "palette": "shapes", "resolution": 8},
    guidance={"regularisers": {"border": 5, "diffusion_prior": 20}},
    retries=6,
    denoise_judge="shapes",
))


# The shipped VQGAN, whose own defaults (random codes, no prior) draw none of the 42 seen-pair prompts right: a start
# of two palette colours, a random blob on a field, the pair CLIP rates highest for the prompt, every picture kept on
# the blend of that pair; the diffusion prior up to 20% noise and the palette loss; the judge, which also scores each
# picture purified, with a limit that about 89% of real pictures pass, and retries: 98% of them fully right (41 of
# 42; all 42 on other draws; 93% with the VQGAN shipped before), 61-78 s per prompt on a 2-core CPU (README,
# "Quality today").
RECIPES.register("shapes/vqgan")(Recipe(
    steps=300,
    backend_options={"start": "blob", "palette": "shapes", "blend": True},
    guidance={"regularisers": {"border": 5, "diffusion_prior_deep": 30, "palette": 10}},
    retries=6,
    denoise_judge="shapes",
    accept_error=3.1,
    purify=0.2,
))
