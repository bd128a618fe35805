"""One real-size-shaped layer's Linear layers at each int8 path, synthetic weights (decision 0009).

For OPT-2.7B's decoder layer (q, k, v, out 2560x2560; fc1 2560->10240; fc2 10240->2560) and
ViT-g's (qkv 1408->4224, proj 1408x1408, fc1 1408->6144, fc2 6144->1408): milliseconds per layer
for fp32, dynamic-int8 (fbgemm, packed), int8-weight-only (`WeightOnlyInt8Linear`: torch's kernel
up to KERNEL_MAX_ROWS rows, dequantizing above), and torch's kernel forced at every row count.
Rows: 1 (a decode step), 40 (a prefill: 32 image tokens and a prompt), 257 (ViT-g's tokens).
Methods run in turn within each round, so a busy machine slows them alike; the median of the
rounds is reported. Several copies of the layer are cycled so that weights come from memory, as
in a real decode, not from the CPU's cache.

    python benchmarks/weight_only_linear.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
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

SHAPES = {  # (in_features, out_features) of each Linear layer of one transformer layer
    "opt-2.7b": [(2560, 2560)] * 4 + [(2560, 10240), (10240, 2560)],
    "vit-g": [(1408, 4224), (1408, 1408), (1408, 6144), (6144, 1408)],
}
METHODS = ("fp32", "dynamic-int8", "int8-weight-only", "kernel-forced")


def build(shapes: list[tuple[int, int]], copies: int) -> list[list[dict]]:
    torch.manual_seed(0)
    layers = []
    for _ in range(copies):
        layer = []
        for in_features, out_features in shapes:
            linear = torch.nn.Linear(in_features, out_features)
            weight_only = quantization.weight_only_int8(linear)
            layer.append(
                {
                    "fp32": linear,
                    "dynamic-int8": quantization.dynamic_int8(linear),
                    "int8-weight-only": weight_only,
                    "kernel-forced": lambda x, w=weight_only: torch.ops.aten._weight_int8pack_mm(
                        x.bfloat16(), w.rows, w.kernel_scales
                    ).float(),
                }
            )
        layers.append(layer)
    return layers


def time_layer(layers: list[list[dict]], rows: int, rounds: int) -> dict[str, float]:
    inputs = {k: torch.randn(rows, k) for k in {s[0] for layer in layers for s in _shapes(layer)}}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    with torch.no_grad():
        for round_ in range(rounds + 1):
            for method in METHODS:
                started = time.perf_counter()
                for layer in layers:
                    for parts in layer:
                        parts[method](inputs[parts["fp32"].in_features])
                if round_:  # the first round warms up
                    times[method].append((time.perf_counter() - started) / len(layers) * 1e3)
    return {m: round(statistics.median(v), 2) for m, v in times.items()}


def _shapes(layer: list[dict]) -> list[tuple[int, int]]:
    return [(p["fp32"].in_features, p["fp32"].out_features) for p in layer]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--copies", type=int, default=4, help="copies of the layer cycled (memory, not cache)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", default="1,40,257")
    args = parser.parse_args(argv)
    quantization.check_weight_only_ops()
    results = {}
    for name, shapes in SHAPES.items():
        layers = build(shapes, args.copies)
        for rows in (int(r) for r in args.rows.split(",")):
            results[f"{name} x{rows}"] = time_layer(layers, rows, args.rounds)
            print(name, rows, results[f"{name} x{rows}"], flush=True)
        del layers
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_1min": round(os.getloadavg()[0], 2),
        "ms_per_layer": results,
    }
    write_report(args.out, "weight_only_linear", report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"# One layer's Linear layers per int8 path ({report['when']})",
        "",
        f"torch {report['torch']}, {report['threads']} threads, load average {report['load_1min']} at "
        "the end; milliseconds per layer (median of the rounds); synthetic weights.",
        "",
        "| layer x rows | " + " | ".join(METHODS) + " |",
        "|---|" + "---:|" * len(METHODS),
    ]
    for key, row in report["ms_per_layer"].items():
        lines.append(f"| {key} | " + " | ".join(str(row[m]) for m in METHODS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
