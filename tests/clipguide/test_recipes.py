"""Recipes: guide() fills the settings its caller leaves unset from the recipe of its CLIP model and backend."""
import pytest
import torch

from clipguide import RECIPES, ClipguideError, Recipe, guide
from clipguide.denoise_judge import calibrated_error
from clipguide.palettes import parse_palette
from clipguide.recipes import recipe_for

PROMPT = "a red circle on a blue background"


def only_palette_colours(images):
    palette = parse_palette("shapes")
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 1, 3)
    return bool((pixels - palette).abs().amax(-1).min(-1).values.max() < 1e-6)


def test_the_shipped_clip_paints_pixels_with_its_recipe():
    recipe = recipe_for("shapes", "pixels")
    assert recipe is RECIPES.get("shapes/pixels") and recipe_for("shapes", "fourier") is None
    auto = guide(PROMPT, steps=1, seed=2)
    explicit = guide(PROMPT, steps=1, seed=2, recipe=None, backend_options=recipe.backend_options,
                     retries=recipe.retries, denoise_judge=recipe.denoise_judge, **recipe.guidance)
    assert torch.equal(auto.tensor, explicit.tensor) and auto.attempts == explicit.attempts
    assert auto.denoise_error is not None and only_palette_colours(auto.tensor)
    assert set(recipe.guidance["regularisers"]) <= set(auto.losses[0])


def test_the_shipped_clip_steers_the_shipped_vqgan_with_its_recipe():
    recipe = recipe_for("shapes", "vqgan")
    options = {"start": "blob", "palette": "shapes", "blend": True}
    assert recipe.backend_options == options and recipe.denoise_judge == "shapes" and recipe.purify == 0.2
    assert recipe.accept_error < calibrated_error("shapes")     # stricter than the error 99% of real pictures pass
    auto = guide(PROMPT, backend="vqgan", steps=1, seed=2, retries=1)
    explicit = guide(PROMPT, backend="vqgan", steps=1, seed=2, recipe=None, backend_options=options,
                     retries=1, denoise_judge="shapes", accept_error=recipe.accept_error, purify=0.2,
                     **recipe.guidance)
    assert torch.equal(auto.tensor, explicit.tensor) and auto.attempts == explicit.attempts
    assert auto.purified_score == explicit.purified_score is not None
    assert set(recipe.guidance["regularisers"]) <= set(auto.losses[0])
    plain = guide(PROMPT, backend="vqgan", steps=1, seed=2, recipe=None)
    assert plain.denoise_error is None and "diffusion_prior_deep" not in plain.losses[0]


def test_what_the_caller_sets_wins_over_the_recipe():
    result = guide(PROMPT, steps=1, seed=2, retries=0, regularisers={}, backend_options={"palette": None})
    assert result.attempts == [1] and "diffusion_prior" not in result.losses[0]
    assert not only_palette_colours(result.tensor)               # two free colours instead of the palette's
    assert result.denoise_error is not None                      # the recipe's judge, which was left unset


def test_no_recipe_means_the_backends_own_defaults():
    result = guide(PROMPT, steps=1, seed=2, recipe=None)
    assert result.denoise_error is None and result.attempts == [1] and "border" not in result.losses[0]
    assert not only_palette_colours(result.tensor)
    assert guide(PROMPT, steps=1, seed=2, backend="fourier").denoise_error is None  # no shapes/fourier recipe


def test_a_given_recipe_replaces_the_registered_one(perceptor):
    recipe = Recipe(steps=2, guidance={"regularisers": {"tv": 1}})
    result = guide(PROMPT, clip=perceptor, size=32, cutn=2, recipe=recipe)
    assert result.steps == 2 and "tv" in result.losses[0]
    with pytest.raises(ClipguideError, match="recipe must be 'auto', None or a Recipe"):
        guide(PROMPT, clip=perceptor, steps=1, recipe="shapes")


def test_a_recipes_accept_error_goes_with_its_judge(perceptor, tiny_diffusion_path):
    def recipe(limit):
        return Recipe(steps=2, retries=2, denoise_judge=str(tiny_diffusion_path), accept_error=limit)

    def attempts(**kw):
        return guide(PROMPT, clip=perceptor, size=32, cutn=2, seed=3, accept_score=0.0, **kw).attempts

    assert attempts(recipe=recipe(1e-3)) == [3] and attempts(recipe=recipe(1e6)) == [1]
    assert attempts(recipe=recipe(1e-3), accept_error=1e6) == [1]              # the caller's limit, the recipe's judge
    # a judge of the caller's own brings its own limit (this folder has no calibration)
    with pytest.raises(ClipguideError, match="has no calibrated denoise error"):
        attempts(recipe=recipe(1e6), denoise_judge=str(tiny_diffusion_path))
    with pytest.raises(ClipguideError, match="a recipe's accept_error needs its denoise_judge"):
        Recipe(accept_error=3.0)
