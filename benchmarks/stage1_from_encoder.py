"""Stage 1 alone, from the vision encoder of a finished training run (issue 19's diagnostics):
which part of a run makes its retrieval twin weaker, the encoder or stage 1?

    python benchmarks/stage1_from_encoder.py WORK/vision.pt --out /tmp/itm
    python benchmarks/stage1_from_encoder.py WORK/vision.pt --steps 1600 --out /tmp/itm-1600
    python benchmarks/stage1_from_encoder.py WORK/vision.pt --phrase-share 2 --out /tmp/itm-phrases

Renders the config's stage-1 data, trains stage 1 as `train` does (its seed, micro-batches and
two workers), prints its summary (validation recall@1 both ways) and exports the twin to `--out`,
loadable by the app and by `evaluate --retrieval-model`. About 7 minutes on two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blip2_app.training import vocab  # noqa: E402
from blip2_app.training.config import TrainConfig  # noqa: E402
from blip2_app.training.phases import QFormerPretraining  # noqa: E402
from blip2_app.training.train import _export, available_cores, render_data  # noqa: E402
from blip2_app.training.trainer import run_phase  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vision", type=Path, help="a run's vision.pt (its work folder)")
    parser.add_argument("--config", default="shapes-demo")
    parser.add_argument("--steps", type=int, help="stage-1 steps instead of the config's")
    parser.add_argument(
        "--attribute-queries", type=float, help="the attribute-query weight instead of the config's"
    )
    parser.add_argument(
        "--phrase-share", type=int, help="ITM phrase pairs for one image in N (default: the config's)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the retrieval twin")
    args = parser.parse_args(argv)
    config = TrainConfig.load(args.config)
    if args.steps:
        config = config.replace(stage1=dataclasses.replace(config.stage1, steps=args.steps))
    if args.attribute_queries is not None:
        config = config.replace(attribute_queries=args.attribute_queries)
    if args.phrase_share is not None:
        config = config.replace(phrase_share=args.phrase_share)
    arch, seed = config.architecture, config.seed
    torch.set_num_threads(config.threads_at("stage1", 0))
    torch.use_deterministic_algorithms(True, warn_only=True)
    captioning, retrieval = vocab.processors(arch.image_size, arch.num_query_tokens, arch.question_aware)
    train, val = render_data(config, captioning.image_processor, config.data.classic_share)
    saved = torch.load(args.vision, weights_only=False)["state"]
    vision_state = {k.removeprefix("vision."): v for k, v in saved.items() if k.startswith("vision.")}
    torch.manual_seed(seed + TrainConfig.PHASES.index("stage1"))
    phrase_share = config.stage1_phrase_share
    stage1 = QFormerPretraining(
        arch, train, val, retrieval, vision_state, seed, phrase_share, config.attribute_queries
    )
    outcome = run_phase(
        "stage1",
        stage1,
        stage1.trainable_parameters(),
        config.stage1,
        progress=False,
        threads=lambda step: config.threads_at("stage1", step),
        workers=lambda: min(config.workers, available_cores()),
    )
    summary = {
        "vision": str(args.vision),
        "config": config.name,
        "phrase_share": phrase_share,
        "stage1": outcome.summary(),
    }
    print(json.dumps(summary, indent=2))
    _export(stage1.model, retrieval, args.out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
