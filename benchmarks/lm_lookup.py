"""Language-model pretraining alone, as the shapes-demo recipe runs it, with the answer accuracy
from the true scene code (the ceiling for stage 2) measured every `--eval-every` steps: to compare
codes and schedules in minutes instead of a 30-minute training run.

    python benchmarks/lm_lookup.py --steps 3000 --out benchmarks/results/lm_lookup/answer_slot.json
    python benchmarks/lm_lookup.py --without-answer-slot --steps 8000 --schedule-steps 30000 \
        --prefix-fraction 1.0 --caption-fraction 0.15 --eval-every 1000 \
        --out benchmarks/results/lm_lookup/scene_constant_lr_every_text_coded.json

Results in benchmarks/results/lm_lookup/ (README, "Why the Q-Former reads the question").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2_app.training import synthetic, vocab
from blip2_app.training.config import PhaseConfig, TrainConfig
from blip2_app.training.phases import LanguagePretraining
from blip2_app.training.trainer import CLIP_NORM, learning_rate


def pick(value, default):
    return default if value is None else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="shapes-demo")
    parser.add_argument("--prefix", default=None, help="lm_prefix (default: the config's)")
    parser.add_argument("--questions-per-text", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument(
        "--schedule-steps", type=int, default=None, help="cosine schedule length (default --steps)"
    )
    parser.add_argument("--caption-fraction", type=float, default=None)
    parser.add_argument("--prefix-fraction", type=float, default=None)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--lm-heads", type=int, default=None)
    parser.add_argument(
        "--without-answer-slot",
        action="store_true",
        help="the 12-word scene code alone (the recipe before the question-aware Q-Former)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = TrainConfig.load(args.config)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    prefix = args.prefix or config.lm_prefix
    questions = args.questions_per_text or config.lm_questions_per_text
    phase = PhaseConfig(
        args.schedule_steps or args.steps,
        config.language.batch_size,
        args.lr or config.language.lr,
        config.language.warmup_steps,
    )
    arch = config.architecture
    if args.lm_heads:
        arch = dataclasses.replace(arch, lm_heads=args.lm_heads)
    if args.without_answer_slot:
        arch = dataclasses.replace(arch, question_aware=False, num_query_tokens=12)
    captioning, _ = vocab.processors(arch.image_size, arch.num_query_tokens, arch.question_aware)
    seed = config.seed
    train = synthetic.generate_split(seed, "train", config.data.train_images)
    val = synthetic.generate_split(seed, "val", config.data.val_images, unique_captions=True)
    torch.manual_seed(seed + 1)
    lm = LanguagePretraining(
        arch,
        train,
        val,
        captioning.tokenizer,
        seed,
        pick(args.prefix_fraction, config.prefix_fraction),
        prefix,
        pick(args.caption_fraction, config.lm_caption_fraction),
        questions,
    )
    parameters = list(lm.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=phase.lr, weight_decay=phase.weight_decay)
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "prefix": prefix,
        "questions_per_text": questions,
        "steps": args.steps,
        "lr": phase.lr,
        "curve": [],
    }
    started = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(phase, step)
        lm.train()
        loss = lm.step(step, phase.batch_size).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, CLIP_NORM)
        optimizer.step()
        if (step + 1) % args.eval_every == 0:
            lm.eval()
            point = {
                "step": step + 1,
                "seconds": round(time.perf_counter() - started, 1),
                "loss": loss.item(),
            }
            point.update({k: round(v, 4) for k, v in lm.answer_accuracy(val).items()})
            record["curve"].append(point)
            print(json.dumps(point), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
