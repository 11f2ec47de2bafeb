"""Pretrained files from the Hugging Face hub and public URLs: local cache first, and a fast, clear failure offline.

huggingface_hub retries a failed connection for tens of seconds; offline, that is a hang with a confusing
traceback. Here a cache miss is followed by one short connection probe, and an unreachable hub raises
:class:`WeightsUnavailableError` saying exactly which file to fetch and where it goes.
"""
from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

from .checkpoint import atomic_write
from .errors import WeightsUnavailableError

PROBE_TIMEOUT_S = 3.0


def hub_reachable(url: str | None = None) -> bool:
    """True if a TCP connection to the hub (or ``url``'s host) opens within a few seconds, and the hub is not
    switched off with ``HF_HUB_OFFLINE``. A ``file://`` url is reachable when its file exists."""
    from huggingface_hub import constants

    if url is None and constants.HF_HUB_OFFLINE:
        return False
    parsed = urlparse(url or constants.ENDPOINT)
    if parsed.scheme == "file":
        return Path(parsed.path).is_file()
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def fetch(repo_id: str, filenames: Sequence[str], what: str) -> Path:
    """Return a local path to the first of ``filenames`` in hub repo ``repo_id``, from the cache or downloaded.

    ``what`` names the model for the error message. Raises :class:`WeightsUnavailableError` when none is cached
    and the hub cannot be reached, or when the repo has none of the files.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    for name in filenames:
        cached = try_to_load_from_cache(repo_id, name)
        if isinstance(cached, str):
            return Path(cached)
    if not hub_reachable():
        raise WeightsUnavailableError(
            f"{what}: {repo_id}/{filenames[0]} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and the hub cannot be reached. On a connected machine run `hf download {repo_id} {filenames[0]}` "
            f"and copy the cache folder here (or set HF_HOME to it), or pass the downloaded file's path to "
            f"core_clip.load()"
        )
    errors = []
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name))
        except Exception as e:  # missing file, gated repo, network drop: try the next candidate
            errors.append(f"{name}: {type(e).__name__}")
    raise WeightsUnavailableError(f"{what}: could not download any of {list(filenames)} from {repo_id} "
                                  f"({'; '.join(errors)})")


def fetch_url(url: str, what: str) -> Path:
    """Return the cached copy of ``url`` in open_clip's URL cache (~/.cache/clip), downloading it if reachable."""
    import open_clip

    target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if target.is_file():
        return target
    if not hub_reachable(url):
        raise WeightsUnavailableError(
            f"{what}: {url} is not cached at {target} and cannot be reached; download it on a connected machine "
            f"and put it at {target}, or pass its path to core_clip.load()"
        )
    return Path(open_clip.download_pretrained_from_url(url))


def download(url: str, target: str | os.PathLike, what: str) -> Path:
    """Download ``url`` to ``target`` with a progress bar; ``target`` appears only once the whole file is there, so
    an interrupted download never leaves a truncated file behind. Raises :class:`WeightsUnavailableError` naming
    ``what`` when the transfer fails."""
    from tqdm.auto import tqdm

    def write(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(target).name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))

    try:
        return atomic_write(target, write)
    except OSError as e:  # URLError and HTTPError are OSErrors
        raise WeightsUnavailableError(f"{what}: downloading {url} failed ({type(e).__name__}: {e})") from None
