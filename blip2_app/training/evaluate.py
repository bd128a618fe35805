"""Evaluate a model through the app's own engine: `evaluate(model, dataset, split, limit) -> dict`.

Captions and answers come from `Engine.caption` / `Engine.answer_batch` with the model's default
decoding (what the app shows), retrieval from `Engine.itc`, then the top candidates re-ranked by
`Engine.itm` as BLIP-2 and LAVIS do. `main(argv)` is the command line behind
`python -m blip2_app evaluate --model M --dataset D`; it writes JSON and Markdown reports.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import metrics
from .datasets import DatasetSpec, Record, load_records
from .train import twin_folder

RERANK_K = 10
BATCH = 32
EXAMPLES = 8
# The acceptance targets on the synthetic test split.
TARGETS = {
    "vqa_accuracy": 0.90,
    "caption_cider": 1.5,
    "caption_objects_named": 0.90,
    "text_to_image_r1": 0.90,
}


def _retrieval_partner(model: str, retrieval_model: str) -> str:
    """A checkpoint folder's retrieval twin (`<folder>-itm`) when one sits beside it."""
    if retrieval_model != "auto":
        return retrieval_model
    folder = Path(model).expanduser()
    twin = twin_folder(folder)
    return str(twin) if folder.is_dir() and (twin / "config.json").exists() else "auto"


def load_engine_for(model: str, retrieval_model: str = "auto", threads: int | None = None):
    from ..config import Settings
    from ..startup import load_engine

    return load_engine(
        Settings(model=model, retrieval_model=_retrieval_partner(model, retrieval_model), threads=threads)
    )


def _batched(items: Sequence[Any], size: int, what: str, progress: bool):
    for start in tqdm(range(0, len(items), size), desc=what, disable=not progress, mininterval=2.0):
        yield items[start : start + size]


def evaluate_captions(engine, records: list[Record], progress: bool = True) -> dict[str, Any]:
    hypotheses: list[str] = []
    for batch in _batched(records, BATCH, "captions", progress):
        hypotheses += [per_image[0].text for per_image in engine.caption([r.load_image() for r in batch])]
    references = [list(r.captions) for r in records]
    cider, per_image = metrics.cider_d(hypotheses, references)
    result: dict[str, Any] = {
        "images": len(records),
        "bleu4": metrics.bleu4(hypotheses, references),
        "cider": cider,
    }
    if all("objects" in r.extra for r in records):
        named = [
            metrics.objects_named(h, r.extra["objects"]) for h, r in zip(hypotheses, records, strict=True)
        ]
        result["objects_named"] = float(np.mean(named))
    result["examples"] = [
        {"image_id": r.image_id, "caption": h, "reference": r.captions[0], "cider": round(c, 3)}
        for r, h, c in list(zip(records, hypotheses, per_image, strict=True))[:EXAMPLES]
    ]
    return result


def evaluate_vqa(engine, records: list[Record], progress: bool = True) -> dict[str, Any]:
    predictions: list[str] = []
    for batch in _batched(records, BATCH, "vqa", progress):
        answers = engine.answer_batch([r.load_image() for r in batch], [r.question for r in batch])
        predictions += ["" if a.empty else a.text for a in answers]
    scores = [metrics.vqa_accuracy(p, r.answers) for p, r in zip(predictions, records, strict=True)]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for score, record in zip(scores, records, strict=True):
        by_kind[record.extra.get("kind", "all")].append(score)
    wrong = [
        {"image_id": r.image_id, "question": r.question, "answer": p, "expected": r.answers[0]}
        for p, r, s in zip(predictions, records, scores, strict=True)
        if s < 1.0
    ]
    return {
        "questions": len(records),
        "accuracy": float(np.mean(scores)),
        "by_kind": {kind: float(np.mean(v)) for kind, v in sorted(by_kind.items())},
        "wrong_examples": wrong[:EXAMPLES],
    }


def _rerank(
    similarity: np.ndarray, score_pairs: Callable[[list[int], list[int]], np.ndarray], k: int, by_text: bool
) -> np.ndarray:
    """Re-score each text's (or image's) top-k candidates with ITM probability + ITC cosine
    (LAVIS adds the two likewise); the re-scored candidates stay above the rest."""
    reranked = similarity.copy()
    images, texts = [], []
    lines = similarity.T if by_text else similarity
    for line, row in enumerate(lines):
        for candidate in np.argsort(-row, kind="stable")[:k]:
            images.append(int(candidate) if by_text else line)
            texts.append(line if by_text else int(candidate))
    probabilities = score_pairs(images, texts)
    reranked[:] = similarity.min() - 1.0
    # cosine in [-1, 1] plus probability in [0, 1], plus 3 so re-ranked pairs beat every other
    reranked[images, texts] = similarity[images, texts] + probabilities + 3.0
    return reranked


def evaluate_retrieval(engine, records: list[Record], progress: bool = True) -> dict[str, Any]:
    """Text->image and image->text recall over the records' images, one query (the first
    caption) per image. ITC alone, and ITC top-k re-ranked by ITM."""
    images = engine.prepare([r.load_image() for r in records])
    queries = [r.captions[0] for r in records]
    with torch.inference_mode():
        similarity = engine.itc(images, queries).numpy()

    def score_pairs(image_index: list[int], text_index: list[int]) -> np.ndarray:
        scores = []
        pairs = list(zip(image_index, text_index, strict=True))
        for batch in _batched(pairs, 256, "itm", progress):
            scores.append(engine.itm([images[i] for i, _ in batch], [queries[t] for _, t in batch]).numpy())
        return np.concatenate(scores)

    k = min(RERANK_K, len(records))
    text_side = metrics.recall_at_k(_rerank(similarity, score_pairs, k, by_text=True))
    image_side = metrics.recall_at_k(_rerank(similarity, score_pairs, k, by_text=False))
    reranked = {key: v for key, v in text_side.items() if key.startswith("text_to_image")}
    reranked.update({key: v for key, v in image_side.items() if key.startswith("image_to_text")})
    return {
        "images": len(records),
        "itc": metrics.recall_at_k(similarity),
        "itc_itm": reranked,
        "rerank_k": k,
    }


def evaluate(
    model: str,
    dataset: str = "shapes",
    split: str = "test",
    limit: int | None = None,
    retrieval_model: str = "auto",
    progress: bool = True,
    threads: int | None = None,
    engine=None,
) -> dict[str, Any]:
    """Caption, VQA and retrieval metrics of `model` (a registry name or checkpoint folder) on
    `split` of `dataset` (a spec, see datasets.py). `limit` caps the images for captioning and
    retrieval and the questions for VQA. Tasks the data or the model lacks are left out."""
    started = time.perf_counter()
    spec = DatasetSpec.parse(dataset)
    if engine is None:
        engine = load_engine_for(model, retrieval_model, threads)
    records = load_records(spec, split)
    captioned = [r for r in records if r.captions and r.question is None][:limit]
    questions = [r for r in records if r.question and r.answers][:limit]
    result: dict[str, Any] = {
        "model": model,
        "retrieval_model": engine.matcher.entry.name if engine.matcher else None,
        "dataset": dataset,
        "split": split,
        "limit": limit,
    }
    if engine.text is not None:
        result["decoding"] = {k: v for k, v in vars(engine.default_generation()).items() if k != "seed"}
        if captioned:
            result["captioning"] = evaluate_captions(engine, captioned, progress)
        if questions:
            result["vqa"] = evaluate_vqa(engine, questions, progress)
    if engine.matcher is not None and len(captioned) > 1:
        result["retrieval"] = evaluate_retrieval(engine, captioned, progress)
    result["headline"] = headline(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The numbers the targets are stated in. Retrieval: ITC over the gallery, what the app's
    `search` does; the ITM re-ranked recall (BLIP-2's paper protocol) is reported beside it."""
    values = {}
    if "vqa" in result:
        values["vqa_accuracy"] = result["vqa"]["accuracy"]
    if "captioning" in result:
        values["caption_cider"] = result["captioning"]["cider"]
        values["caption_bleu4"] = result["captioning"]["bleu4"]
        if "objects_named" in result["captioning"]:
            values["caption_objects_named"] = result["captioning"]["objects_named"]
    if "retrieval" in result:
        for direction in ("text_to_image", "image_to_text"):
            values[f"{direction}_r1"] = result["retrieval"]["itc"][f"{direction}_r1"]
            values[f"{direction}_r1_itm_rerank"] = result["retrieval"]["itc_itm"][f"{direction}_r1"]
    return {k: round(v, 4) for k, v in values.items()}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation: {result['model']} on {result['dataset']} ({result['split']})",
        "",
        f"Measured by `blip2_app.training.evaluate` in {result['seconds']} s "
        f"(limit: {result['limit'] or 'none'}; retrieval model: {result['retrieval_model']}).",
        "",
        "| metric | value | target |",
        "|---|---|---|",
    ]
    for key, value in result["headline"].items():
        target = TARGETS.get(key)
        mark = "" if target is None else f">= {target} ({'met' if value >= target else 'not met'})"
        lines.append(f"| {key} | {value:.4f} | {mark} |")
    if "vqa" in result:
        lines += ["", f"VQA ({result['vqa']['questions']} questions) by kind:", ""]
        lines += [f"- {kind}: {value:.4f}" for kind, value in result["vqa"]["by_kind"].items()]
    if "retrieval" in result:
        r = result["retrieval"]
        lines += ["", f"Retrieval over {r['images']} images (one caption query per image):", ""]
        lines += ["| | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
        for name, values in (("ITC", r["itc"]), (f"ITC + ITM top-{r['rerank_k']}", r["itc_itm"])):
            for direction in ("text_to_image", "image_to_text"):
                row = " | ".join(f"{values[f'{direction}_r{k}']:.4f}" for k in (1, 5, 10))
                lines.append(f"| {name}, {direction.replace('_', ' ')} | {row} |")
    if "captioning" in result:
        lines += ["", "Caption examples:", ""]
        lines += [
            f"- `{e['caption']}` (reference: `{e['reference']}`)" for e in result["captioning"]["examples"]
        ]
    if "decoding" in result:
        lines += ["", f"Decoding: {json.dumps(result['decoding'])}"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_app evaluate", description="Caption, VQA and retrieval metrics of a model."
    )
    parser.add_argument("--model", required=True, help="registry name or checkpoint folder")
    parser.add_argument(
        "--dataset", default="shapes", help="dataset spec, e.g. shapes or coco:annotations=..."
    )
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--limit", type=int, help="at most this many images / questions per task")
    parser.add_argument(
        "--retrieval-model", default="auto", help="'auto': the model's twin or registry partner"
    )
    parser.add_argument("--threads", type=int, help="PyTorch CPU threads")
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = evaluate(
        args.model,
        args.dataset,
        args.split,
        args.limit,
        args.retrieval_model,
        not args.no_progress,
        args.threads,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result["headline"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
