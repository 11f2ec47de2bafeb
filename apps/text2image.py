"""Text-to-image in the browser: a Gradio Blocks app, thin over ``clipguide.guide``.

Run it with ``clipguide app [--host 127.0.0.1] [--port 7860]`` or ``python -m apps.text2image [--host H] [--port P]``.

What it does, and where:
- :func:`find_backends`: which generator backends can run offline here (decided once, at start-up), and for those
  that cannot, what to install or train.
- :func:`validate`: every input checked on the server (limits from :class:`Limits`), giving a :class:`Settings` or
  raising ``gr.Error`` with a message for the user.
- :func:`png_info` / :func:`read_metadata` / :func:`settings_from_metadata`: PNGs carry their prompt, seed and
  settings as PNG text, so any result can be made again.
- :meth:`Text2Image.generate`: the event handler, a Python generator that streams a preview every few steps and
  ends with the images, the session's gallery (``gr.State``) and the PNG files. The guide loop runs in a worker
  thread; Stop (or Gradio cancelling the event) sets a flag that the step callback checks, so the loop stops at the
  next step and the worker returns.

Nothing here reaches the network: analytics are off, only local CLIP models and local backend weights are offered,
the server binds to 127.0.0.1 unless told otherwise, and no user input ever becomes a filesystem path (PNGs are
written by the app into its own temporary folder under generated names).
"""
from __future__ import annotations

import os

# Before gradio is imported: no telemetry, no version check (Blocks(analytics_enabled=False) is set as well).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import importlib.util
import json
import math
import queue
import secrets
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import gradio as gr
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import clipguide
import core_clip
from clipguide import ClipguideError, Perceptor, guide, parse_prompts
from clipguide.cutouts import CUTOUTS
from clipguide.generators import GENERATORS, OptimisedGenerator
from clipguide.generators.diffusion import SCHEDULERS, WEIGHTS
from clipguide.guide import to_pil
from clipguide.prompts import negative_prompts

__all__ = ["Limits", "Settings", "BackendInfo", "Text2Image", "build_app", "find_backends", "launch", "png_info",
           "read_metadata", "settings_from_metadata", "validate"]

SHIPPED_DIFFUSION = WEIGHTS / "diffusion-shapes"
SHIPPED_VQGAN = WEIGHTS / "vqgan-shapes.safetensors"
METADATA_KEY = "clipguide"          # PNG text chunk holding the settings as JSON
MIN_SIZE = 16                       # ShapesWorld's oracle and the CLIP cutouts need at least 16 px
MAX_PROMPT_CHARS = 500
MAX_PROMPT_ITEMS = 8
MAX_CUTN = 64
MAX_SCALE = 10_000.0
MAX_RETRIES = 4
SEED_LIMIT = 2**31                  # seeds are 0 .. 2**31 - 1 (they fit every JavaScript number and int32)

PROMPT_HELP = """\
**Prompt syntax**: `text:weight:stop | text:weight | ...`. Items are separated by `|`; `weight` (default 1) scales
an item, and a negative weight pushes the picture away from it; `stop` (optional) stops pulling towards that item once
its loss falls below the value. Example: `a red circle on a blue background:1 | blurry:-0.5`.
The shipped CLIP knows ShapesWorld: one circle, square or triangle in red, green, blue, yellow, purple, orange, white
or black, small or large, on the left, right, top, bottom or in the center, on a plain background.
"""

EXAMPLES = [
    ["a red circle on a blue background", ""],
    ["a large yellow square on a black background", ""],
    ["a small green triangle on the left", "a circle"],
    ["a blue circle:1 | a white background:0.5", ""],
]


@dataclass(frozen=True)
class Limits:
    """What one server accepts, enforced in :func:`validate` (the sliders show the same bounds).

    concurrency: generations run at once per device (the Gradio queue's concurrency limit); 1 suits a CPU.
    queue_size: requests waiting beyond those; more are refused with Gradio's queue-full message.
    """

    max_steps: int = 200
    max_size: int = 128
    max_batch: int = 4
    concurrency: int = 1
    queue_size: int = 8
    max_gallery: int = 48        # gallery entries kept per session (oldest dropped)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{f.name} must be a positive integer, got {value!r}")
        if self.max_size < MIN_SIZE:
            raise ValueError(f"Limits.max_size must be >= {MIN_SIZE}, got {self.max_size}")


@dataclass(frozen=True)
class Settings:
    """One generation's settings: what :func:`guide` is called with, and what each PNG records.

    Backend-specific fields are None where they do not apply (``lr`` for optimisation backends; ``scale`` and
    ``scheduler`` for diffusion); None also means "the backend's default", as it does for ``retries`` (how often
    guide() redraws a picture that the CLIP scores below a true pair).
    """

    prompt: str
    negative: str = ""
    backend: str = "pixels"
    steps: int = 100
    size: int = 64
    seed: int = 0
    batch: int = 1
    cutn: int = 16
    cutouts: str = "classic"
    lr: Optional[float] = None
    scale: Optional[float] = None
    scheduler: Optional[str] = None
    clip: tuple[str, ...] = (core_clip.DEFAULT_MODEL,)
    retries: Optional[int] = None

    def backend_options(self) -> dict:
        """The user-chosen backend options (the app adds the model location itself)."""
        return {k: v for k, v in (("lr", self.lr), ("scale", self.scale), ("scheduler", self.scheduler))
                if v is not None}


@dataclass(frozen=True)
class BackendInfo:
    """A generator backend as this server offers it.

    available: whether it can run offline here; note: for an unavailable one, what to install, train or download.
    options: backend options the app always passes (e.g. the model folder); never shown to or taken from users.
    model: the model's name recorded in PNG metadata (a folder name, never a path).
    """

    name: str
    available: bool
    note: str = ""
    options: dict = field(default_factory=dict)
    model: str = ""
    native_size: int = 64
    default_steps: int = 100
    optimised: bool = True


def find_backends(diffusion_model: Union[str, os.PathLike, None] = None,
                  vqgan_model: Union[str, os.PathLike, None] = None) -> dict[str, BackendInfo]:
    """Every registered backend and whether it runs offline here.

    pixels, fourier (and any other registered backend without weights) always do; ``diffusion`` needs a diffusers
    pipeline folder (``diffusion_model``, default the shipped ``clipguide/weights/diffusion-shapes``); ``vqgan``
    needs a VQGAN .safetensors with its .json (``vqgan_model``, default ``clipguide/weights/vqgan-shapes.safetensors``)
    and taming-transformers.
    """
    found: dict[str, BackendInfo] = {}
    for name in GENERATORS.names():
        factory = GENERATORS.get(name)
        optimised = isinstance(factory, type) and issubclass(factory, OptimisedGenerator)
        steps = int(getattr(factory, "default_steps", 100))
        if name == "diffusion":
            found[name] = _diffusion_backend(diffusion_model, steps)
        elif name == "vqgan":
            found[name] = _vqgan_backend(vqgan_model, steps)
        else:
            found[name] = BackendInfo(name, True, default_steps=steps, optimised=optimised)
    return found


def _diffusion_backend(model: Union[str, os.PathLike, None], steps: int) -> BackendInfo:
    folder = Path(model) if model is not None else SHIPPED_DIFFUSION
    if importlib.util.find_spec("diffusers") is None:
        return BackendInfo("diffusion", False, "needs diffusers: `pip install 'diffusers>=0.42,<0.43'`",
                           optimised=False)
    if not (folder / "model_index.json").is_file():
        where = "the shipped ShapesWorld model" if model is None else f"a pipeline at {folder.name!r}"
        return BackendInfo("diffusion", False,
                           f"needs {where} (a diffusers folder with model_index.json). Train it offline with "
                           "`python -m clipguide.train_diffusion --out runs/diffusion` and copy "
                           "`runs/diffusion/pipeline` to `clipguide/weights/diffusion-shapes/`.", optimised=False)
    width, _ = GENERATORS.get("diffusion").native_size(model=str(folder))
    name = "shapes" if model is None else folder.name
    return BackendInfo("diffusion", True, options={"model": str(folder)}, model=name, native_size=width,
                       default_steps=steps, optimised=False)


def _vqgan_backend(model: Union[str, os.PathLike, None], steps: int) -> BackendInfo:
    path = Path(model) if model is not None else SHIPPED_VQGAN
    if importlib.util.find_spec("taming") is None:
        return BackendInfo("vqgan", False, "needs taming-transformers: `pip install taming-transformers-rom1504`")
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return BackendInfo("vqgan", False,
                           f"needs a VQGAN at {path} with its .json beside it: the shipped one is "
                           "`clipguide/weights/vqgan-shapes.safetensors` (retrain it with "
                           "`python -m clipguide.train_vqgan --out runs/vqgan --recipe shapes`), or pass a taming "
                           "VQGAN's path to `build_app(vqgan_model=...)`.")
    name = "shapes" if model is None else path.stem
    return BackendInfo("vqgan", True, options={"model": str(path)}, model=name, default_steps=steps)


def local_clip_models() -> list[str]:
    """CLIP models that load offline: those shipped with core_clip (no names that would download weights)."""
    return core_clip.list_shipped()


# ---------------------------------------------------------------------------------------------------- validation

def _integer(value: Any, name: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high] (ints, integral floats and digit strings), else gr.Error naming ``name``."""
    if isinstance(value, bool):
        value = None
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value.strip())
    elif isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if not isinstance(value, int):
        raise gr.Error(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise gr.Error(f"{name} must be between {low} and {high}, got {value}")
    return value


def _number(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or x > high or x < low or (low_open and x == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise gr.Error(f"{name} must be a number in {bound}, got {value!r}")
    return x


def validate(prompt: Any, negative: Any = "", backend: Any = "pixels", steps: Any = None, size: Any = None,
             seed: Any = 0, random_seed: bool = False, batch: Any = 1, cutn: Any = 16, cutouts: Any = "classic",
             lr: Any = None, scale: Any = None, scheduler: Any = None, clip: Any = None, retries: Any = None, *,
             limits: Limits = Limits(),
             backends: Optional[dict[str, BackendInfo]] = None,
             clip_choices: Optional[Sequence[str]] = None) -> Settings:
    """Check every input on the server and return the :class:`Settings` to run, or raise ``gr.Error``.

    ``steps`` / ``size`` / ``retries`` None mean the backend's defaults (capped by ``limits``); ``random_seed`` draws a
    fresh seed (which the returned settings carry, so the UI can show it). Options that do not apply to the chosen
    backend (``lr`` for diffusion, ``scale`` and ``scheduler`` otherwise) are dropped.
    """
    backends = find_backends() if backends is None else backends
    clip_choices = local_clip_models() if clip_choices is None else list(clip_choices)

    if not isinstance(prompt, str) or not prompt.strip():
        raise gr.Error("Enter a prompt, e.g. 'a red circle on a blue background'")
    negative = "" if negative is None else negative
    if not isinstance(negative, str):
        raise gr.Error(f"negative prompt must be text, got {type(negative).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS or len(negative) > MAX_PROMPT_CHARS:
        raise gr.Error(f"prompts are limited to {MAX_PROMPT_CHARS} characters")
    try:
        items = parse_prompts(prompt) + (negative_prompts(negative) if negative.strip() else [])
    except ClipguideError as e:
        raise gr.Error(f"prompt: {e}") from None
    if len(items) > MAX_PROMPT_ITEMS:
        raise gr.Error(f"at most {MAX_PROMPT_ITEMS} prompt items (separated by '|'), got {len(items)}")
    if not any(p.weight > 0 for p in items):
        raise gr.Error("the prompt needs at least one item with a positive weight")

    info = backends.get(backend) if isinstance(backend, str) else None
    if info is None:
        raise gr.Error(f"unknown backend {backend!r}; choose one of: "
                       + ", ".join(n for n, b in backends.items() if b.available))
    if not info.available:
        raise gr.Error(f"backend {backend!r} is not available on this server: {info.note}")

    steps = min(info.default_steps, limits.max_steps) if steps is None else steps
    size = min(info.native_size, limits.max_size) if size is None else size
    steps = _integer(steps, "steps", 1, limits.max_steps)
    size = _integer(size, "size", MIN_SIZE, limits.max_size)
    batch = _integer(batch, "batch size", 1, limits.max_batch)
    seed = secrets.randbelow(SEED_LIMIT) if random_seed else _integer(seed, "seed", 0, SEED_LIMIT - 1)
    cutn = _integer(cutn, "cutn", 1, MAX_CUTN)
    retries = None if retries in (None, "") else _integer(retries, "retries", 0, MAX_RETRIES)
    if cutouts not in CUTOUTS:
        raise gr.Error(f"unknown cutout scheme {cutouts!r}; choose one of: {', '.join(CUTOUTS.names())}")

    if info.optimised:
        lr = None if lr is None else _number(lr, "learning rate", 0.0, 1.0, low_open=True)
        scale = scheduler = None
    else:
        lr = None
        if info.name == "diffusion":
            scale = None if scale is None else _number(scale, "guidance scale", 0.0, MAX_SCALE)
            if scheduler in (None, ""):
                scheduler = None
            elif scheduler not in SCHEDULERS:
                raise gr.Error(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS.names())}")
        else:
            scale = scheduler = None

    clip = [core_clip.DEFAULT_MODEL] if clip in (None, "", []) else ([clip] if isinstance(clip, str) else clip)
    if not isinstance(clip, (list, tuple)) or not all(isinstance(c, str) for c in clip):
        raise gr.Error("CLIP models must be a list of names")
    unknown = [c for c in clip if c not in clip_choices]
    if unknown:
        raise gr.Error(f"CLIP model(s) {', '.join(map(repr, unknown))} are not available offline here; "
                       f"choose from: {', '.join(clip_choices)}")
    return Settings(prompt=prompt.strip(), negative=negative.strip(), backend=info.name, steps=steps, size=size,
                    seed=seed, batch=batch, cutn=cutn, cutouts=cutouts, lr=lr, scale=scale, scheduler=scheduler,
                    clip=tuple(dict.fromkeys(clip)), retries=retries)


# ------------------------------------------------------------------------------------------------------ metadata

def png_info(settings: Settings, index: int = 0, clip_score: Optional[float] = None, model: str = "") -> PngInfo:
    """PNG text chunks for image ``index`` of a run: ``clipguide`` (every setting as JSON, enough to make the image
    again with :func:`settings_from_metadata`), plus ``prompt``, ``negative``, ``seed`` and ``Software`` for people."""
    record = {**asdict(settings), "clip": list(settings.clip), "index": index, "model": model,
              "clip_score": None if clip_score is None else round(float(clip_score), 4),
              "app": "clipguide text2image"}
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(record, ensure_ascii=False))
    info.add_text("prompt", settings.prompt)     # PIL writes non-Latin-1 text as an iTXt chunk
    if settings.negative:
        info.add_text("negative", settings.negative)
    info.add_text("seed", str(settings.seed))
    info.add_text("Software", "clipguide")
    return info


def read_metadata(image: Union[str, os.PathLike, Image.Image]) -> dict:
    """The ``clipguide`` record of a PNG written by this app (a dict); ValueError if it has none."""
    if isinstance(image, Image.Image):
        text = image.info.get(METADATA_KEY)
    else:
        with Image.open(image) as im:
            im.load()
            text = im.info.get(METADATA_KEY)
    if not isinstance(text, str):
        raise ValueError(f"no {METADATA_KEY!r} PNG text chunk: not an image saved by this app")
    return json.loads(text)


def settings_from_metadata(record: dict) -> Settings:
    """The :class:`Settings` recorded by :func:`png_info` (extra keys such as ``index`` and ``clip_score`` ignored)."""
    known = {f.name for f in fields(Settings)}
    values = {k: v for k, v in record.items() if k in known}
    if "clip" in values:
        values["clip"] = tuple(values["clip"])
    return Settings(**values)


# --------------------------------------------------------------------------------------------------- generation

_PERCEPTORS: dict[tuple[tuple[str, ...], str], Perceptor] = {}
_PERCEPTORS_LOCK = threading.Lock()


def perceptor(models: Sequence[str], device: Union[str, torch.device]) -> Perceptor:
    """The CLIP perceptor for ``models`` on ``device``, loaded once per process and then shared."""
    key = (tuple(models), str(device))
    with _PERCEPTORS_LOCK:
        if key not in _PERCEPTORS:
            _PERCEPTORS[key] = Perceptor(list(models), device=device)
        return _PERCEPTORS[key]


class _Stopped(Exception):
    """Raised inside guide()'s step callback once a run is asked to stop; caught by the run's worker."""


class Run:
    """One generation in a worker thread, reporting through :attr:`events`.

    Events: ``("step", step, total, preview PIL image)`` every ``every`` steps and at the last, then ``("done",)``.
    :meth:`stop` makes the step callback raise, so guide() stops at its next step. At most ``slots`` runs sample
    at once (the per-device limit also holds for a stopped run that is still finishing its step).
    """

    def __init__(self, settings: Settings, backend: BackendInfo, device: Union[str, torch.device],
                 slots: threading.Semaphore, every: int = 2):
        self.settings = settings
        self.backend = backend
        self.device = device
        self.every = max(1, every)
        self.slots = slots
        self.events: queue.Queue = queue.Queue()
        self.cancel = threading.Event()
        self.steps_done = 0
        self.result: Optional[clipguide.GuideResult] = None
        self.error: Optional[BaseException] = None
        self.stopped = False
        self.thread = threading.Thread(target=self._work, name="clipguide-app-run", daemon=True)

    def start(self) -> "Run":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.cancel.set()

    def _callback(self, step: int, losses: dict, images: torch.Tensor) -> None:
        if self.cancel.is_set():
            raise _Stopped()
        self.steps_done = step
        # guide() counts steps on through its retries, each of which runs the steps again
        total = self.settings.steps * (1 + (step - 1) // self.settings.steps)
        if step % self.every == 0 or step == total:
            self.events.put(("step", step, total, _preview(images)))

    def _work(self) -> None:
        s = self.settings
        try:
            with self.slots:
                if self.cancel.is_set():
                    raise _Stopped()
                self.result = guide(s.prompt, backend=s.backend, clip=perceptor(s.clip, self.device), steps=s.steps,
                                    size=s.size, seed=s.seed, batch=s.batch, negative=s.negative or (),
                                    backend_options={**s.backend_options(), **self.backend.options},
                                    callback=self._callback, cutn=s.cutn, cutouts=s.cutouts, retries=s.retries)
        except _Stopped:
            self.stopped = True
        except BaseException as e:  # handed to the event handler, which reports it
            self.error = e
        finally:
            self.events.put(("done",))


def _preview(images: torch.Tensor) -> Image.Image:
    """The batch side by side (2 px apart) as one PIL image."""
    if len(images) == 1:
        return to_pil(images)[0]
    b, _, h, w = images.shape
    canvas = torch.ones(3, h, b * w + (b - 1) * 2, device=images.device)
    for i, im in enumerate(images):
        canvas[:, :, i * (w + 2): i * (w + 2) + w] = im
    return to_pil(canvas[None])[0]


def _eta(elapsed: float, step: int, total: int) -> str:
    if step <= 0:
        return "?"
    return f"{max(0.0, elapsed / step * (total - step)):.0f} s"


class Text2Image:
    """The app's state (backends, limits, the output folder, running generations) and its event handlers.

    Args:
        limits: see :class:`Limits`.
        diffusion_model, vqgan_model: local model locations for those backends (default: the shipped ones).
        device: "cpu" / "cuda" (default: cuda if available).
        preview_every: stream a preview every this many steps.
    """

    def __init__(self, limits: Limits = Limits(), *, diffusion_model: Union[str, os.PathLike, None] = None,
                 vqgan_model: Union[str, os.PathLike, None] = None, device: Optional[str] = None,
                 preview_every: int = 2):
        self.limits = limits
        self.backends = find_backends(diffusion_model, vqgan_model)
        self.available = [n for n, b in self.backends.items() if b.available]
        self.default_backend = "diffusion" if "diffusion" in self.available else "pixels"
        self.clip_choices = local_clip_models()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.preview_every = preview_every
        self._outdir = tempfile.TemporaryDirectory(prefix="clipguide-app-")
        self.outdir = Path(self._outdir.name)
        self._slots = threading.BoundedSemaphore(limits.concurrency)
        self._runs: dict[str, set[Run]] = {}
        self._runs_lock = threading.Lock()

    # -- helpers the handlers share

    def validate(self, *args, **kwargs) -> Settings:
        """:func:`validate` with this app's limits, backends and CLIP models."""
        return validate(*args, limits=self.limits, backends=self.backends, clip_choices=self.clip_choices, **kwargs)

    def active_runs(self) -> list[Run]:
        with self._runs_lock:
            return [r for runs in self._runs.values() for r in runs]

    def save(self, result: clipguide.GuideResult, settings: Settings) -> list[Path]:
        """Write the run's images as PNGs with metadata into the app's own folder, under generated names."""
        paths = []
        model = self.backends[settings.backend].model
        for i, (image, score) in enumerate(zip(result.images, result.clip_score)):
            path = self.outdir / f"clipguide-{settings.seed}-{i}-{uuid.uuid4().hex[:12]}.png"
            image.save(path, format="PNG", pnginfo=png_info(settings, i, score, model))
            paths.append(path)
        return paths

    def backend_note(self) -> str:
        lines = [f"- **{n}**: not available here: {b.note}" for n, b in self.backends.items() if not b.available]
        return "Backends offered: " + ", ".join(f"`{n}`" for n in self.available) + (
            "\n\n" + "\n".join(lines) if lines else "")

    def warmup(self) -> float:
        """Load the default CLIP and run one tiny step of the default backend, so that the first visitor does not
        wait for imports and first-call set-up; returns the seconds it took."""
        start = time.perf_counter()
        info = self.backends[self.default_backend]
        guide("a red circle", backend=info.name, clip=perceptor((core_clip.DEFAULT_MODEL,), self.device), steps=1,
              size=max(info.native_size, MIN_SIZE), backend_options=info.options, cutn=1)
        return time.perf_counter() - start

    # -- event handlers

    def backend_defaults(self, backend: str):
        """When the backend changes: its default steps and native size, and only the advanced options it takes."""
        info = self.backends.get(backend) or self.backends[self.default_backend]
        diffusion = info.name == "diffusion"
        return (gr.update(value=min(info.default_steps, self.limits.max_steps)),
                gr.update(value=min(max(info.native_size, MIN_SIZE), self.limits.max_size)),
                gr.update(visible=info.optimised), gr.update(visible=diffusion), gr.update(visible=diffusion))

    def generate(self, prompt: str, negative: str, backend: str, steps: Any, size: Any, seed: Any,
                 random_seed: bool, batch: Any, cutn: Any, cutouts: str, lr: Any, scale: Any, scheduler: Any,
                 clip: Any, history: Optional[list], retries: Any = None, request: gr.Request = None,
                 progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:
        """The Generate event: validate, then stream previews and end with the results.

        Yields (preview image, gallery, status text, PNG files, seed used, history). The gallery lists this session's
        results, newest first, each captioned with its CLIP score; ``history`` is that list (the session's gr.State).
        """
        settings = self.validate(prompt, negative, backend, steps, size, seed, random_seed, batch, cutn, cutouts, lr,
                                 scale, scheduler, clip, retries)
        history = list(history or [])
        session = getattr(request, "session_hash", None) or ""
        run = Run(settings, self.backends[settings.backend], self.device, self._slots, self.preview_every)
        with self._runs_lock:
            self._runs.setdefault(session, set()).add(run)
        start = time.perf_counter()
        first_preview: Optional[float] = None
        label = f"{settings.backend}, {settings.steps} steps, {settings.size} px, seed {settings.seed}"
        try:
            progress((0, settings.steps), desc="loading models", unit="steps")
            run.start()
            yield gr.skip(), gr.skip(), f"Running ({label})...", gr.skip(), settings.seed, gr.skip()
            while True:
                event = run.events.get()
                while event[0] == "step":          # fallen behind? show the newest preview only
                    try:
                        newer = run.events.get_nowait()
                    except queue.Empty:
                        break
                    if newer[0] == "done":
                        run.events.put(newer)      # handled on the next turn, after this preview
                        break
                    event = newer
                if event[0] == "done":
                    break
                _, step, total, image = event
                elapsed = time.perf_counter() - start
                first_preview = elapsed if first_preview is None else first_preview
                eta = _eta(elapsed, step, total)
                retry = " (retrying: a picture failed its checks)" if total > settings.steps else ""
                progress((step, total), desc=f"step {step}/{total}, ETA {eta}", unit="steps")
                yield (image, gr.skip(), f"Step {step}/{total}{retry} ({label}), {elapsed:.1f} s, ETA {eta}",
                       gr.skip(), gr.skip(), gr.skip())
            run.thread.join()
            if run.stopped:
                yield (gr.skip(), gr.skip(), f"Stopped at step {run.steps_done}/{settings.steps} ({label}).",
                       gr.skip(), gr.skip(), gr.skip())
                return
            if run.error is not None:
                if isinstance(run.error, ClipguideError):
                    raise gr.Error(str(run.error))
                raise run.error
            result = run.result
            paths = self.save(result, settings)
            entries = [{"path": str(p), "caption": f"CLIP {s:.1f} · seed {settings.seed} · {settings.prompt}"}
                       for p, s in zip(paths, result.clip_score)]
            history = (entries[::-1] + history)[: self.limits.max_gallery]
            seconds = time.perf_counter() - start
            first = f", first preview after {first_preview:.1f} s" if first_preview is not None else ""
            scores = ", ".join(f"{s:.1f}" for s in result.clip_score)
            retries = result.retries
            redrawn = f" after {retries} {'retry' if retries == 1 else 'retries'}" if retries else ""
            status = (f"Done: {len(paths)} image(s) in {seconds:.1f} s{first} ({label}); "
                      f"CLIP score {scores}{redrawn}. "
                      "The PNGs carry prompt, seed and settings in their metadata.")
            yield (str(paths[0]), [(e["path"], e["caption"]) for e in history], status, [str(p) for p in paths],
                   settings.seed, history)
        finally:
            # a no-op after a normal end; on Stop / cancel / an error, the guide loop ends at its next step
            run.stop()
            with self._runs_lock:
                runs = self._runs.get(session, set())
                runs.discard(run)
                if not runs:
                    self._runs.pop(session, None)

    def stop(self, request: gr.Request = None) -> str:
        """The Stop event: ends this session's running generations at their next step."""
        session = getattr(request, "session_hash", None) or ""
        with self._runs_lock:
            runs = list(self._runs.get(session, ()))
        for run in runs:
            run.stop()
        return "Stopping..." if runs else "Nothing to stop."

    # -- the page

    def build(self) -> gr.Blocks:
        """The Blocks page, with its queue configured (concurrency per device, bounded size)."""
        lim = self.limits
        default = self.backends[self.default_backend]
        with gr.Blocks(title="clipguide: text to image", analytics_enabled=False) as demo:
            gr.Markdown("# clipguide: text to image\nCLIP steers an image generator towards your prompt.")
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0][0], lines=2, max_length=MAX_PROMPT_CHARS,
                                        elem_id="prompt", placeholder="a red circle on a blue background")
                    negative = gr.Textbox(label="Negative prompt (pushed away from)", max_length=MAX_PROMPT_CHARS,
                                          elem_id="negative", placeholder="blurry")
                    with gr.Accordion("Prompt syntax", open=False):
                        gr.Markdown(PROMPT_HELP)
                    backend = gr.Dropdown(self.available, value=self.default_backend, label="Backend",
                                          elem_id="backend")
                    gr.Markdown(self.backend_note(), elem_id="backend-note")
                    with gr.Row():
                        steps = gr.Slider(1, lim.max_steps, value=min(default.default_steps, lim.max_steps), step=1,
                                          label="Steps", elem_id="steps")
                        size = gr.Slider(MIN_SIZE, lim.max_size, value=min(default.native_size, lim.max_size),
                                         step=4, label="Size (px)", elem_id="size")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, minimum=0, maximum=SEED_LIMIT - 1, label="Seed",
                                         elem_id="seed")
                        random_seed = gr.Checkbox(value=False, label="Random seed (the seed used is shown)")
                        batch = gr.Slider(1, lim.max_batch, value=1, step=1, label="Batch size")
                    with gr.Accordion("Advanced", open=False):
                        cutn = gr.Slider(1, MAX_CUTN, value=16, step=1, label="Cutouts per image and step (cutn)")
                        cutouts = gr.Dropdown(CUTOUTS.names(), value="classic", label="Cutout scheme")
                        lr = gr.Number(value=None, label="Learning rate (blank: the backend's default)",
                                       visible=default.optimised, minimum=0, maximum=1)
                        scale = gr.Number(value=None, label="CLIP guidance scale (blank: default)",
                                          visible=default.name == "diffusion", minimum=0, maximum=MAX_SCALE)
                        scheduler = gr.Dropdown(SCHEDULERS.names(), value="ddpm", label="Sampler",
                                                visible=default.name == "diffusion")
                        clip = gr.CheckboxGroup(self.clip_choices, value=[core_clip.DEFAULT_MODEL],
                                                label="CLIP model(s) (local only)")
                        retries = gr.Number(value=None, precision=0, minimum=0, maximum=MAX_RETRIES,
                                            label="Retries: redraw a picture that CLIP scores below a true pair "
                                                  "(or, under a recipe's denoise judge, one unlike real pictures "
                                                  "or one the CLIP no longer recognises once the judge cleans it; "
                                                  "blank: the recipe's or backend's default, 2 for diffusion)")
                    with gr.Row():
                        run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                    gr.Examples(EXAMPLES, inputs=[prompt, negative], label="Examples (ShapesWorld prompts)")
                with gr.Column(scale=1):
                    status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="status")
                    preview = gr.Image(label="Image (live preview)", type="pil", format="png", interactive=False,
                                       height=320, elem_id="preview", buttons=["download"])
                    gallery = gr.Gallery(label="This visit's results (CLIP score in each caption)", columns=4,
                                         height=220, interactive=False, format="png", elem_id="gallery",
                                         object_fit="contain", fit_columns=False, preview=False,
                                         buttons=["download"])
                    files = gr.File(label="Download PNGs (prompt, seed and settings in their metadata)",
                                    file_count="multiple", interactive=False, elem_id="files")
            history = gr.State([])

            backend.change(self.backend_defaults, backend, [steps, size, lr, scale, scheduler], queue=False,
                           api_visibility="private")
            event = run_btn.click(self.generate,
                                  [prompt, negative, backend, steps, size, seed, random_seed, batch, cutn, cutouts,
                                   lr, scale, scheduler, clip, history, retries],
                                  [preview, gallery, status, files, seed, history], api_name="generate",
                                  concurrency_limit=lim.concurrency, concurrency_id="device",
                                  show_progress="full", show_progress_on=[status])
            stop_btn.click(self.stop, None, status, cancels=[event], queue=False, api_name="stop")
        demo.queue(max_size=lim.queue_size, default_concurrency_limit=lim.concurrency)
        demo.clipguide_app = self   # the handlers' owner, for tests and embedding
        return demo


# ShapesWorld pictures are 16-128 px: show them large and sharp.
CSS = """
#preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#gallery img { image-rendering: pixelated; }
"""


def build_app(limits: Limits = Limits(), **kwargs) -> gr.Blocks:
    """The app's Blocks (queue configured, not launched); keyword arguments go to :class:`Text2Image`."""
    return Text2Image(limits, **kwargs).build()


def launch(host: str = "127.0.0.1", port: int = 7860, *, block: bool = True, quiet: bool = False,
           warmup: bool = True, limits: Limits = Limits(), **kwargs) -> gr.Blocks:
    """Build and serve the app on ``host:port`` (loopback by default); ``block=False`` returns once serving.

    ``warmup`` runs one tiny generation first (see :meth:`Text2Image.warmup`); other keyword arguments go to
    :class:`Text2Image`.
    """
    app = Text2Image(limits, **kwargs)
    if warmup:
        app.warmup()
    demo = app.build()
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False, quiet=quiet,
                ssr_mode=False, show_error=True, css=CSS, pwa=False, mcp_server=False)
    return demo


if __name__ == "__main__":
    from clipguide.cli import main

    sys.exit(main(["app", *sys.argv[1:]]))
