"""``core-clip``: the command line. Bad arguments, missing files and unreadable images exit with code 2 and one
line on stderr; ``--json`` prints exactly one JSON object on the last line of stdout."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import CoreClipError
from .model import DEFAULT_MODEL, load
from .startup import freeze_at_exit


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors as one line on stderr and exit code 2."""

    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _labels(value: str) -> list[str]:
    labels = [s.strip() for s in value.split(",") if s.strip()]
    if len(labels) < 2:
        raise argparse.ArgumentTypeError("--labels needs at least two comma-separated labels")
    return labels


def int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``, else an error saying "expected <what>"."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n
    return parse


positive_int = int_at_least(1, "a positive integer")


def float_where(ok: Callable[[float], bool], what: str):
    """An argparse type: a number for which ``ok`` holds (NaN never does), else an error saying "expected <what>"."""
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return x
    return parse


def emit(result: dict, as_json: bool, lines: Sequence[str]) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        print("\n".join(lines))


def cmd_zeroshot(args) -> None:
    from .preprocess import open_image
    from .zeroshot import ZeroShotClassifier

    images = [open_image(p) for p in args.images]
    model = load(args.model, device=args.device)
    classifier = ZeroShotClassifier(model, args.labels, args.template or ["{}", "a photo of a {}"])
    probs = torch.cat([classifier.probs(im) for im in images]).cpu()
    predictions = [{"image": path, "label": args.labels[int(p.argmax())],
                    "probs": {name: round(float(v), 6) for name, v in zip(args.labels, p)}}
                   for path, p in zip(args.images, probs)]
    emit({"model": args.model, "predictions": predictions}, args.json,
          [f"{p['image']}\t{p['label']}\t{p['probs'][p['label']]:.3f}" for p in predictions])


def cmd_eval(args) -> None:
    from .evaluate import eval_digits, eval_pairs, eval_shapes

    model = load(args.model, device=args.device)
    if args.data == "shapes":
        results = eval_shapes(model, n=args.n, seed=args.seed)
    elif args.data == "digits":
        results = eval_digits(model)
    else:
        results = eval_pairs(model, args.data)
    emit({"model": args.model, "data": args.data, **results}, args.json,
          [f"{k:28s} {v:.4f}" for k, v in results.items()])


def cmd_calibrate(args) -> None:
    from .calibrate import match_score, record_match_score

    model = load(args.model, device=args.device)
    score = match_score(model, args.data, n=args.n, quantile=args.quantile, seed=args.seed,
                        progress=not args.json)
    path = record_match_score(args.model, score) if args.write else None
    emit({"model": args.model, "data": args.data, "quantile": args.quantile, "match_score": round(score, 2),
          "written": str(path) if path else None}, args.json,
         [f"match score {score:.2f}: {1 - args.quantile:.0%} of true pairs of {args.data} score at least this"]
         + ([f"recorded in {path}"] if path else []))


def cmd_embed(args) -> None:
    from .retrieval import EmbeddingIndex

    if bool(args.images) == bool(args.text):
        raise CoreClipError("embed takes either IMAGE paths or --text, not both or neither")
    model = load(args.model, device=args.device)
    if args.text:
        emb, items = model.encode_text(args.text), list(args.text)
    else:
        emb, kept = model.embed_files(args.images)
        items = [str(p) for p in kept]
    EmbeddingIndex(items, emb.cpu(), args.model).save(args.out)
    emit({"out": args.out, "n": len(items), "dim": emb.shape[1]}, args.json,
         [f"wrote {len(items)} embeddings to {args.out}"])


def cmd_index(args) -> None:
    from .retrieval import EmbeddingIndex

    model = load(args.model, device=args.device)
    index = EmbeddingIndex.build(args.folder, model, progress=not args.json)
    index.save(args.out)
    emit({"out": args.out, "n": len(index.paths), "model": args.model}, args.json,
          [f"indexed {len(index.paths)} images from {args.folder} into {args.out}"])


def cmd_search(args) -> None:
    from .retrieval import EmbeddingIndex

    index = EmbeddingIndex.load(args.index)
    model = load(args.model or index.model, device=args.device)
    query = model.encode_text(args.text) if args.text else model.embed_files([args.image])[0]
    if query.shape[1] != index.embeddings.shape[1]:
        raise CoreClipError(f"{args.index} was built with {index.model} ({index.embeddings.shape[1]}-d), "
                            f"not {model.name} ({query.shape[1]}-d)")
    hits = index.search(query, args.k)[0]
    emit({"index": args.index, "query": args.text or args.image, "results": [{"path": p, "score": s} for p, s in hits]},
          args.json, [f"{s:.4f}\t{p}" for p, s in hits])


_FLAG_TYPES = {"str": str, "int": int, "float": float}


def add_dataclass_flags(parser: argparse.ArgumentParser, config_fields) -> None:
    """One ``--flag`` per dataclass field (``help`` from the field's metadata); bools get ``--x/--no-x``."""
    for f in config_fields:
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata.get("help")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif f.default is dataclasses.MISSING:
            parser.add_argument(flag, type=_FLAG_TYPES[f.type], required=True, help=help_text)
        else:
            parser.add_argument(flag, type=_FLAG_TYPES[f.type], default=f.default, help=f"{help_text} ({f.default})")


def cmd_train(args) -> None:
    from .train import TrainConfig, train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.json:
        cfg.progress = False
    model = train(cfg)
    out = str(Path(cfg.out) / "model.safetensors")
    emit({"out": out, "model": model.name}, args.json, [f"trained model saved to {out}"])


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="core-clip", description="Serve and evaluate CLIP models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def command(name: str, fn, help: str, model_default: str | None = DEFAULT_MODEL):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        p.add_argument("--model", default=model_default,
                       help="shipped name, open_clip ARCH[:TAG], hf-hub:ORG/REPO, or a local file/folder")
        p.add_argument("--device", default=None, choices=["cpu", "cuda"])
        p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
        return p

    p = command("zeroshot", cmd_zeroshot, "classify images among labels")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--labels", type=_labels, required=True, help="comma-separated class names")
    p.add_argument("--template", action="append", help="prompt template with one {} (repeatable)")

    p = sub.add_parser("train", help="contrastive training (also: torchrun ... -m core_clip.train)",
                       description="Train or fine-tune a CLIP on image-caption pairs.")
    p.set_defaults(fn=cmd_train)
    from .train import TrainConfig

    add_dataclass_flags(p, dataclasses.fields(TrainConfig))
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")

    p = command("eval", cmd_eval, "zero-shot accuracy and retrieval R@1/5/10 on a dataset")
    p.add_argument("--data", required=True, help="shapes, digits, or a CSV of path,caption rows")
    p.add_argument("--n", type=positive_int, default=2000, help="ShapesWorld images to render (seen pairs)")
    p.add_argument("--seed", type=int, default=0)

    p = command("calibrate", cmd_calibrate, "measure the CLIP score true pairs reach and record it in the "
                "model's config (guidance retries pictures below it)")
    p.add_argument("--data", required=True, help="shapes, digits, a CSV of path,caption rows, or a captioned folder")
    p.add_argument("--n", type=positive_int, default=2000, help="pairs to score (ShapesWorld: fresh test scenes)")
    p.add_argument("--quantile", type=float_where(lambda x: 0 < x < 1, "a number in (0, 1)"), default=0.01,
                   help="share of true pairs allowed below the score")
    p.add_argument("--seed", type=int_at_least(0, "a non-negative integer"), default=0)
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=True,
                   help="record the score in the model's json config (default) or only print it")

    p = command("embed", cmd_embed, "embed images or texts into a safetensors file")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--text", action="append", help="text to embed (repeatable)")
    p.add_argument("--out", required=True)

    p = command("index", cmd_index, "embed every image in a folder into a searchable index")
    p.add_argument("folder")
    p.add_argument("--out", required=True)

    p = command("search", cmd_search, "search an index by text or image", model_default=None)
    p.add_argument("index")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--text")
    group.add_argument("--image")
    p.add_argument("-k", type=positive_int, default=5)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and call the chosen command's ``fn(args)``; library errors become exit code 2 with one line."""
    args = parser.parse_args(argv)
    freeze_at_exit()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except CoreClipError as e:  # every bad-input error of core_clip and clipguide is a ValueError subclass
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
