"""The ViT-g vision encoder at each CPU precision, one image and a batch of 8 (decision 0012).

Builds blip2-opt-2.7b's vision encoder (ViT-g, 1408 x 39) with random weights from its config, then
for bf16, dynamic-int8 (fbgemm) and int8-weight-only times a forward pass of 1 and of 8 images
(224 px), and how far an image's output in the batch of 8 is from its output alone (kernels
chosen by row count round differently; int8 quantizes activations per call). Precisions run in turn within each round;
the median of the rounds is reported. Also: each output's relative distance from fp32's.

    python benchmarks/vision_precision.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from report_files import write_report  # noqa: E402

from blip2_app import quantization  # noqa: E402
from blip2_app.loading import cpu_has_amx_bf16  # noqa: E402

PRECISIONS = ("bf16", "dynamic-int8", "int8-weight-only")


def encoder(precision: str, fp32: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(fp32)
    if precision == "bf16":
        return model.to(torch.bfloat16)
    quantization.quantize_linears(model, weight_only=precision == "int8-weight-only")
    return model


def forward(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds and the last layer's output in fp32 (before the final LayerNorm: with random
    weights that LayerNorm's output is ~1e-5 and would hide every difference); pixels in the dtype
    of the encoder's first layer, as the app sends them."""
    dtype = model.embeddings.patch_embedding.weight.dtype
    with torch.inference_mode():
        started = time.perf_counter()
        out = model(pixel_values=pixels.to(dtype), output_hidden_states=True).hidden_states[-1]
        return time.perf_counter() - started, out.float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="Salesforce/blip2-opt-2.7b", help="a folder or hub id with the config"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    from transformers import Blip2Config
    from transformers.models.blip_2.modeling_blip_2 import Blip2VisionModel

    config = Blip2Config.from_pretrained(args.config).vision_config
    torch.manual_seed(0)
    fp32 = Blip2VisionModel(config).eval()
    # The model's own init draws weights of std 1e-10 (BLIP-2's vision config), so activations
    # stay ~1e-8 and int8 rounds them all to 0: draw them as a trained encoder's scale instead.
    with torch.no_grad():
        for name, parameter in fp32.named_parameters():
            if "norm" not in name and not name.endswith("bias"):
                parameter.normal_(0, 0.02)
    models = {p: encoder(p, fp32) for p in PRECISIONS}
    pixels = torch.randn(
        8, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1)
    )
    _, reference = forward(fp32, pixels[:1])
    times: dict[str, dict[str, list[float]]] = {p: {"one": [], "eight": []} for p in PRECISIONS}
    rows: dict[str, dict] = {}
    for model in models.values():  # warm-up: first calls set up kernels for the shapes
        forward(model, pixels[:1])
        forward(model, pixels)
    for _ in range(args.rounds):
        for precision, model in models.items():
            seconds, alone = forward(model, pixels[:1])
            times[precision]["one"].append(seconds)
            seconds, together = forward(model, pixels)
            times[precision]["eight"].append(seconds)
            rows[precision] = {
                "batch_difference": float((alone[0] - together[0]).abs().max() / alone.abs().mean()),
                "distance_from_fp32": float((alone - reference).norm() / reference.norm()),
            }
    for precision in PRECISIONS:
        one, eight = (statistics.median(times[precision][k]) for k in ("one", "eight"))
        rows[precision].update(
            one_image_s=round(one, 3),
            eight_images_s=round(eight, 3),
            per_image_in_eight_s=round(eight / 8, 3),
        )
    report = {
        "config": args.config,
        "threads": torch.get_num_threads(),
        "amx_bf16": cpu_has_amx_bf16(),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    lines = [
        "# The vision encoder at each CPU precision",
        "",
        f"`python benchmarks/vision_precision.py`: ViT-g of {args.config} (random weights), 224 px, "
        f"{report['threads']} threads, {report['machine']}, AMX bf16: {report['amx_bf16']}, "
        f"{report['started_utc']}; medians of {args.rounds} rounds.",
        "",
        "| precision | one image s | 8 images s | per image in 8 s | in the batch vs alone | distance from fp32 |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for precision, row in rows.items():
        lines.append(
            f"| {precision} | {row['one_image_s']:.3f} | {row['eight_images_s']:.3f} | "
            f"{row['per_image_in_eight_s']:.3f} | {row['batch_difference']:.2g} | "
            f"{row['distance_from_fp32']:.4f} |"
        )
    lines += [
        "",
        "Outputs: the last layer's, one image's 257 x 1408 values (before the final LayerNorm). "
        "*in the batch vs alone*: the largest difference between an image's output in the batch of "
        "8 and alone, over the mean magnitude of its outputs (0: equal). *distance*: |output - fp32 "
        "output| / |fp32 output|. Weights drawn N(0, 0.02) (LayerNorms as initialised).",
        "",
    ]
    write_report(args.out, "vision_precision", report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
