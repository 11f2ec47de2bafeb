"""What the project's own generator-training scripts share: seeded ShapesWorld batches, the LR schedule, resuming
and the command line."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from core_clip import shapes
from core_clip.checkpoint import saved_settings
from core_clip.errors import CoreClipError
from core_clip.model import PRECISIONS as CLIP_PRECISIONS

from .errors import ClipguideError

#: ``--precision`` of the training scripts: the autocast dtype of the network's forward pass (weights, optimiser state
#: and losses stay fp32). bf16 runs on this AVX512-BF16/AMX CPU's matrix units. core_clip's names and dtypes, less
#: fp16, which would need a gradient scaler that these scripts do not have.
PRECISIONS = {name: dtype for name, dtype in CLIP_PRECISIONS.items() if name != "fp16"}

# Config fields a resumed run may change: where and how often it writes, what it reports, where it runs.
_RESUME_FREE = frozenset({"out", "resume", "save_every", "eval_images", "device"})


def shapes_batch(step: int, batch_size: int, size: int, seed: int) -> torch.Tensor:
    """Training batch ``step``: fresh ShapesWorld renders of the train split (held-out pairs never appear) as float
    [batch_size, 3, size, size] in [-1, 1]. A pure function of (step, batch_size, size, seed), so a resumed run sees
    the same data as an uninterrupted one."""
    stream = seed * 1_000_003 + step
    scenes = shapes.sample_scenes(batch_size, seed=stream, split="train")
    images = torch.from_numpy(shapes.render_batch(scenes, size, seed=stream))
    # contiguous NCHW: a permuted (channels-last) batch would carry its layout through every conv, and the bf16
    # GroupNorm backward on channels-last tensors runs at a fraction of its speed on CPU
    return images.permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1


def check_precision(precision: str) -> None:
    """Raise ClipguideError unless ``precision`` names one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ClipguideError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def set_warmup_cosine_lr(optimizer: torch.optim.Optimizer, step: int, steps: int, warmup: int, lr: float) -> float:
    """Set every group's learning rate for ``step`` (0-based): linear warmup over ``warmup`` steps, then cosine decay
    to 0 at ``steps``. Returns the rate set."""
    value = lr * min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / steps))
    for group in optimizer.param_groups:
        group["lr"] = value
    return value


Config = TypeVar("Config")


def parse_config(config_cls: type[Config], prog: str, description: str,
                 argv: Optional[Sequence[str]] = None) -> Config:
    """A training script's command line: ``--out`` (required) and one ``--flag`` per other field of the dataclass
    ``config_cls``, typed and defaulted by the field (booleans become switches)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True)
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    return config_cls(**vars(parser.parse_args(argv)))


def run_settings(cfg: Any) -> dict:
    """The fields of a training config (a dataclass) that shape its trajectory; saved with every checkpoint."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _RESUME_FREE}


def load_resume_state(out: Path, cfg: Any, device: str | torch.device = "cpu") -> dict:
    """``out``/state.pt (weights only) after checking that ``cfg`` continues the run that wrote it: a changed
    setting (say ``steps``, which reshapes the learning-rate schedule) raises ClipguideError naming it."""
    path = Path(out) / "state.pt"
    if not path.is_file():
        raise ClipguideError(f"nothing to resume in {out}: no state.pt there (run once without --resume)")
    state = torch.load(path, weights_only=True, map_location=device)
    saved = saved_settings(state.get("settings", {}), cfg)
    changed = [f"{k}={saved[k]!r} -> {v!r}" for k, v in run_settings(cfg).items() if k in saved and saved[k] != v]
    if changed:
        raise ClipguideError(f"{out} was written with other settings ({', '.join(changed)}); resume with the "
                             "same ones, or start a new --out")
    return state


def run_script(train: Callable[[Config], Any], config_cls: type[Config], prog: str, description: str,
               argv: Optional[Sequence[str]] = None) -> int:
    """A training script's ``main``: parse, train; bad settings or unreadable weights print one line and exit with 2."""
    try:
        train(parse_config(config_cls, prog, description, argv))
    except CoreClipError as e:  # ClipguideError, and CheckpointError from a weights file
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return 0
