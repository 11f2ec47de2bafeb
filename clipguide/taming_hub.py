"""The public taming-transformers VQGANs by name: fetched once to a local cache, or a clear message offline.

    load_vqgan("imagenet-f16-16384")   # ~/.cache/clipguide/taming/imagenet-f16-16384.yaml + .ckpt

The cache folder is ``$CLIPGUIDE_CACHE/taming`` (default ``~/.cache/clipguide/taming``). A name whose two files are
there loads without any network access; otherwise they are downloaded when their host answers, and when it does
not, :class:`~core_clip.errors.WeightsUnavailableError` says which URL goes to which path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core_clip import hub
from core_clip.errors import WeightsUnavailableError


@dataclass(frozen=True)
class TamingCheckpoint:
    """Where a public taming model's config (yaml) and Lightning checkpoint (ckpt) are published."""

    yaml_url: str
    ckpt_url: str


def _heibox(share: str) -> TamingCheckpoint:
    url = f"https://heibox.uni-heidelberg.de/d/{share}/files/?p=%2F{{}}&dl=1"
    return TamingCheckpoint(url.format("configs%2Fmodel.yaml"), url.format("ckpts%2Flast.ckpt"))


# The checkpoints of the taming-transformers README that VQGAN+CLIP uses; their architectures are TAMING_CONFIGS.
TAMING_CHECKPOINTS: dict[str, TamingCheckpoint] = {
    "imagenet-f16-1024": _heibox("8088892a516d4e3baf92"),
    "imagenet-f16-16384": _heibox("a7530b09fed84f80a887"),
    "gumbel-f8": _heibox("2e5662443a6b4307b470"),
}


def cache_dir() -> Path:
    """Folder holding the named checkpoints: ``$CLIPGUIDE_CACHE/taming`` or ``~/.cache/clipguide/taming``."""
    root = os.environ.get("CLIPGUIDE_CACHE") or Path.home() / ".cache" / "clipguide"
    return Path(root) / "taming"


def fetch_taming(name: str) -> Path:
    """Local path of named checkpoint ``name``'s yaml (its .ckpt lies beside it), downloading what is missing.

    Raises KeyError for a name not in TAMING_CHECKPOINTS and WeightsUnavailableError when files are missing and
    their host cannot be reached.
    """
    source = TAMING_CHECKPOINTS[name]
    yaml_path = cache_dir() / f"{name}.yaml"
    files = ((source.yaml_url, yaml_path), (source.ckpt_url, yaml_path.with_suffix(".ckpt")))
    wanted = [(url, path) for url, path in files if not path.is_file()]
    if wanted and not all(hub.hub_reachable(url) for url, _ in wanted):
        steps = "; ".join(f"download {url} to {path}" for url, path in wanted)
        raise WeightsUnavailableError(f"VQGAN {name!r} is not in {cache_dir()} and its host cannot be reached. On a "
                                      f"connected machine: {steps} (or set CLIPGUIDE_CACHE to a folder holding "
                                      f"them), or pass a taming .yaml with its .ckpt beside it")
    for url, path in wanted:
        hub.download(url, path, f"VQGAN {name!r}")
    return yaml_path
