"""Start-up and exit costs of a process that imports torch, open_clip and diffusers.

Those imports leave about half a million objects that Python's cyclic garbage collector tracks (modules, classes,
functions, sympy and dynamo tables). The collector rescans the growing heap again and again while they load, and
once more in full when the interpreter exits: on a 2-core CPU that is about 1 s of import and 1.5 s of exit in every
command-line run.
Nothing created at import is garbage worth collecting, so the packages import with the collector paused
(:func:`paused_gc`), and the command-line entry points freeze what is alive at exit (:func:`freeze_at_exit`).
Neither changes what a program computes.
"""
from __future__ import annotations

import atexit
import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic garbage collector inside the block and restore its previous state after it (so blocks
    nest, and a collector the caller disabled stays disabled). Reference counting frees objects as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_freeze_registered = False


def freeze_at_exit() -> None:
    """Make the interpreter's exit skip its final full collection over every object alive then (``gc.freeze`` at
    exit). For command-line processes, whose files are closed when their command returns: unreachable cycles
    alive at exit are left to the operating system rather than finalised. Registering twice is a no-op."""
    global _freeze_registered
    if not _freeze_registered:
        atexit.register(gc.freeze)
        _freeze_registered = True
