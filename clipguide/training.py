"""What the project's own generator-training scripts share: seeded ShapesWorld batches and the LR schedule."""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Optional, Sequence, TypeVar

import torch

from core_clip import shapes


def shapes_batch(step: int, batch_size: int, size: int, seed: int) -> torch.Tensor:
    """Training batch ``step``: fresh ShapesWorld renders of the train split (held-out pairs never appear) as float
    [batch_size, 3, size, size] in [-1, 1]. A pure function of (step, batch_size, size, seed), so a resumed run sees
    the same data as an uninterrupted one."""
    stream = seed * 1_000_003 + step
    scenes = shapes.sample_scenes(batch_size, seed=stream, split="train")
    images = torch.from_numpy(shapes.render_batch(scenes, size, seed=stream))
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


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
