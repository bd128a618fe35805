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

from ..config import PRECISION_CHOICES, Settings
from ..prompts import ChatTurn, chat_prompt, clean_answer, vqa_prompt
from . import metrics
from .datasets import DatasetSpec, Record, load_records
from .train import twin_folder

RERANK_K = 10
BATCH = 32
EXAMPLES = 8
# The prompted VQA variants (`evaluate(..., prompted=True)`): the same questions asked as the chat
# tab sends them with two few-shot examples about other images, or after an instruction that
# training never used.
PROMPT_MODES = ("few_shot", "instruction")
HELD_OUT_INSTRUCTION = "Please answer this question about the picture with a single word."
EXEMPLAR_OFFSETS = (37, 101)
# The acceptance targets on the synthetic test split.
TARGETS = {
    "vqa_accuracy": 0.90,
    "vqa_colour": 0.95,
    "vqa_shape": 0.95,
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


def load_engine_for(
    model: str, retrieval_model: str = "auto", threads: int | None = None, precision: str = "auto"
):
    """`precision` "auto" is the model's own default, the app's: fp32 for the registry's demo
    models, the CPU default for a checkpoint folder (dynamic-int8; the vision encoder in bf16 on
    AMX CPUs). Compare two models at one precision."""
    from ..startup import load_engine

    return load_engine(
        Settings(
            model=model,
            retrieval_model=_retrieval_partner(model, retrieval_model),
            threads=threads,
            precision=precision,
        )
    )


def _precisions(engine) -> dict[str, str]:
    """What each loaded model ran at: {"captioner": "fp32", "retrieval": "fp32"}, or per component
    where they differ ("vision bf16, qformer dynamic-int8, llm dynamic-int8")."""
    loaded = {"captioner": getattr(engine.text, "loaded", None), "retrieval": engine.matcher}
    described = {}
    for role, model in loaded.items():
        if model is not None:
            parts = model.precisions.as_dict()
            if len(set(parts.values())) == 1:
                described[role] = next(iter(parts.values()))
            else:
                described[role] = ", ".join(f"{component} {value}" for component, value in parts.items())
    return described


def _precision_text(result: dict[str, Any]) -> str:
    precision = result.get("precision") or {}
    return ", ".join(f"{role} {value}" for role, value in precision.items()) or "not recorded"


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


def prompted_vqa_prompts(engine, records: list[Record], mode: str) -> list[str]:
    """Each record's question as the chat tab sends it with two few-shot examples (questions and
    answers of other images of the set, so copying them is wrong) or as a quick answer after
    HELD_OUT_INSTRUCTION."""
    templates = engine.text.entry.templates
    if mode == "instruction":
        return [vqa_prompt(templates, str(r.question), instruction=HELD_OUT_INSTRUCTION) for r in records]
    if mode != "few_shot":
        raise ValueError(f"prompt mode must be one of {', '.join(PROMPT_MODES)}; got {mode!r}")
    prompts = []
    for index, record in enumerate(records):
        exemplars = []
        for offset in EXEMPLAR_OFFSETS:
            other = records[(index + offset) % len(records)]
            step = 0
            while other.image_id == record.image_id and step < len(records):
                step += 1
                other = records[(index + offset + step) % len(records)]
            exemplars.append(ChatTurn(str(other.question), other.answers[0]))
        prompts.append(chat_prompt(templates, str(record.question), exemplars=exemplars).text)
    return prompts


def _answers(engine, records: list[Record], mode: str | None, progress: bool) -> list[str]:
    if mode is None:
        predictions: list[str] = []
        for batch in _batched(records, BATCH, "vqa", progress):
            answers = engine.answer_batch([r.load_image() for r in batch], [r.question for r in batch])
            predictions += ["" if a.empty else a.text for a in answers]
        return predictions
    # The engine's own generation with the model's answer decoding, for prompts answer_batch
    # does not build.
    text = engine.text
    generation = text.entry.answer_decoding.replace(num_captions=1)
    prompts = prompted_vqa_prompts(engine, records, mode)
    predictions = []
    for start in tqdm(
        range(0, len(records), BATCH), desc=f"vqa {mode}", disable=not progress, mininterval=2.0
    ):
        batch = records[start : start + BATCH]
        ids = engine.generate_ids([r.load_image() for r in batch], prompts[start : start + BATCH], generation)
        predictions += [clean_answer(text.decode(rows[0]), text.entry.templates) for rows in ids]
    return predictions


def evaluate_vqa(
    engine, records: list[Record], progress: bool = True, mode: str | None = None
) -> dict[str, Any]:
    """VQA accuracy overall and by kind; `mode` (PROMPT_MODES) asks with few-shot examples or an
    instruction instead of the plain quick-answer prompt."""
    predictions = _answers(engine, records, mode, progress)
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
    prompted: bool = False,
) -> dict[str, Any]:
    """Caption, VQA and retrieval metrics of `model` (a registry name or checkpoint folder) on
    `split` of `dataset` (a spec, see datasets.py). `limit` caps the images for captioning and
    retrieval and the questions for VQA. Tasks the data or the model lacks are left out.
    `prompted`: VQA is also measured with few-shot examples and with an instruction."""
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
        "precision": _precisions(engine),
    }
    if engine.text is not None:
        result["decoding"] = {k: v for k, v in vars(engine.default_generation()).items() if k != "seed"}
        if captioned:
            result["captioning"] = evaluate_captions(engine, captioned, progress)
        if questions:
            result["vqa"] = evaluate_vqa(engine, questions, progress)
            for mode in PROMPT_MODES if prompted else ():
                result[f"vqa_{mode}"] = evaluate_vqa(engine, questions, progress, mode)
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
        for kind in ("colour", "shape"):
            if kind in result["vqa"]["by_kind"]:
                values[f"vqa_{kind}"] = result["vqa"]["by_kind"][kind]
    for mode in PROMPT_MODES:
        if f"vqa_{mode}" in result:
            values[f"vqa_accuracy_{mode}"] = result[f"vqa_{mode}"]["accuracy"]
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
        f"(limit: {result['limit'] or 'none'}; retrieval model: {result['retrieval_model']}; "
        f"precision: {_precision_text(result)}).",
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
    for mode in PROMPT_MODES:
        if f"vqa_{mode}" in result:
            by_kind = ", ".join(f"{k} {v:.4f}" for k, v in result[f"vqa_{mode}"]["by_kind"].items())
            lines += [
                "",
                f"VQA asked with {mode.replace('_', ' ')}: {result[f'vqa_{mode}']['accuracy']:.4f} ({by_kind})",
            ]
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
        "--dataset",
        action="append",
        help="dataset spec, e.g. shapes, shapes:renderer=paint or coco:annotations=...; repeat it to "
        "evaluate on several (one report) [shapes]",
    )
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--limit", type=int, help="at most this many images / questions per task")
    parser.add_argument(
        "--retrieval-model", default="auto", help="'auto': the model's twin or registry partner"
    )
    parser.add_argument("--threads", type=int, help="PyTorch CPU threads")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISION_CHOICES,
        help="'auto': the model's own default (the app's); a checkpoint folder's is the CPU default "
        "(dynamic-int8), a registry demo model's fp32, so name one to compare the two",
    )
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    parser.add_argument(
        "--prompted",
        action="store_true",
        help="also ask the questions with few-shot examples and an instruction",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    datasets = args.dataset or ["shapes"]
    engine = load_engine_for(args.model, args.retrieval_model, args.threads, args.precision)
    results = [
        evaluate(
            args.model,
            dataset,
            args.split,
            args.limit,
            args.retrieval_model,
            not args.no_progress,
            args.threads,
            engine=engine,
            prompted=args.prompted,
        )
        for dataset in datasets
    ]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if len(results) == 1:
            report, text = results[0], markdown(results[0])
        else:
            report = {"model": args.model, "datasets": {r["dataset"]: r for r in results}}
            text = "\n".join([comparison(results), *(markdown(r) for r in results)])
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    if len(results) == 1:
        print(json.dumps(results[0]["headline"], indent=2))
    else:
        print(json.dumps({r["dataset"]: r["headline"] for r in results}, indent=2))
    return 0


def comparison(results: list[dict[str, Any]]) -> str:
    """One table of the headline numbers and VQA by kind, a column per dataset."""
    names = [r["dataset"] for r in results]
    lines = [
        f"# Evaluation: {results[0]['model']} on {len(results)} datasets ({results[0]['split']})",
        "",
        "| metric | " + " | ".join(f"`{n}`" for n in names) + " | target |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    keys = list(dict.fromkeys(k for r in results for k in r["headline"]))
    kinds = sorted({k for r in results if "vqa" in r for k in r["vqa"]["by_kind"]})
    for key in keys:
        target = TARGETS.get(key)
        cells = [f"{r['headline'][key]:.4f}" if key in r["headline"] else "" for r in results]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {'>= ' + str(target) if target else ''} |")
    for kind in kinds:
        cells = [f"{r['vqa']['by_kind'].get(kind, float('nan')):.4f}" if "vqa" in r else "" for r in results]
        lines.append(f"| VQA {kind} | " + " | ".join(cells) + " | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
