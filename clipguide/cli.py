"""``clipguide``: the command line (see DESIGN.md for the contract)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

from core_clip import DEFAULT_MODEL, CoreClipError, load
from core_clip.cli import OneLineParser, emit, float_where, int_at_least, positive_int, run
from core_clip.data import read_pairs_csv
from core_clip.score import score_embeddings


def _pairs(args) -> list[tuple[Path, str]]:
    if args.prompt is not None:
        if not args.images:
            raise CoreClipError("score needs at least one IMAGE with --prompt")
        return [(Path(p), args.prompt) for p in args.images]
    by_path = {p.path.resolve(): p.caption for p in read_pairs_csv(args.captions)}
    if not args.images:
        return list(by_path.items())
    missing = [p for p in args.images if Path(p).resolve() not in by_path]
    if missing:
        raise CoreClipError(f"{args.captions} has no caption for {', '.join(missing)}")
    return [(Path(p), by_path[Path(p).resolve()]) for p in args.images]


def cmd_score(args) -> None:
    pairs = _pairs(args)
    model = load(args.clip, device=args.device)
    image_emb, _ = model.embed_files([p for p, _ in pairs])
    scores = score_embeddings(image_emb, [c for _, c in pairs], model).tolist()
    rows = [{"image": str(p), "caption": c, "clip_score": round(s, 4)} for (p, c), s in zip(pairs, scores)]
    mean = sum(scores) / len(scores)
    emit({"clip": args.clip, "scores": rows, "mean": round(mean, 4)}, args.json,
         [f"{r['clip_score']:8.4f}  {r['image']}  {r['caption']!r}" for r in rows] + [f"{mean:8.4f}  mean"])


def cmd_generate(args) -> None:
    from .guide import guide

    out = Path(args.out)
    names = ("lr", "colors", "palette", "scale", "scheduler", "recurrence", "candidates", "finalists", "screen",
             "polish", "model", "start", "blend")
    backend_options = {k: v for k in names if (v := getattr(args, k)) is not None}
    result = guide(args.prompt, backend=args.backend, clip=args.clip, steps=args.steps,
                   size=args.size, seed=args.seed, batch=args.batch, negative=args.negative,
                   image_prompts=args.image_prompt, init_image=args.init_image, frames=args.frames,
                   progress=not args.json, device=args.device, compile=args.compile, retries=args.retries,
                   accept_score=args.accept_score, denoise_judge=args.denoise_judge, accept_error=args.accept_error,
                   purify=args.purify,
                   recipe=None if args.no_recipe else "auto",
                   **{k: v for k, v in (("cutn", args.cutn), ("loss", args.loss), ("cutouts", args.cutouts),
                                        ("regularisers", dict(args.regulariser))) if v},
                   backend_options=backend_options)
    # the last guided step's loss: diffusion leaves its last steps (and everything, at scale 0) unguided
    guided = [losses["total"] for losses in result.losses if math.isfinite(losses["total"])]
    retries = result.retries
    retried = f", {retries} {'retry' if retries == 1 else 'retries'}" if retries else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(result.images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}")
                                                   for i in range(len(result.images))]
    for image, path in zip(result.images, paths):
        image.save(path)
    emit({"out": str(paths[0]), "outs": [str(p) for p in paths], "clip_score": round(result.clip_score[0], 4),
          "clip_scores": [round(s, 4) for s in result.clip_score], "seconds": round(result.seconds, 3),
          "steps": result.steps, "attempts": result.attempts, "backend": args.backend, "seed": args.seed,
          "clip": args.clip, "loss": round(guided[-1], 6) if guided else None,
          "denoise_errors": None if result.denoise_error is None else [round(e, 3) for e in result.denoise_error]},
         args.json,
         [f"{p}  clip_score {s:.2f}" for p, s in zip(paths, result.clip_score)]
         + [f"{result.steps} steps in {result.seconds:.1f} s ({args.backend}, seed {args.seed}{retried})"])


def cmd_app(args) -> None:
    """Serve the Gradio text-to-image app (apps/text2image.py) until interrupted."""
    from apps.text2image import launch

    launch(args.host, args.port)


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 1..65535, got {value!r}")
    return port


_positive_float = float_where(lambda x: 0 < x < math.inf, "a positive number")
_finite_float = float_where(math.isfinite, "a finite number")


def _weighted_name(value: str) -> tuple[str, float]:
    """NAME=WEIGHT -> (NAME, WEIGHT), WEIGHT finite."""
    name, sep, weight = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT, got {value!r}")
    return name, _finite_float(weight)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="clipguide", description="Steer image generators with CLIP.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("generate", help="make an image from a prompt")
    p.set_defaults(fn=cmd_generate)
    p.add_argument("prompt", help='"text:weight:stop | text:weight ..." (negative weights push away)')
    p.add_argument("--negative", action="append", default=[], metavar="TEXT", help="prompt to push away from")
    p.add_argument("--image-prompt", action="append", default=[], metavar="PATH",
                   help="image whose CLIP embedding is a target (PATH:weight:stop)")
    p.add_argument("--init-image", metavar="PATH", help="start from this image")
    p.add_argument("--backend", default="pixels", help="generator backend (pixels, fourier, ...)")
    p.add_argument("--clip", default=DEFAULT_MODEL, help="CLIP model name or path (see core_clip.load)")
    p.add_argument("--steps", type=positive_int, help="optimisation or sampling steps")
    p.add_argument("--size", metavar="W[xH]", help="output size in pixels (default: the backend's native size)")
    p.add_argument("--seed", type=int_at_least(0, "a non-negative integer"), default=0)
    p.add_argument("--cutn", type=positive_int, help="cutouts per image and step")
    p.add_argument("--loss", help="embedding loss (spherical, cosine, ...)")
    p.add_argument("--cutouts", help="cutout scheme (classic, pooled, disco, ...)")
    p.add_argument("--batch", type=positive_int, default=1, help="images made at once (OUT_0.png, OUT_1.png, ...)")
    p.add_argument("--regulariser", action="append", default=[], type=_weighted_name, metavar="NAME=WEIGHT",
                   help="image regulariser and its weight (tv, range, saturation, border, diffusion_prior, ...); "
                        "repeatable")
    p.add_argument("--lr", type=_positive_float, help="learning rate of optimisation backends")
    p.add_argument("--colors", type=int_at_least(2, "an integer >= 2"),
                   help="pixels backend: flat colour regions per image")
    p.add_argument("--palette", metavar="NAME|#RRGGBB,...",
                   help="pixels backend: draw only these colours (a named palette such as 'shapes', or a list); "
                        "vqgan: the flat or blob start's colours, the ones CLIP rates highest for the prompt")
    p.add_argument("--start", help="vqgan backend without --init-image: codes (a random code at every latent "
                                   "position), flat (a field of one colour) or blob (a field with a blob of another "
                                   "colour)")
    p.add_argument("--blend", action=argparse.BooleanOptionalAction, default=None,
                   help="vqgan with --start blob: keep every picture on the blend of the start's two colours")
    p.add_argument("--scale", type=_positive_float, help="CLIP guidance scale of the diffusion backend")
    p.add_argument("--scheduler", help="diffusion sampler (ddpm, ddim, euler, euler_a, dpm, heun, unipc)")
    p.add_argument("--recurrence", type=positive_int,
                   help="diffusion: times each guided or low-noise step is taken (1: off; default 3 with ddpm, ddim)")
    p.add_argument("--candidates", type=positive_int,
                   help="diffusion: candidates per image; the --finalists with the lowest guidance loss go on after a "
                        "fifth of the steps (default 4 with ddpm, ddim)")
    p.add_argument("--finalists", type=positive_int,
                   help="diffusion: the best candidates per image that go on to the end, where the one whose picture "
                        "has the lowest guidance loss is kept (default 2 when there are candidates)")
    p.add_argument("--screen", type=positive_int,
                   help="diffusion: candidates per image drawn unguided for a tenth of the steps, of which the "
                        "--candidates with the lowest guidance loss go on (1: off; default 12 x --candidates)")
    p.add_argument("--polish", type=int_at_least(0, "a non-negative integer"),
                   help="diffusion: noisy copies whose x0 estimates are averaged at the end (0: off; default 16)")
    p.add_argument("--retries", type=int_at_least(0, "a non-negative integer"),
                   help="redraw a picture scoring below --accept-score (or failing --denoise-judge) up to N times, "
                        "keeping the best (default: the recipe's, 6 for pixels and vqgan on the shapes CLIP; else 2 for "
                        "guided diffusion, 0 otherwise)")
    p.add_argument("--accept-score", type=float_where(lambda x: 0 <= x <= 100, "a CLIP score in [0, 100]"),
                   help="CLIP score a picture must reach (default: the CLIP's calibrated match score)")
    p.add_argument("--denoise-judge", metavar="MODEL",
                   help="a pixel diffusion model (e.g. shapes) that also judges each picture: one it would change "
                        "by more than --accept-error when cleaning it is redrawn too (see --retries)")
    p.add_argument("--accept-error", type=_positive_float,
                   help="denoise error (RMS, 0-255 levels) a picture may have (default: the recipe's limit for "
                        "its judge, else the judge's calibrated value)")
    p.add_argument("--purify", type=float_where(lambda x: 0 < x < 1, "a number in (0, 1)"), metavar="LEVEL",
                   help="with --denoise-judge: test the CLIP score of the judge's clean estimates of each picture "
                        "noised to this fraction of its timesteps, not of the picture itself, so one that fools the "
                        "CLIP with detail the judge removes is redrawn (default: the recipe's, 0.2 for vqgan)")
    p.add_argument("--no-recipe", action="store_true",
                   help="ignore the recipe registered for this CLIP and backend (clipguide.recipes; the shipped "
                        "shapes CLIP has one for pixels and one for vqgan) and use the backend's own defaults")
    p.add_argument("--model", help="the vqgan or diffusion backend's model: a shipped or public name, or a path")
    p.add_argument("--out", default="clipguide.png", metavar="FILE.png")
    p.add_argument("--frames", metavar="DIR", help="write every step's image here (and frames.mp4)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile CLIP and the decoder (slow start, faster steps: for long runs on a GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")

    p = sub.add_parser("score", help="CLIP score of images against a prompt or their captions")
    p.set_defaults(fn=cmd_score)
    p.add_argument("images", nargs="*", metavar="IMAGE")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one caption scored against every IMAGE")
    group.add_argument("--captions", help="CSV of path,caption rows (scores every row, or only the IMAGEs given)")
    p.add_argument("--clip", default=DEFAULT_MODEL, help="CLIP model name or path (see core_clip.load)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")

    p = sub.add_parser("app", help="serve the text-to-image web app (Gradio) on this machine")
    p.set_defaults(fn=cmd_app)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=_port, default=7860)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)
