"""Command line: `python -m blip2_app caption|ask|index|search|models|evaluate ...`, over the same engine.

`evaluate` is `blip2_app.training.evaluate` (caption, VQA and retrieval metrics on a dataset); its
arguments are that module's own.

Failures print one line (`error: ...`) on stderr and exit non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import Settings, add_arguments
from .errors import UserFacingError
from .generation import DECODINGS
from .images import ImageDecodeError
from .prompts import MAX_QUERY_CHARS, clean_text

EXIT_USER_ERROR = 2
MODEL_FLAGS = (
    "model",
    "precision",
    "vision_precision",
    "qformer_precision",
    "llm_precision",
    "device",
    "models_file",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_app", description="BLIP-2 Studio on the command line."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    caption = commands.add_parser("caption", help="caption one or more images")
    add_arguments(caption, os.environ, only=MODEL_FLAGS)
    caption.add_argument("--style", choices=("short", "detailed"), default="short")
    caption.add_argument("--prompt", help="custom style: the text the caption continues, passed as is")
    caption.add_argument("--decoding", choices=DECODINGS)
    caption.add_argument("--num-beams", type=int)
    caption.add_argument("--max-new-tokens", type=int)
    caption.add_argument("--min-new-tokens", type=int)
    caption.add_argument("--num-captions", type=int)
    caption.add_argument("--temperature", type=float)
    caption.add_argument("--top-p", type=float)
    caption.add_argument("--repetition-penalty", type=float)
    caption.add_argument("--seed", type=int)
    caption.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    caption.add_argument("images", nargs="+")

    ask = commands.add_parser("ask", help="answer a question about an image (one VQA turn)")
    add_arguments(ask, os.environ, only=MODEL_FLAGS)
    ask.add_argument("--json", action="store_true")
    ask.add_argument("image")
    ask.add_argument("question")

    index = commands.add_parser("index", help="embed a folder of images into a search index")
    add_arguments(index, os.environ, only=MODEL_FLAGS)
    index.add_argument("folder")
    index.add_argument("--out", required=True, help="folder to write the index to")

    search = commands.add_parser("search", help="search an index by text")
    add_arguments(search, os.environ, only=MODEL_FLAGS)
    search.add_argument("index_dir")
    search.add_argument("query")
    search.add_argument("--top-k", type=_positive_int, default=5)
    search.add_argument("--json", action="store_true")

    commands.add_parser("models", help="list the registry's model names")
    commands.add_parser(
        "evaluate",
        help="caption, VQA and retrieval metrics of a model on a dataset "
        "(python -m blip2_app evaluate --help for its options)",
        add_help=False,
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, not {text!r}")
    return value


def _engine(args: argparse.Namespace, retrieval: bool):
    from .startup import load_engine

    settings = Settings.from_namespace(args)
    if retrieval:
        from .registry import Registry

        registry = Registry.load([settings.models_file] if settings.models_file else [])
        entry = registry.resolve(settings.model)
        if entry.family.generates_text:  # use the model's retrieval partner alone
            if not entry.retrieval:
                raise UserFacingError(f"{entry.name} has no retrieval model; pass one with --model.")
            settings = settings.replace(model=entry.retrieval)
        return load_engine(settings, registry)
    return load_engine(settings.replace(retrieval_model="none"))


def _caption(args: argparse.Namespace) -> None:
    engine = _engine(args, retrieval=False)
    generation = engine.default_generation().replace(
        decoding=args.decoding,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        num_captions=args.num_captions,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    style = "custom" if args.prompt is not None else args.style
    for path in args.images:
        captions = engine.caption([path], style=style, prompt=args.prompt, generation=generation)[0]
        if args.json:
            print(json.dumps({"image": path, "captions": [c.as_dict() for c in captions]}))
        else:
            for caption in captions:
                print(f"{path}\t{caption.text}")


def _ask(args: argparse.Namespace) -> None:
    engine = _engine(args, retrieval=False)
    answer = engine.answer(args.image, args.question)
    print(json.dumps({"image": args.image, **answer.as_dict()}) if args.json else answer.text)


def _index(args: argparse.Namespace) -> None:
    from .retrieval import GalleryIndex

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserFacingError(f"{folder} is not a folder.")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserFacingError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    engine = _engine(args, retrieval=True)
    index = GalleryIndex(
        num_queries=engine.matcher.model.config.num_query_tokens,
        dim=engine.matcher.model.config.image_text_hidden_size,
        embedding_model=engine.matcher.entry.name,
    )
    skipped = []
    for path in paths:
        try:
            prepared = engine.prepare([str(path)])
        except ImageDecodeError as error:
            skipped.append(f"{path}: {error}")
            continue
        features = engine.image_features(prepared)
        index.add(features.projections.numpy(), features.content_hashes, [str(path.relative_to(folder))])
    index.save(args.out)
    print(f"Indexed {len(index)} images from {folder} into {args.out}.")
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)


def _search(args: argparse.Namespace) -> None:
    from .retrieval import GalleryIndex

    text = clean_text(args.query, "search text", MAX_QUERY_CHARS)  # as the Retrieval tab does
    index = GalleryIndex.load(args.index_dir)
    engine = _engine(args, retrieval=True)
    model = engine.matcher.entry.name
    if index.embedding_model and index.embedding_model != model:
        raise UserFacingError(
            f"{args.index_dir} was indexed with {index.embedding_model}, and this search would embed "
            f"the query with {model}: their embeddings do not compare. Search with "
            f"--model {index.embedding_model}, or index the folder again with --model {model}."
        )
    query = engine.text_features([text])[0].numpy()
    hits = index.search_text(query, args.top_k)
    for hit in hits:
        if args.json:
            print(
                json.dumps(
                    {"rank": hit.rank, "name": hit.name, "cosine": hit.cosine, "probability": hit.probability}
                )
            )
        else:
            print(f"{hit.rank}\t{hit.cosine:.4f}\t{hit.probability:.3f}\t{hit.name}")


def _models(_: argparse.Namespace) -> None:
    from .registry import Registry

    registry = Registry.load()
    for name in registry.names():
        entry = registry.models[name]
        print(f"{name:32s} {entry.checkpoint:40s} {entry.description}")


def _evaluate(argv: Sequence[str]) -> int:
    """`python -m blip2_app evaluate ...`: blip2_app.training.evaluate's command line, with the
    CLI's one-line errors."""
    from .training.evaluate import main as evaluate_main

    try:
        return evaluate_main(argv)
    except UserFacingError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evaluate"]:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return _evaluate(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from .retrieval import IndexFormatError

    handlers = {"caption": _caption, "ask": _ask, "index": _index, "search": _search, "models": _models}
    try:
        handlers[args.command](args)
    except (UserFacingError, IndexFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
