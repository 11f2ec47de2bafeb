"""Does guidance draw what the prompt says? ShapesWorld prompts judged by the analytic oracle, never by CLIP.

    python -m clipguide.evaluate --backend pixels            # the 21 seen colour-shape pairs x 2 backgrounds
    python -m clipguide.evaluate --backend pixels --held-out # the 3 held-out pairs x 2 backgrounds

Each prompt is "a {color} {shape} on a {background} background"; an image is fully right when the oracle reads
that colour, shape and background.

    python -m clipguide.evaluate --backend pixels --from-truth  # start each run from the true picture

``--from-truth`` checks the CLIP rather than the backend: guidance that starts on a true picture of its prompt (a
large centred shape) should keep it true. A CLIP whose loss does not have its minimum at real pictures moves away
from them, and then no parameterisation will find them from a random start.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from core_clip import shapes
from core_clip.cli import OneLineParser, emit, int_at_least, run

from .errors import ClipguideError
from .guide import guide


ATTRIBUTES = ("color", "background", "shape")  # what a prompt names and the oracle must read back


@dataclass(frozen=True)
class Case:
    color: str
    shape: str
    background: str

    @property
    def prompt(self) -> str:
        return f"{shapes.with_article(self.color)} {self.shape} on {shapes.with_article(self.background)} background"

    def right(self, reading: dict) -> dict[str, bool]:
        """For each of :data:`ATTRIBUTES`, whether the oracle's ``reading`` (:func:`shapes.read`) says what this case
        does."""
        return {k: reading[k] == getattr(self, k) for k in ATTRIBUTES}


def cases(held_out: bool = False, backgrounds: int = 2) -> list[Case]:
    """Colour-shape pairs (seen or held-out), each on ``backgrounds`` background colours chosen by a fixed rotation
    through the palette (never the shape's own colour), so every background appears about equally often."""
    colors = list(shapes.COLORS)
    if not 1 <= backgrounds < len(colors):
        raise ClipguideError(f"backgrounds must be 1-{len(colors) - 1} (the colours other than the shape's), "
                             f"got {backgrounds}")
    pairs = [(c, s) for s in shapes.SHAPES for c in colors if ((c, s) in shapes.HELD_OUT) == held_out]
    out = []
    for i, (color, shape) in enumerate(pairs):
        options = [b for b in colors if b != color]
        out += [Case(color, shape, options[(3 * i + k * 3) % len(options)]) for k in range(backgrounds)]
    return out


def true_picture(case: Case, size: int = 64) -> torch.Tensor:
    """The nominal picture of ``case``: a large centred shape, float [1, 3, size, size] in [0, 1]."""
    scene = shapes.Scene(case.shape, case.color, case.background, "large", "center")
    return torch.from_numpy(shapes.render(scene, size)).permute(2, 0, 1)[None].float() / 255


def evaluate(case_list: Sequence[Case], *, progress: bool = True, from_truth: bool = False, seed: int = 0,
             **guide_options) -> dict:
    """Guide case i with ``guide(case.prompt, seed=seed + i, **guide_options)`` and read the picture with the
    oracle; ``from_truth`` starts every run from the case's :func:`true_picture` (``init_image``). Another ``seed``
    repeats the evaluation on other draws.

    Returns {"n", "color", "background", "shape", "all" (fractions right), "seconds" (mean per image), "rows"}.
    """
    rows = []
    for i, case in enumerate(tqdm(case_list, desc="evaluate", disable=not progress)):
        start = {"init_image": true_picture(case)} if from_truth else {}
        result = guide(case.prompt, seed=seed + i, **guide_options, **start)
        reading = shapes.read(result.tensor[0])
        rows.append({"prompt": case.prompt, "reading": reading, "seconds": result.seconds,
                     "clip_score": result.clip_score[0], "attempts": result.attempts[0],
                     "denoise_error": result.denoise_error[0] if result.denoise_error else None,
                     "purified_score": result.purified_score[0] if result.purified_score else None,
                     "right": case.right(reading)})
    n = len(rows)
    summary = {k: sum(r["right"][k] for r in rows) / n for k in ATTRIBUTES}
    summary["all"] = sum(all(r["right"].values()) for r in rows) / n
    return {"n": n, **summary, "seconds": sum(r["seconds"] for r in rows) / n, "rows": rows}


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def _run(args: argparse.Namespace) -> None:
    options = {"steps": args.steps} if args.steps else {}
    if args.backend_options:
        options["backend_options"] = args.backend_options
    options.update(args.guidance_options)
    start = time.perf_counter()
    report = evaluate(cases(args.held_out, args.backgrounds), backend=args.backend, clip=args.clip,
                      from_truth=args.from_truth, seed=args.seed, **options)
    lines = [f"{'ok ' if all(r['right'].values()) else '   '}{r['prompt']:45s} -> {r['reading']['color']} "
             f"{r['reading']['shape']} on {r['reading']['background']}" for r in report["rows"]]
    lines.append(f"{report['n']} images: colour {report['color']:.0%}, background {report['background']:.0%}, "
                 f"shape {report['shape']:.0%}, all three {report['all']:.0%}; "
                 f"{report['seconds']:.1f} s per image, {time.perf_counter() - start:.0f} s total")
    emit(report, args.json, lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; bad input (an unknown backend or CLIP, bad JSON options) exits 2 with one line."""
    parser = OneLineParser(prog="python -m clipguide.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="pixels")
    parser.add_argument("--clip", default="shapes")
    parser.add_argument("--held-out", action="store_true", help="the held-out colour-shape pairs")
    parser.add_argument("--backgrounds", type=int_at_least(1, "a positive integer"), default=2)
    parser.add_argument("--steps", type=int_at_least(1, "a positive integer"), default=None)
    parser.add_argument("--backend-options", type=_json_object, default=None, metavar="JSON",
                        help='options of the backend, e.g. \'{"colors": 2}\'')
    parser.add_argument("--guidance-options", type=_json_object, default={}, metavar="JSON",
                        help='guide() keywords: GuidanceConfig fields and retries / accept_score / denoise_judge / '
                             'accept_error / recipe (null: no recipe), e.g. '
                             '\'{"regularisers": {"border": 5}, "retries": 2}\' (backend settings go in '
                             '--backend-options)')
    parser.add_argument("--from-truth", action="store_true", help="start every run from the true picture")
    parser.add_argument("--seed", type=int_at_least(0, "a non-negative integer"), default=0,
                        help="the first prompt's seed (prompt i uses seed + i): another one repeats on other draws")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(fn=_run)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
