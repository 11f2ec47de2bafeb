"""clipguide: turn CLIP similarity into losses and gradients that steer image generators.

    import clipguide
    result = clipguide.guide("a red circle on a blue background", backend="pixels", seed=0)
    result.image.save("circle.png")

    g = clipguide.CLIPGuidance("a red circle | blurry:-0.5", perceptor="shapes", cutn=16)
    loss = g.loss(images)          # images [B, 3, H, W] in [0, 1], differentiable
"""
from core_clip.startup import paused_gc

with paused_gc():   # kornia and the rest import faster without the cyclic collector (see core_clip.startup)
    from .determinism import deterministic
    from .errors import ClipguideError, GuidanceError, PromptError, UnknownNameError
    from .generators import GENERATORS
    from . import diffusion_prior  # noqa: F401,I001  (registers the diffusion_prior image loss; needs the generators)
    from .guidance import CLIPGuidance, GuidanceConfig
    from .guide import GuideResult, guide, retry_seed
    from .perceptor import Perceptor
    from .prompts import Prompt, parse_prompts
    from .recipes import RECIPES, Recipe

__all__ = [
    "CLIPGuidance", "ClipguideError", "GENERATORS", "GuidanceConfig", "GuidanceError", "GuideResult", "Perceptor",
    "Prompt", "PromptError", "RECIPES", "Recipe", "UnknownNameError", "deterministic", "guide", "parse_prompts",
    "retry_seed",
]
