"""Batch captioning throughput (images/s, one image per call vs the Batch tab's batches) and the
time of one Explain heatmap.

    python benchmarks/batch_explain.py                  # tiny-random and the shapes demo, ~1 min
    python benchmarks/batch_explain.py --real-size      # the real blip2-opt-2.7b / blip2-itm-vit-g
                                                        # architectures, random weights (builds the
                                                        # 15 GB + 5 GB checkpoints of real_size.py once)

Output length is forced (min_new_tokens = max_new_tokens) so random weights cannot change the work.
"Single" captions each image with its own `engine.caption` call (what 50 calls of /caption do);
"batched" is `batch.caption_rows` (the Batch tab and `caption --format`), `--batch-size` images per
generate call. Results: benchmarks/results/batch_explain.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blip2_app import batch, explain  # noqa: E402
from blip2_app.config import Settings  # noqa: E402
from blip2_app.startup import load_engine  # noqa: E402
from blip2_app.training import synthetic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def scenes(count: int) -> list:
    return [synthetic.make_scene(777, "test", i).render() for i in range(count)]


def caption_rates(engine, count: int, tokens: int, batch_size: int, repeats: int = 3) -> dict[str, float]:
    """Median over `repeats` runs of each way (one run of one image is too noisy to report)."""
    runs = [_caption_times(engine, count, tokens, batch_size) for _ in range(repeats)]
    single = statistics.median(r[0] for r in runs)
    batched = statistics.median(r[1] for r in runs)
    return {
        "images": count,
        "new_tokens": tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "single_images_per_s": count / single,
        "batched_images_per_s": count / batched,
        "speed_up": single / batched,
    }


def _caption_times(engine, count: int, tokens: int, batch_size: int) -> tuple[float, float]:
    images = scenes(count)
    generation = engine.default_generation().replace(
        decoding="greedy", num_beams=1, min_new_tokens=tokens, max_new_tokens=tokens, num_captions=1
    )
    engine.caption(images[:1], generation=generation)  # warm-up (first-call allocations)
    engine.cache.clear()
    start = time.perf_counter()
    for image in images:
        engine.caption([image], generation=generation)
    single = time.perf_counter() - start
    engine.cache.clear()  # no vision features reused from the single calls
    # The same PIL images as sources (BatchItem takes what engine.prepare takes), as the tab's rows.
    items = [batch.BatchItem(f"{i}.png", image) for i, image in enumerate(images)]  # type: ignore[arg-type]
    start = time.perf_counter()
    rows = [
        row
        for chunk in batch.caption_rows(engine, items, "short", None, generation, batch_size=batch_size)
        for row in chunk
    ]
    batched = time.perf_counter() - start
    assert len(rows) == count and all(row.status == batch.OK for row in rows)
    return single, batched


def heatmap_seconds(engine, repeats: int) -> dict[str, float]:
    image = scenes(1)[0]
    explain.explain(engine, image, "a red circle")  # warm-up; vision features are cached after it
    times = []
    for _ in range(repeats):
        engine.cache.clear()  # include the vision encoder, as for a new picture
        start = time.perf_counter()
        explain.explain(engine, image, "a small red circle on the left")
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "repeats": repeats}


def run(
    label: str,
    settings: Settings,
    count: int,
    tokens: int,
    batch_size: int,
    heatmap_repeats: int,
    repeats: int = 3,
    heatmap_settings: Settings | None = None,
) -> dict:
    """`heatmap_settings`: the retrieval model's own engine for the heatmap row, loaded once the
    captioner is dropped (heatmaps need gradients, which dynamic-int8 layers do not have)."""
    engine = load_engine(settings)
    row: dict = {
        "setup": label,
        "model": settings.model,
        "precisions": engine.text.loaded.precisions.as_dict() if engine.text else None,
    }
    row["caption_1"] = caption_rates(engine, 1, tokens, batch_size, repeats)
    row["caption_n"] = caption_rates(engine, count, tokens, batch_size, repeats)
    if heatmap_settings is not None:
        del engine
        gc.collect()
        engine = load_engine(heatmap_settings)
        row["heatmap_precisions"] = engine.matcher.precisions.as_dict() if engine.matcher else None
    if engine.matcher is not None:
        row["heatmap"] = heatmap_seconds(engine, heatmap_repeats)
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], real_size_run: bool) -> str:
    lines = [
        "# Batch captioning and Explain heatmaps",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads as set by the app. "
        "Greedy, output length forced. `single`: one `engine.caption` call per image (50 calls of "
        "/caption); `batched`: the Batch tab's path (`--batch-size` images per generate call). "
        "Medians of 3 runs each (real size: one run). The build machine is shared with other jobs, so rows of one image "
        "vary by up to 2x between runs (both ways do the same work there); read the 50-image rows.",
        "",
        "| setup | images | batch size | new tokens | single img/s | batched img/s | speed-up | heatmap (s, CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for key in ("caption_1", "caption_n"):
            c = row[key]
            heat = f"{row['heatmap']['median_s']:.3f}" if "heatmap" in row and key == "caption_n" else ""
            lines.append(
                f"| {row['setup']} | {c['images']} | {c['batch_size']} | {c['new_tokens']} | "
                f"{c['single_images_per_s']:.2f} | {c['batched_images_per_s']:.2f} | {c['speed_up']:.2f}x | {heat} |"
            )
    if not real_size_run:
        lines += [
            "",
            "Real size (the blip2-opt-2.7b and blip2-itm-vit-g architectures, random weights, at the "
            "app's CPU precision): `python benchmarks/batch_explain.py --real-size` writes "
            "batch_explain_real_size.{json,md} (it needs the 15 GB + 5 GB checkpoints of "
            "benchmarks/real_size.py and about 16 GB of memory).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=batch.BatchLimits().batch_size)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--real-size", action="store_true", help="also the real architectures (heavy)")
    parser.add_argument(
        "--workdir", default=os.environ.get("BLIP2_BENCH_DIR", "~/.cache/blip2-studio/real-size")
    )
    parser.add_argument(
        "--precision",
        default="auto",
        help="precision for the real-size rows (auto: the app's, dynamic-int8 on CPU)",
    )
    parser.add_argument(
        "--real-size-images",
        type=int,
        default=50,
        help="images of the real-size many-image row (one run of each way: about 4 s per image on 2 cores)",
    )
    args = parser.parse_args()

    rows = [
        run(
            "tiny-random",
            Settings(model="tiny-random"),
            args.images,
            args.new_tokens,
            args.batch_size,
            args.repeats,
        ),
        run("shapes-demo", Settings(model="shapes-demo"), args.images, 8, args.batch_size, args.repeats),
    ]
    if args.real_size:
        from real_size import build_checkpoints  # benchmarks/real_size.py

        captioner, itm = build_checkpoints(Path(args.workdir).expanduser(), layers_divisor=1)
        settings = Settings(
            model=str(captioner), retrieval_model="none", precision=args.precision, packing="startup"
        )
        heatmaps = Settings(
            model=str(itm), precision=args.precision, qformer_precision="fp32", packing="startup"
        )
        label = f"real size, {args.precision} (heatmap: Q-Former fp32)"
        rows.append(
            run(
                label,
                settings,
                args.real_size_images,
                10,
                args.batch_size,
                1,
                repeats=1,
                heatmap_settings=heatmaps,
            )
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_real_size" if args.real_size else ""
    (RESULTS / f"batch_explain{suffix}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / f"batch_explain{suffix}.md").write_text(markdown(rows, args.real_size))


if __name__ == "__main__":
    main()
