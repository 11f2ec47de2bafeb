"""Reading and writing weights safely: safetensors or ``weights_only`` torch files, strict key checks, atomic writes."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "module")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, on the CPU.

    Torch files load with ``weights_only=True``: a file that needs to unpickle anything but tensors and plain
    containers is refused with :class:`CheckpointError`. Training checkpoints that wrap the weights in
    ``{"state_dict": ...}`` are unwrapped, and a DDP ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph of advice; the line after "WeightsUnpickler error:" names the object.
        lines = [line.strip() for line in str(e).split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
        first = lines[0] if lines else type(e).__name__
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors ({first}); "
            "only weights-only torch files and .safetensors are loaded"
        ) from None
    except Exception as e:  # corrupt or truncated files surface as many different exception types
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None

    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _preview(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``module``, raising :class:`CheckpointError` that lists every missing, unexpected
    and wrongly shaped key. A parameter stored with another shape but the same number of elements (a scalar
    ``logit_scale`` saved as shape [1]) is reshaped."""
    expected = module.state_dict()
    state = dict(state_dict)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = []
    for key in sorted(expected.keys() & state.keys()):
        want, got = expected[key].shape, state[key].shape
        if want != got:
            if want.numel() == got.numel():
                state[key] = state[key].reshape(want)
            else:
                mismatched.append(f"{key} (checkpoint {tuple(got)}, model {tuple(want)})")
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_preview(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model architecture; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def current_umask() -> int:
    """The process's file-mode creation mask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Atomically save tensors (made contiguous, on the CPU) as safetensors."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def saved_settings(saved: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """A run's saved settings, with each field of the dataclass ``config`` that the run predates filled in with its
    default: the value the run was written with, so that adding a setting keeps old runs resumable."""
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    return {**defaults, **saved}
