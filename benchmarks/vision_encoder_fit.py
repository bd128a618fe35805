"""How well trained vision encoders read shapes on pictures they trained on, on the validation
split and on the first generator's test split (issue 19's diagnostics: is an encoder that misreads
first-generator shapes short of steps, or has it memorised its training pictures?).

    python benchmarks/vision_encoder_fit.py shipped=RUN_A/vision.pt:1 RUN_B/vision.pt:0 --out results/fit

Each argument is a run's `vision.pt` (its work folder) and the seed it was trained on, with an
optional label before `=`. The heads of `VisionPretraining` (the encoder's pretraining phase)
classify every object (its patch tokens averaged over the true object mask), every slot (from the
CLS token) and the count; a row's object / slot accuracy is the share whose colour, shape and size
are all right. "train" is the first `--train-pictures` of the run's own training split (the first
N scenes of a split are the same whatever its size), "val" the run's validation split, both
rendered by `train.render_data` as training renders them; "first generator" is `shapes` test
seed 0. About a minute on two cores.
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
from blip2_app.training.phases import VisionPretraining  # noqa: E402
from blip2_app.training.shapes_data import ShapesData  # noqa: E402
from blip2_app.training.train import render_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="[LABEL=]PATH/vision.pt:SEED")
    parser.add_argument("--config", default="shapes-demo", help="the runs' config (architecture, data)")
    parser.add_argument("--train-pictures", type=int, default=1000)
    parser.add_argument("--test-pictures", type=int, default=600)
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    config = TrainConfig.load(args.config)
    arch, data = config.architecture, config.data
    torch.set_num_threads(2)
    captioning, _ = vocab.processors(arch.image_size, arch.num_query_tokens, arch.question_aware)
    first_generator = ShapesData.build(
        0,
        "test",
        args.test_pictures,
        captioning.image_processor,
        arch.image_size // arch.patch_size,
        unique_captions=True,
        style="classic",
    )
    # Only the first pictures of each training split: the whole split is 12,000 or more.
    few = config.replace(data=dataclasses.replace(data, train_images=args.train_pictures))
    results = {}
    for run in args.runs:
        label, _, spec = run.rpartition("=")
        path, _, seed = spec.rpartition(":")
        name = label or spec
        train, val = render_data(few.replace(seed=int(seed)), captioning.image_processor, data.classic_share)
        sets = {"train": train, "val": val, "first generator": first_generator}
        phase = VisionPretraining(arch, train, val, int(seed))
        phase.load_state_dict(torch.load(path, weights_only=False)["state"])
        phase.eval()
        results[name] = {}
        for set_name, shapes in sets.items():
            phase.val_data = shapes  # validate() reads val_data: the same measure on each set
            results[name][set_name] = {k: round(v, 4) for k, v in phase.validate().items()}
        print(name, json.dumps(results[name]))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(_markdown(results, args) + "\n")
    return 0


def _markdown(results: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Vision encoders: training pictures vs held-out",
        "",
        "`python benchmarks/vision_encoder_fit.py LABEL=PATH:SEED ...`; object / slot accuracy"
        f" (colour, shape and size all right); train: the first {args.train_pictures} training"
        f" pictures, first generator: {args.test_pictures} `shapes` test pictures.",
        "",
        "| run | train object / slot | val object / slot | first generator object / slot |",
        "|---|---|---|---|",
    ]
    for run, sets in results.items():
        cells = [f"{s['object_accuracy']:.3f} / {s['slot_accuracy']:.3f}" for s in sets.values()]
        lines.append(f"| `{run}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
