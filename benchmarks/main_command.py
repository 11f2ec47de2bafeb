"""Wall seconds of the README's main command, each run a fresh process, as a user types it.

Two variants alternate run by run, so a machine that speeds up or slows down mid-benchmark affects both alike:

    ours      the command as shipped
    plain     the same command with Python's cyclic garbage collector left alone during imports and at exit (the
              baseline for core_clip.startup: gc.disable / gc.freeze made no-ops before anything is imported)

and a light process per variant measures what importing alone costs (torch, open_clip, kornia, diffusers, then
exit). Prints each variant's median, min and max, and the ratio plain / ours. Run it in the venv of the README's
main command (``pip install -e .``): with the test extras there, open_clip also imports transformers (about 1 s).

    python benchmarks/main_command.py              # 5 runs of each
    python benchmarks/main_command.py --runs 10 --steps 30
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"
PLAIN = "import gc; gc.disable = gc.freeze = lambda: None\n"


def command(steps: int, out: Path, plain: bool) -> list[str]:
    argv = ["generate", PROMPT, "--backend", "diffusion", "--steps", str(steps), "--out", str(out)]
    code = (PLAIN if plain else "") + f"import sys; from clipguide.cli import main; sys.exit(main({argv!r}))"
    return [sys.executable, "-c", code]


def imports_only(plain: bool) -> list[str]:
    """The command's imports and exit, handled as the command handles them."""
    code = (PLAIN if plain else "") + ("import clipguide.cli\n"
                                       "from core_clip.startup import freeze_at_exit, paused_gc\n"
                                       "freeze_at_exit()\n"
                                       "with paused_gc():\n"
                                       "    from diffusers import DDPMScheduler, UNet2DModel\n")
    return [sys.executable, "-c", code]


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} ... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds


def summary(name: str, times: list[float]) -> str:
    return f"{name:<22} median {statistics.median(times):6.2f} s   min {min(times):6.2f}   max {max(times):6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="the README's main command asks for 30")
    args = parser.parse_args()
    times: dict[str, list[float]] = {k: [] for k in ("ours", "plain", "imports ours", "imports plain")}
    with tempfile.TemporaryDirectory() as tmp:
        wall(command(1, Path(tmp) / "warm.png", plain=False))   # first run compiles bytecode and fills page caches
        for run in range(args.runs):
            for plain in (False, True):
                name = "plain" if plain else "ours"
                times[name].append(wall(command(args.steps, Path(tmp) / f"{name}.png", plain)))
                times["imports " + name].append(wall(imports_only(plain)))
            print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  flush=True)
    print(f"\nclipguide generate {PROMPT!r} --backend diffusion --steps {args.steps} ({args.runs} runs each)")
    for name, values in times.items():
        print(summary(name, values))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ratio plain / ours: command {med['plain'] / med['ours']:.2f}x, "
          f"imports and exit {med['imports plain'] / med['imports ours']:.2f}x")


if __name__ == "__main__":
    main()
