"""Command line: `python -m blip2_app caption|ask|index|search|match|explain|classify|models|evaluate ...`,
over the same engine (`match`, `explain`, `classify`, `index` and `search` on the retrieval model).

`evaluate` is `blip2_app.training.evaluate` (caption, VQA and retrieval metrics on a dataset); its
arguments are that module's own.

`caption` of one or two images and `ask`, left at `--precision auto` on a CPU, run at
int8-weight-only when the model's CPU default is dynamic-int8 (`one_shot_precision`, decision 0009):
the same int8 weights, read from the weight cache without fbgemm's packing, which would cost more
than such a job saves.

Failures the user can fix (a missing file, a folder given for a file, a bad index or model name,
an unreadable image) print one line, `error: ...`, on stderr and exit with status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Settings, add_arguments
from .errors import UserFacingError
from .generation import DECODINGS
from .images import ImageDecodeError
from .precisions import DYNAMIC_INT8, INT8_WEIGHT_ONLY

if TYPE_CHECKING:  # the engine imports torch: only once a command needs it
    from .engine import Engine, PreparedImage
    from .generation import GenerationSettings
    from .registry import Registry

EXIT_USER_ERROR = 2
# What a person can fix: UserFacingError (ImageDecodeError, ModelLoadError, IndexFormatError... are
# kinds of it) and the file system's refusals of a path. Other OSErrors (a network error is one)
# and every other exception are bugs or outages: they keep their traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    UserFacingError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
)
MODEL_FLAGS = (
    "model",
    "precision",
    "vision_precision",
    "qformer_precision",
    "llm_precision",
    "device",
    "models_file",
    "weight_cache",
    "int8_kernels",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Jobs of at most this many images run at int8-weight-only (decision 0009). At real size (OPT-2.7B,
# 2 cores) packing for fbgemm costs ~15 s once per start, and a weight-only caption is estimated
# ~5 s slower than a packed one: break-even near 3 images, so 2 keeps a margin.
ONE_SHOT_MAX_IMAGES = 2


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
    _batch_arguments(caption)
    caption.add_argument("images", nargs="+", help="image files, or folders of them")

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
    search.add_argument(
        "--rerank",
        type=_positive_int,
        metavar="K",
        help="re-sort the best K by ITM match probability (reads the images again: needs --images)",
    )
    search.add_argument("--images", help="the folder that was indexed (for --rerank)")
    search.add_argument("--json", action="store_true")

    _explain_commands(commands)

    models = commands.add_parser("models", help="list the registry's model names")
    add_arguments(models, os.environ, only=("models_file",))
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


def one_shot_precision(settings: Settings, cpu_default: object, images: int, device_type: str) -> str:
    """The `--precision` a captioning job runs at: int8-weight-only for a job of at most
    ONE_SHOT_MAX_IMAGES images on a CPU, when the user left `--precision` (and every component's)
    at auto, the model's CPU default (`cpu_default`, from the registry) is dynamic-int8 and the
    weight cache is on (without it each run would quantize again); otherwise `settings.precision`.
    The server never comes here: it keeps fbgemm, faster per caption once packed."""
    if (
        settings.precision == "auto"
        and not any(settings.precision_overrides.values())
        and settings.backend == "local"
        and device_type == "cpu"
        and settings.weight_cache != "off"
        and 0 < images <= ONE_SHOT_MAX_IMAGES
        and cpu_default in ("auto", DYNAMIC_INT8)
    ):
        return INT8_WEIGHT_ONLY
    return settings.precision


def _engine(args: argparse.Namespace, retrieval: bool, images: int = 0) -> Engine:
    """The engine a command needs: the captioning model alone (for a job of `images` images;
    0: many or unknown), or the retrieval partner of --model alone
    (startup.retrieval_model_for: a retrieval model is its own partner)."""
    from .registry import Registry
    from .startup import load_engine, resolve_model, retrieval_model_for

    # A job's results come from one model: its int8 layers are packed before it starts (serving
    # while packing, `--packing background`, is the app's: decision 0011).
    settings = Settings.from_namespace(args).replace(packing="startup")
    registry = Registry.load([settings.models_file] if settings.models_file else [])
    if not retrieval:
        if images and settings.precision == "auto":
            settings = _one_shot(settings, registry, images)
        return load_engine(settings.replace(retrieval_model="none"), registry)
    entry = resolve_model(registry, settings.model, "--model")
    partner = retrieval_model_for(entry)
    if partner is None:
        raise UserFacingError(f"{entry.name} has no retrieval model; pass one with --model.")
    return load_engine(settings.replace(model=partner), registry)


def _one_shot(settings: Settings, registry: Registry, images: int) -> Settings:
    """`settings` at `one_shot_precision` for this machine and model; a model that does not
    resolve here keeps auto (load_engine then reports it, or starts on --fallback-model), as does a
    --device this machine lacks. The vision encoder keeps the precision the app's auto gives it
    (bf16 on a CPU with AMX), so the CLI and the app read one weight-cache entry: two entries of
    one checkpoint would replace each other on every start."""
    from .loading import auto_vision_precision, pick_device
    from .startup import resolve_model

    try:
        entry = resolve_model(registry, settings.model, "--model")
        device = pick_device(settings.device)
    except UserFacingError:
        return settings
    precision = one_shot_precision(settings, entry.precision.get("cpu", "auto"), images, device.type)
    if precision == settings.precision:
        return settings
    return settings.replace(precision=precision, vision_precision=auto_vision_precision(device))


def _image_files(paths: Sequence[str]) -> None:
    """Refuse a missing path or a folder before the model loads (decoding errors come later)."""
    for path in paths:
        if Path(path).is_dir():
            raise UserFacingError(f"{path} is a folder, not an image file.")
        if not Path(path).exists():
            raise UserFacingError(f"{path}: no such image file.")


def _prepare(engine: Engine, path: str) -> PreparedImage:
    """The decoded image; a decoding error names the file."""
    try:
        return engine.prepare([path])[0]
    except ImageDecodeError as error:
        raise ImageDecodeError(f"{path}: {error}") from error


def _caption(args: argparse.Namespace) -> None:
    if args.format or args.out:
        return _caption_batch(args)
    for path in args.images:
        if Path(path).is_dir():
            raise UserFacingError(f"{path} is a folder: pass --format csv|jsonl|txt to caption folders.")
    _image_files(args.images)
    engine = _engine(args, retrieval=False, images=len(args.images))
    generation = _generation(engine, args)
    style = "custom" if args.prompt is not None else args.style
    for path in args.images:
        captions = engine.caption(
            [_prepare(engine, path)], style=style, prompt=args.prompt, generation=generation
        )[0]
        if args.json:
            print(json.dumps({"image": path, "captions": [c.as_dict() for c in captions]}))
        else:
            for caption in captions:
                print(f"{path}\t{caption.text}")


def _generation(engine: Engine, args: argparse.Namespace) -> GenerationSettings:
    return engine.default_generation().replace(
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


def _ask(args: argparse.Namespace) -> None:
    _image_files([args.image])
    engine = _engine(args, retrieval=False, images=1)
    answer = engine.answer(_prepare(engine, args.image), args.question)
    print(json.dumps({"image": args.image, **answer.as_dict()}) if args.json else answer.text)


def _index(args: argparse.Namespace) -> None:
    from .gallery import Gallery
    from .retrieval import check_save_target

    folder = Path(args.folder)
    if folder.exists() and not folder.is_dir():
        raise UserFacingError(f"{folder} is a file, not a folder of images.")
    if not folder.is_dir():
        raise UserFacingError(f"{folder}: no such folder.")
    check_save_target(args.out)  # before the embedding work, not after it
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserFacingError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    gallery = Gallery(_engine(args, retrieval=True))
    with _StderrProgress() as progress:
        report = gallery.add(
            [str(p) for p in paths], [str(p.relative_to(folder)) for p in paths], progress=progress
        )
    gallery.index.save(args.out)
    print(f"Indexed {len(gallery)} images from {folder} into {args.out}.")
    for name, reason in report.unreadable:
        print(f"skipped {folder / name}: {reason}", file=sys.stderr)
    for name, _ in report.duplicates:
        print(f"skipped {folder / name}: the same picture as an image indexed before it", file=sys.stderr)


class _StderrProgress:
    """`Gallery.add`'s progress as one updating line, when stderr is a terminal (silent otherwise)."""

    def __init__(self) -> None:
        self.shown = sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.shown:
            print(f"\r{stage} {done}/{total}\033[K", end="", file=sys.stderr, flush=True)

    def __enter__(self) -> _StderrProgress:
        return self

    def __exit__(self, *_: object) -> None:
        if self.shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def _search(args: argparse.Namespace) -> None:
    from .gallery import FolderImages, Gallery
    from .retrieval import GalleryIndex

    if args.rerank and not args.images:
        raise UserFacingError("--rerank reads the images again: pass --images, the folder that was indexed.")
    if args.images and not Path(args.images).is_dir():
        raise UserFacingError(f"{args.images} (--images) is not a folder.")
    index = GalleryIndex.load(args.index_dir)
    engine = _engine(args, retrieval=True)
    images = FolderImages(args.images, index, engine) if args.images else None
    hits = Gallery(engine, index, images).search_text(args.query, args.top_k, args.rerank or 0)
    for hit in hits:
        if args.json:
            fields = {
                "rank": hit.rank,
                "name": hit.name,
                "cosine": hit.cosine,
                "probability": hit.probability,
            }
            if hit.itm_probability is not None:
                fields["itm_probability"] = hit.itm_probability
            print(json.dumps(fields))
        else:
            itm = "" if hit.itm_probability is None else f"\t{hit.itm_probability:.3f}"
            print(f"{hit.rank}\t{hit.cosine:.4f}\t{hit.probability:.3f}{itm}\t{hit.name}")


# --------------------------------------------------------------------------- batch captions, explain
def _batch_arguments(caption: argparse.ArgumentParser) -> None:
    caption.add_argument(
        "--format",
        choices=("csv", "jsonl", "txt"),
        help="write a table (file, caption, answer, status); txt: one name.txt per image in --out",
    )
    caption.add_argument("--out", help="file for csv / jsonl (default: standard output), folder for txt")
    caption.add_argument("--recursive", action="store_true", help="look for images in sub-folders too")
    caption.add_argument("--question", default="", help="also ask every image this (its own column)")


def _batch_items(args: argparse.Namespace) -> list:
    from .batch import BatchItem, from_folder

    items: list[BatchItem] = []
    for path in args.images:
        if Path(path).is_dir():
            items.extend(from_folder(Path(path), args.recursive))
        elif Path(path).exists():
            items.append(BatchItem(path, path))
        else:
            raise UserFacingError(f"{path}: no such image file or folder.")
    if not items:
        raise UserFacingError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {' '.join(args.images)}.")
    return items


def _caption_batch(args: argparse.Namespace) -> None:
    """`caption --format/--out`: every image of the files and folders given, a table written out; an
    unreadable image is a row with its sentence (and counted on stderr), not a failure."""
    from . import batch

    fmt = args.format or {".csv": "csv", ".jsonl": "jsonl"}.get(Path(args.out).suffix.lower())
    if fmt is None:
        raise UserFacingError("Pass --format csv, jsonl or txt (the --out name does not say which).")
    if fmt == "txt" and not args.out:
        raise UserFacingError("--format txt writes one name.txt per image: pass the folder with --out.")
    if args.out and fmt != "txt" and Path(args.out).is_dir():
        raise UserFacingError(f"{args.out} is a folder; --format {fmt} writes one file.")
    items = _batch_items(args)
    engine = _engine(args, retrieval=False)
    generation = _generation(engine, args)
    style = "custom" if args.prompt is not None else args.style
    rows: list[batch.Row] = []
    with _StderrProgress() as progress:
        for done in batch.caption_rows(
            engine,
            items,
            style,
            args.prompt,
            generation,
            args.question,
            progress=lambda n, total: progress("captioning", n, total),
        ):
            rows.extend(done)
    if fmt == "txt":
        batch.write_txt_folder(rows, Path(args.out))
    elif args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        (batch.write_csv if fmt == "csv" else batch.write_jsonl)(rows, Path(args.out))
    else:
        (batch.write_csv if fmt == "csv" else batch.write_jsonl)(rows, sys.stdout)  # type: ignore[arg-type]  # a text stream
    for row in rows:
        if row.status != batch.OK:
            print(f"skipped {row.file}: {row.status}", file=sys.stderr)


def _explain_commands(commands: argparse._SubParsersAction) -> None:
    """`match`, `explain` and `classify`: on the retrieval partner of --model."""
    match = commands.add_parser("match", help="ITM match probability and ITC cosine of an image and a text")
    add_arguments(match, os.environ, only=MODEL_FLAGS)
    match.add_argument("--json", action="store_true")
    match.add_argument("image")
    match.add_argument("text")

    explain = commands.add_parser("explain", help="Grad-CAM heatmap of where an image matches a text")
    add_arguments(explain, os.environ, only=MODEL_FLAGS)
    explain.add_argument("--json", action="store_true", help="print itm, grid and per-word grids as JSON")
    explain.add_argument("--out", help="folder to write heatmap.png and one PNG per word to")
    explain.add_argument("image")
    explain.add_argument("text")

    classify = commands.add_parser("classify", help="rank labels for an image (zero-shot, best first)")
    add_arguments(classify, os.environ, only=MODEL_FLAGS)
    classify.add_argument("--template", default="a photo of {}", help="the text each label is put in")
    classify.add_argument("--rerank", action="store_true", help="order by ITM match probability")
    classify.add_argument("--json", action="store_true")
    classify.add_argument("image")
    classify.add_argument("labels", nargs="+", metavar="LABEL")


def _match(args: argparse.Namespace) -> None:
    from .explain import match

    _image_files([args.image])
    engine = _engine(args, retrieval=True)
    result = match(engine, _prepare(engine, args.image), args.text)
    print(json.dumps(result.as_dict()) if args.json else f"itm {result.itm:.4f}\titc {result.itc:.4f}")


def _explain(args: argparse.Namespace) -> None:
    from .explain import explain, overlay

    _image_files([args.image])
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserFacingError(f"{args.out} is a file; --out takes a folder for the heatmap PNGs.")
    engine = _engine(args, retrieval=True)
    prepared = _prepare(engine, args.image)
    heatmap = explain(engine, prepared, args.text)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        overlay(prepared.image, heatmap.grid).save(folder / "heatmap.png")
        for index, (word, grid) in enumerate(heatmap.words):
            safe = "".join(c for c in word if c.isalnum())[:30] or "word"
            overlay(prepared.image, grid, size=160).save(folder / f"word-{index + 1:02d}-{safe}.png")
    if args.json:
        print(json.dumps(heatmap.as_dict()))
    else:
        print(f"itm {heatmap.itm:.4f}")
        for row in heatmap.grid:
            print(" ".join(f"{value:.2f}" for value in row))


def _classify(args: argparse.Namespace) -> None:
    from .explain import check_template, classify, parse_labels

    _image_files([args.image])
    labels = parse_labels(args.labels)
    template = check_template(args.template)
    engine = _engine(args, retrieval=True)
    for score in classify(engine, _prepare(engine, args.image), labels, template, args.rerank):
        if args.json:
            print(json.dumps(score.as_dict()))
        else:
            itm = "" if score.itm is None else f"\titm {score.itm:.3f}"
            print(f"{score.probability:.3f}\t{score.itc:.4f}{itm}\t{score.label}")


def _models(args: argparse.Namespace) -> None:
    from .registry import Registry

    registry = Registry.load([args.models_file] if args.models_file else [])
    for name in registry.names():
        entry = registry.models[name]
        print(f"{name:32s} {entry.checkpoint:40s} {entry.description}")


def error_line(error: BaseException) -> str:
    """The one line a user error prints. A file system error names its path first."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"error: {error.filename}: {error.strerror}"
    return f"error: {error}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv[:1] == ["evaluate"]:  # blip2_app.training.evaluate's own command line
            from .training.evaluate import main as evaluate_main

            return evaluate_main(argv[1:])
        args = _parser().parse_args(argv)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        handlers = {
            "caption": _caption,
            "ask": _ask,
            "index": _index,
            "search": _search,
            "models": _models,
            "match": _match,
            "explain": _explain,
            "classify": _classify,
        }
        handlers[args.command](args)
    except USER_ERRORS as error:
        print(error_line(error), file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
