"""One training step of each demo-model phase, four ways, side by side in one run (decision 0013):

    python benchmarks/training_steps.py --out benchmarks/results/training_steps   # about 4 minutes
    python benchmarks/training_steps.py --config smoke --steps 4 --out /tmp/x        # seconds

For each phase of the config (its sizes and batch, fresh weights, 1,024 rendered scenes): the
whole batch on one PyTorch thread and on two, and the phase's micro-batches (`micro_batches` of
shapes-demo) one after another on one thread and two at once. Median milliseconds a step
(forward, backward, clipping, AdamW) after two warm-up steps, to <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blip2_app.training import architecture, vocab  # noqa: E402
from blip2_app.training.config import TrainConfig  # noqa: E402
from blip2_app.training.phases import (  # noqa: E402
    GenerativePretraining,
    LanguagePretraining,
    QFormerPretraining,
    VisionPretraining,
)
from blip2_app.training.train import render_data  # noqa: E402
from blip2_app.training.trainer import CLIP_NORM, accumulate_gradients  # noqa: E402

WAYS = ("whole, 1 thread", "whole, 2 threads", "parts in turn, 1 thread", "parts side by side")


def build_phases(config: TrainConfig, images: int) -> dict:
    arch = config.architecture
    captioning, retrieval = vocab.processors(arch.image_size, arch.num_query_tokens, arch.question_aware)
    small = config.replace(data=dataclasses.replace(config.data, train_images=images))
    train, val = render_data(small, captioning.image_processor, config.data.classic_share)
    torch.manual_seed(0)
    itm = architecture.new_retrieval_model(arch, retrieval)
    lm = architecture.new_language_model(arch, captioning.tokenizer)
    vision_state = itm.vision_model.state_dict()
    phrases = config.stage1_phrase_share
    return {
        "vision": VisionPretraining(arch, train, val, 0),
        "language": LanguagePretraining(
            arch, train.scenes, val.scenes, captioning.tokenizer, 0, config.prefix_fraction, config.lm_prefix,
            config.lm_caption_fraction, config.lm_questions_per_text, config.chat_fraction,
            config.lm_prompt_variety,
        ),
        "stage1": QFormerPretraining(arch, train, val, retrieval, vision_state, 0, phrases),
        "stage2": GenerativePretraining(
            arch, train, val, captioning, retrieval.tokenizer, vision_state, itm.qformer.state_dict(),
            itm.query_tokens.data, lm.state_dict(), 0, config.caption_fraction, config.lm_prefix,
            config.code_loss_weight, itm.embeddings.state_dict(), config.chat_fraction,
            config.prompt_variety,
        ),
    }  # fmt: skip


def time_steps(phase, batch: int, parts: int, way: str, steps: int) -> float:
    parameters = [p for p in phase.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    torch.set_num_threads(2 if way == WAYS[1] else 1)
    pool = ThreadPoolExecutor(2) if way == WAYS[3] else None
    times = []
    for step in range(steps + 2):
        started = time.perf_counter()
        if way in WAYS[:2]:
            work = [lambda step=step: phase.step(step, batch)]
        else:
            work = phase.parts(step, batch, parts)
        accumulate_gradients(work, parameters, pool)
        torch.nn.utils.clip_grad_norm_(parameters, CLIP_NORM)
        optimizer.step()
        times.append(time.perf_counter() - started)
    if pool is not None:
        pool.shutdown()
    return 1000 * statistics.median(times[2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="shapes-demo")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per way")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = TrainConfig.load(args.config)
    torch.use_deterministic_algorithms(True, warn_only=True)
    results: dict[str, dict] = {}
    for name, phase in build_phases(config, args.images).items():
        phase_config = getattr(config, name)
        parts = max(2, phase_config.micro_batches)
        results[name] = {"batch": phase_config.batch_size, "parts": parts}
        for way in WAYS:
            ms = time_steps(phase, phase_config.batch_size, parts, way, args.steps)
            results[name][way] = round(ms, 1)
            print(name, way, f"{ms:.1f} ms", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"config": config.name, "steps": results}, indent=2))
    lines = [
        f"# One training step of each phase ({config.name} sizes), ms, median of {args.steps}",
        "",
        "`python benchmarks/training_steps.py`; fresh weights, the phases' own batch; "
        "parts: the config's micro-batches.",
        "",
        "| phase | parts | " + " | ".join(WAYS) + " |",
        "|---|---:|" + "---:|" * len(WAYS),
    ]
    for name, row in results.items():
        lines.append(f"| {name} | {row['parts']} | " + " | ".join(f"{row[w]:.1f}" for w in WAYS) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
