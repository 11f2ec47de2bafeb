"""``guide()``: one call from prompts to pictures, over any registered generator backend."""
from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from core_clip.model import is_clip_score
from core_clip.preprocess import Images, as_image_batch, open_image

from .denoise_judge import calibrated_error, denoise_error, positive_level, purified, purify_level
from .determinism import deterministic
from .diffusion_prior import pixel_model
from .errors import ClipguideError
from .generators import GENERATORS, check_options
from .guidance import CLIPGuidance, PromptsLike, as_prompts
from .perceptor import ModelSpec, Perceptor
from .prompts import Prompt, negative_prompts, parse_prompts
from .recipes import Recipe, recipe_for

@dataclass
class GuideResult:
    """What :func:`guide` made.

    image: the first image; images: every image of the batch (PIL, RGB); tensor: float [B, 3, H, W] in [0, 1];
    losses: one dict per step run, retries included (batch means: "total", one entry per prompt, one per
    regulariser); clip_score: per image, ``100 * max(cos, 0)`` against the positive prompts' targets under the first
    perceptor model (averaged over those prompts); steps: optimisation / sampling steps actually run, retries
    included; seconds: wall time; attempts: per image, how many pictures were drawn for it (1 + its retries);
    denoise_error: per image, its :func:`~clipguide.denoise_judge.denoise_error` when a ``denoise_judge`` was given;
    purified_score: per image, the CLIP score of its purified copies (the score its retries were judged by) when
    ``purify`` was given.
    """

    image: Image.Image
    images: list[Image.Image]
    tensor: torch.Tensor
    losses: list[dict]
    clip_score: list[float]
    steps: int
    seconds: float
    attempts: list[int]
    denoise_error: Optional[list[float]] = None
    purified_score: Optional[list[float]] = None

    @property
    def retries(self) -> int:
        """Pictures drawn again because they failed a test (CLIP score, denoise error), over the whole batch."""
        return sum(self.attempts) - len(self.attempts)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """float [B, 3, H, W] in [0, 1] -> B PIL RGB images (rounded to uint8)."""
    array = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def parse_size(size: Union[int, str, Sequence[int]]) -> tuple[int, int]:
    """64, "64", "96x64" or (96, 64) -> (width, height); anything else or a non-positive side -> ClipguideError."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ClipguideError(f"size must be W or WxH with positive integers, got {size!r}")
        size = [int(p) for p in parts]
    sides = [size] * 2 if isinstance(size, int) else list(size)
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise ClipguideError(f"size must be a positive integer or (width, height), got {size!r}")
    return sides[0], sides[1]


def retry_seed(seed: int, image: int, attempt: int) -> int:
    """The seed of retry ``attempt`` (1, 2, ...) of image ``image`` of a run seeded ``seed``: hashed from all three
    (numpy's SeedSequence), so it is reproducible and unrelated to the seeds that batches and candidates use."""
    return int(np.random.SeedSequence([seed % 2**64, image, attempt]).generate_state(1)[0])


def _retry_policy(retries: Optional[int], accept_score: Optional[float], factory: type, options: dict,
                  prompts: Sequence[Prompt], perceptor: Perceptor) -> tuple[int, float]:
    """(retries, the CLIP score a picture must reach to be kept) from guide()'s arguments; see :func:`guide`."""
    model = perceptor.members[0].model
    if accept_score is not None and not is_clip_score(accept_score):
        raise ClipguideError(f"accept_score must be a CLIP score in [0, 100], got {accept_score!r}")
    threshold = model.match_score if accept_score is None else float(accept_score)
    positive = any(p.weight > 0 for p in prompts)
    if retries is None:
        return (factory.default_retries(**options) if positive and threshold is not None else 0), threshold
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ClipguideError(f"retries must be a non-negative integer, got {retries!r}")
    if retries and not positive:
        raise ClipguideError("retries judge a picture by its CLIP score against the positive prompts, and every "
                             "prompt here is negative")
    if retries and threshold is None:
        raise ClipguideError(f"retries need a CLIP score to accept: CLIP model {model.name!r} has no calibrated "
                             "match_score (see core-clip calibrate), so pass accept_score")
    return retries, threshold


def _clip_name(clip: Union[ModelSpec, Sequence[ModelSpec], Perceptor]) -> Optional[str]:
    """The name of the single CLIP model ``clip`` stands for (a name, a model or a one-model perceptor), else None."""
    if isinstance(clip, Perceptor):
        return clip.members[0].model.name if len(clip.members) == 1 else None
    if isinstance(clip, str):
        return clip
    return getattr(clip, "name", None) if isinstance(getattr(clip, "name", None), str) else None


def _apply_recipe(recipe: Union[str, Recipe, None], clip, backend: str, settings: dict,
                  guidance_options: dict) -> None:
    """Fill the unset entries of ``settings`` (steps, backend_options, retries, denoise_judge, accept_error, purify)
    and of ``guidance_options`` in place from ``recipe`` ("auto": the one registered for ``clip`` and ``backend``)."""
    if recipe == "auto":
        recipe = recipe_for(_clip_name(clip), backend)
    elif recipe is not None and not isinstance(recipe, Recipe):
        raise ClipguideError(f"recipe must be 'auto', None or a Recipe, got {recipe!r}")
    if recipe is None:
        return
    if settings["steps"] is None:
        settings["steps"] = recipe.steps
    settings["backend_options"] = {**recipe.backend_options, **settings["backend_options"]}
    if settings["retries"] is None:
        settings["retries"] = recipe.retries
    if settings["denoise_judge"] is None:   # a caller's own judge brings its own calibration
        settings["denoise_judge"] = recipe.denoise_judge
        if settings["accept_error"] is None:
            settings["accept_error"] = recipe.accept_error
    if settings["purify"] is None and settings["denoise_judge"] is not None:
        settings["purify"] = recipe.purify
    for name, value in recipe.guidance.items():
        guidance_options.setdefault(name, value)


def _judge_policy(denoise_judge, accept_error: Optional[float], purify: Optional[float],
                  device: torch.device) -> Optional[float]:
    """The denoise error a picture may have to be kept (None: no judge); see :func:`guide`. Loads the judge's
    model and checks ``purify``, so that a wrong setting fails before any sampling."""
    if denoise_judge is None:
        for name, value in (("accept_error", accept_error), ("purify", purify)):
            if value is not None:
                raise ClipguideError(f"{name} needs a denoise_judge (a pixel diffusion model, e.g. 'shapes')")
        return None
    pixel_model(denoise_judge, device)
    if purify is not None:
        purify_level(purify)
    if accept_error is not None:
        return positive_level("accept_error", accept_error)
    calibrated = calibrated_error(denoise_judge)
    if calibrated is None:
        raise ClipguideError(f"denoise_judge {denoise_judge!r} has no calibrated denoise error (see python -m "
                             "clipguide.denoise_judge), so pass accept_error")
    return calibrated


def _init_tensor(init_image: Union[str, os.PathLike, Images, None], width: int, height: int,
                 device: torch.device) -> Optional[torch.Tensor]:
    if init_image is None:
        return None
    if isinstance(init_image, (str, os.PathLike)):
        init_image = open_image(init_image)
    x = as_image_batch(init_image)[:1].float().to(device)
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


class _Frames:
    """Writes frame_NNNNN.png of the first image every ``every`` steps, and frames.mp4 at the end when
    imageio-ffmpeg is installed."""

    def __init__(self, folder: Union[str, os.PathLike], every: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.every = every
        self.paths: list[Path] = []

    def __call__(self, step: int, images: torch.Tensor) -> None:
        if step % self.every == 0:
            path = self.folder / f"frame_{step:05d}.png"
            to_pil(images[:1])[0].save(path)
            self.paths.append(path)

    def finish(self) -> Optional[Path]:
        if not self.paths or importlib.util.find_spec("imageio_ffmpeg") is None:
            return None
        import imageio.v2 as imageio

        video = self.folder / "frames.mp4"
        with imageio.get_writer(video, fps=24, codec="libx264", macro_block_size=1) as writer:
            for path in self.paths:
                writer.append_data(np.asarray(Image.open(path)))
        return video


def guide(prompts: PromptsLike, *, backend: str = "pixels",
          clip: Union[ModelSpec, Sequence[ModelSpec], Perceptor] = "shapes",
          steps: Optional[int] = None, size: Union[int, str, Sequence[int], None] = None, seed: int = 0, batch: int = 1,
          negative: Union[str, Sequence[str]] = (), image_prompts: Sequence[Union[str, os.PathLike]] = (),
          init_image: Union[str, os.PathLike, Images, None] = None, backend_options: Optional[dict] = None,
          callback: Optional[Callable[[int, dict, torch.Tensor], None]] = None,
          frames: Union[str, os.PathLike, None] = None, frame_every: int = 1, progress: bool = False,
          retries: Optional[int] = None, accept_score: Optional[float] = None,
          denoise_judge: Union[str, os.PathLike, None] = None, accept_error: Optional[float] = None,
          purify: Optional[float] = None, recipe: Union[str, Recipe, None] = "auto",
          device: Union[str, torch.device, None] = None, compile: bool = False, **guidance_options) -> GuideResult:
    """Steer ``backend`` towards ``prompts`` with CLIP and return the pictures.

    Args:
        prompts: "text:weight:stop | text:weight" (see :mod:`clipguide.prompts`), a Prompt, or a list of them.
        backend: a registered generator ("pixels", "fourier", ...); its own options go in ``backend_options``
            (for optimisation backends these include ``lr``).
        clip: perceptor: a core_clip model name / path / ClipModel, a list of them (optionally (model, weight)),
            or a ready :class:`Perceptor`.
        steps: optimisation or sampling steps (fewer when every prompt reaches its stop); None: the backend's
            ``default_steps`` (100 for optimisation backends, 50 for diffusion).
        size: output size: an int (square), "WxH", or (width, height); None: the backend's native size (64 px,
            or the size the diffusion model was trained at).
        seed: seeds the backend's start and the cutouts; same seed, settings and device -> the same image.
        batch: images made at once (each from its own random start).
        negative: prompts to push away from ("blurry | text:0.5"); their weights are made negative.
        image_prompts: image files whose CLIP embedding is a target ("path:weight:stop" items).
        init_image: a file path or image to start from.
        callback: called after every step as callback(step, losses, images [B, 3, H, W] detached).
        frames: folder for frame_NNNNN.png every ``frame_every`` steps (and frames.mp4 if imageio-ffmpeg is installed).
        progress: show a tqdm bar.
        retries: how many more times an image whose CLIP score stays below ``accept_score`` is drawn again, each
            time from a fresh :func:`retry_seed`; the best-scoring picture is kept. None: the backend's
            ``default_retries`` (2 for guided diffusion, 0 for optimisation backends), or 0 when the threshold is
            unknown or no prompt is positive. The score is :attr:`GuideResult.clip_score`'s, so a prompt split into
            parts ("a red circle | a blue background") scores lower than one caption of the same picture.
        accept_score: the CLIP score a picture must reach; None: the first CLIP model's calibrated ``match_score``
            (the score 99% of its true image-caption pairs reach; ``core-clip calibrate``).
        denoise_judge: a pixel-space diffusion model (shipped name or folder) that also judges each picture: one
            that the model would change by more than ``accept_error`` when cleaning it
            (:func:`~clipguide.denoise_judge.denoise_error`) is drawn again too, and among a picture's attempts the
            one passing more tests is kept (the higher CLIP score breaks ties). None: CLIP score alone.
        accept_error: the denoise error (RMS, 0-255 levels) a picture may have; None: the recipe's limit for its
            own judge, else the judge's calibrated value (the error 99% of real pictures of its domain stay under).
        purify: with a ``denoise_judge``, a noise level in (0, 1) (a fraction of the judge's timesteps): the score
            that ``accept_score`` tests, and that ranks a picture's attempts, is then the mean CLIP score of the
            judge's clean estimates of the picture noised to that level (:func:`~clipguide.denoise_judge.purified`)
            rather than of the picture itself, so a picture that fools the CLIP with detail the judge removes is
            drawn again. None: the picture's own score.
        recipe: "auto": settings left unset here (None, or absent from ``backend_options`` and
            ``guidance_options``) come from the :class:`~clipguide.recipes.Recipe` registered for this CLIP model and
            backend, when there is one (the shipped ``shapes`` CLIP has one for ``pixels`` and one for ``vqgan``);
            None: the backend's and the guidance's own defaults; or a Recipe to use instead.
        compile: torch.compile the CLIP image towers and the backend's decoder (CUDA graphs on CUDA; see
            :mod:`clipguide.compiling`): tens of seconds up front for faster steps, worth it for long runs.
            Ignored for a ready :class:`Perceptor` passed as ``clip`` (give it ``compile=True`` yourself).
        **guidance_options: fields of :class:`clipguide.guidance.GuidanceConfig` (cutn, cutouts, loss, regularisers...).

    Raises ClipguideError (a ValueError) for bad input and GuidanceError if the loss stops being finite.
    """
    start = time.perf_counter()
    factory = GENERATORS.get(backend)
    settings = dict(steps=steps, backend_options=dict(backend_options or {}), retries=retries,
                    denoise_judge=denoise_judge, accept_error=accept_error, purify=purify)
    _apply_recipe(recipe, clip, backend, settings, guidance_options)
    steps, options, retries, denoise_judge, accept_error, purify = (
        settings[k] for k in ("steps", "backend_options", "retries", "denoise_judge", "accept_error", "purify"))
    check_options(factory, backend, options)
    width, height = parse_size(size) if size is not None else factory.native_size(**options)
    steps = factory.default_steps if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ClipguideError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ClipguideError(f"batch must be a positive integer, got {batch!r}")
    if frame_every < 1:
        raise ClipguideError(f"frame_every must be >= 1, got {frame_every}")
    all_prompts: list[Prompt] = as_prompts(prompts) if prompts else []
    if negative:
        all_prompts += negative_prompts(negative)
    for item in image_prompts:
        all_prompts += parse_prompts(str(item), kind="image")
    if not all_prompts:
        raise ClipguideError("guide needs at least one prompt")

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    perceptor = clip if isinstance(clip, Perceptor) else Perceptor(clip, device=device, compile=compile)
    retries, accept = _retry_policy(retries, accept_score, factory, options, all_prompts, perceptor)
    max_error = _judge_policy(denoise_judge, accept_error, purify, perceptor.device)
    init = _init_tensor(init_image, width, height, perceptor.device)

    guidance = CLIPGuidance(all_prompts, perceptor, seed=seed, **guidance_options)

    def prepare(attempt_seed: int, count: int, settings: dict) -> tuple[object, torch.Generator]:
        """A backend making ``count`` pictures and its generator, seeded ``attempt_seed``."""
        generator = torch.Generator(perceptor.device).manual_seed(attempt_seed)
        backend_impl = factory(count, height, width, generator=generator, init=init, **settings)
        if compile:
            backend_impl.compile_decode()
        return backend_impl, generator

    def draw(attempt_seed: int, prepared: tuple, on_step: Callable) -> tuple[torch.Tensor, ...]:
        """The prepared backend's pictures [count, 3, H, W] in [0, 1], guided with cutouts seeded ``attempt_seed``,
        their CLIP scores [count], the scores they are judged by [count] (of their purified copies with ``purify``,
        else their own) and their denoise errors [count] (NaN without a judge)."""
        backend_impl, generator = prepared
        guidance.reseed(attempt_seed)
        with deterministic(perceptor.device):
            pictures = backend_impl.sample(guidance, steps, generator, on_step).detach().clamp(0, 1)
            errors = (denoise_error(pictures, denoise_judge) if denoise_judge is not None
                      else torch.full((len(pictures),), math.nan, device=pictures.device))
            copies = purified(pictures, denoise_judge, level=purify) if purify is not None else None
        scores = guidance.clip_score(pictures)
        judged = scores if copies is None else guidance.clip_score(copies.flatten(0, 1)).view(len(pictures), -1).mean(1)
        return pictures, scores, judged, errors

    def merit(judged: torch.Tensor, error: torch.Tensor) -> tuple[int, float]:
        """(tests passed, judged CLIP score): a picture passing every test is accepted; higher is kept."""
        passed = int(judged >= accept) + (int(error <= max_error) if max_error is not None else 0)
        return passed, float(judged)

    tests = 1 + (max_error is not None)
    first = prepare(seed, batch, options)  # bad settings fail here, before any progress is shown
    retry_options = {**options, **first[0].shared_options()}
    history: list[dict] = []
    writer = _Frames(frames, frame_every) if frames is not None else None
    bar = tqdm(total=steps, desc=f"guide {backend}", disable=not progress, leave=False)

    def reporter(view: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[int, dict, torch.Tensor], None]:
        """A backend step callback; ``view`` turns the backend's images into the whole batch's (for a retry: the
        batch with the retried row replaced), and steps count on across retries."""
        def on_step(_: int, losses: dict, images: torch.Tensor) -> None:
            history.append(losses)
            images = view(images)
            bar.update(1)
            if math.isfinite(losses["total"]):   # unguided diffusion steps report NaN: keep the last guided loss
                bar.set_postfix(loss=f"{losses['total']:.4f}")
            if writer is not None:
                writer(len(history), images)
            if callback is not None:
                callback(len(history), losses, images)
        return on_step

    try:
        images, scores, judged, errors = draw(seed, first, reporter(lambda x: x))
        attempts = [1] * batch
        for i in range(batch):
            for k in range(1, retries + 1):
                if merit(judged[i], errors[i])[0] == tests:
                    break
                bar.total += steps
                bar.refresh()
                view = lambda x, i=i: torch.cat([images[:i], x, images[i + 1:]])  # noqa: E731
                attempt_seed = retry_seed(seed, i, k)
                picture, score, judge, error = draw(attempt_seed, prepare(attempt_seed, 1, retry_options),
                                                    reporter(view))
                attempts[i] += 1
                if merit(judge[0], error[0]) > merit(judged[i], errors[i]):
                    # judged is scores itself without purify: both writes then store the same value
                    images[i], scores[i], judged[i], errors[i] = picture[0], score[0], judge[0], error[0]
    finally:
        bar.close()
    if writer is not None:
        writer.finish()
    return GuideResult(image=to_pil(images[:1])[0], images=to_pil(images), tensor=images.cpu(), losses=history,
                       clip_score=scores.tolist(), steps=len(history), seconds=time.perf_counter() - start,
                       attempts=attempts, denoise_error=errors.tolist() if max_error is not None else None,
                       purified_score=judged.tolist() if purify is not None else None)
