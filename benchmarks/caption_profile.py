"""Where the time of one 20-token caption goes: vision, Q-Former, prefill, and each decode step
split into the int8 matrix products (reading the weights) and the rest.

Phase times come from forward hooks on the app's own engine (the first language-model call of a
caption is the prefill, the others are decode steps); the split of a decode step comes from
torch.profiler over the language model stepped by hand, one token at a time, as generate does. The floor of a decode step is the language model's weight
bytes read per token over the measured read bandwidth (as in real_size.py).

    python benchmarks/caption_profile.py --model ~/.cache/blip2-studio/real-size/blip2-opt-2.7b-random
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from report_files import write_report  # noqa: E402

TOKENS = 20
INT8_MATMUL = ("quantized::linear_dynamic",)  # dynamic-int8 Linear layers: where weights are read
GROUPS = {  # profiler op name prefixes -> what they are
    "int8 matmul (weights)": INT8_MATMUL,
    "fp matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product", "aten::softmax"),
    "norms and activations": ("aten::layer_norm", "aten::native_layer_norm", "aten::gelu", "aten::relu"),
    "embedding": ("aten::index_select", "aten::embedding"),
    "copies and shapes": ("aten::cat", "aten::copy_", "aten::contiguous", "aten::clone", "aten::to"),
}


class PhaseClock:
    """Wall time of each call of the vision encoder, the Q-Former and the language model."""

    def __init__(self, model) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self._started: dict[str, float] = {}
        for name in ("vision_model", "qformer", "language_model"):
            module = getattr(model, name)
            module.register_forward_pre_hook(lambda *_, n=name: self._start(n))
            module.register_forward_hook(lambda *_, n=name: self._stop(n))

    def _start(self, name: str) -> None:
        self._started[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        self.calls[name].append(time.perf_counter() - self._started.pop(name))

    def clear(self) -> None:
        self.calls.clear()


def group_of(op: str) -> str:
    return next((group for group, prefixes in GROUPS.items() if op.startswith(prefixes)), "other ops")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--precision", default="auto", help="as the app's --precision [auto]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8-kernels", default="fbgemm", help="as the app's --int8-kernels [fbgemm]")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    import torch
    from real_size import _forced, bytes_read_per_token, read_bandwidth_gbs, test_images

    from blip2_app.config import Settings
    from blip2_app.startup import load_engine

    engine = load_engine(
        Settings(
            model=args.model,
            precision=args.precision,
            retrieval_model="none",
            int8_kernels=args.int8_kernels,
            packing="startup",  # steady-state timings: every layer packed before the first
        )
    )
    model = engine.text.loaded.model
    clock = PhaseClock(model)
    image = test_images(1)[0]
    generation = _forced(TOKENS, decoding="greedy")

    def caption():
        engine.cache.clear()  # each caption encodes its image, as a new photo does
        clock.clear()
        started = time.perf_counter()
        engine.caption([image], generation=generation)
        return time.perf_counter() - started, {k: list(v) for k, v in clock.calls.items()}

    caption()  # warm-up
    runs = [caption() for _ in range(args.repeats)]
    total = statistics.median(seconds for seconds, _ in runs)

    def median_of(pick) -> float:
        return statistics.median(pick(calls) for _, calls in runs)

    phases = {
        "vision_s": median_of(lambda c: sum(c["vision_model"])),
        "qformer_s": median_of(lambda c: sum(c["qformer"])),
        "prefill_s": median_of(lambda c: c["language_model"][0]),
        "decode_s_per_token": median_of(lambda c: statistics.mean(c["language_model"][1:])),
        "decode_steps": len(runs[0][1]["language_model"]) - 1,
    }
    steps = phases["decode_steps"]
    phases["rest_s"] = total - phases["vision_s"] - phases["qformer_s"] - phases["prefill_s"]
    phases["rest_s"] -= phases["decode_s_per_token"] * steps

    # The split of a decode step: the language model stepped by hand as generate does (one new
    # token, the cache of the earlier ones), under torch.profiler.
    with torch.inference_mode():
        inputs = engine.text.generate_inputs(engine.prepare([image]), [""])
        mask = inputs["attention_mask"]
        out = model.language_model(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            started = time.perf_counter()
            for _ in range(TOKENS):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                out = model.language_model(
                    input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True
                )
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            step_wall = (time.perf_counter() - started) / TOKENS
    step_ops: dict[str, float] = defaultdict(float)
    for event in profile.key_averages():
        step_ops[group_of(event.key)] += event.self_cpu_time_total / 1e6 / TOKENS
    profiled = sum(step_ops.values())

    bandwidth = read_bandwidth_gbs()
    floor = bytes_read_per_token(model.language_model) / (bandwidth * 1e9)
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "model": args.model,
        "precision": args.precision,
        "int8_kernels": engine.text.loaded.int8_kernels,
        "threads": torch.get_num_threads(),
        "load_1min": round(os.getloadavg()[0], 2),
        "caption_s": round(total, 3),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in phases.items()},
        "read_bandwidth_gbs": round(bandwidth, 1),
        "decode_floor_s_per_token": round(floor, 4),
        "decode_x_floor": round(phases["decode_s_per_token"] / floor, 2),
        "step_wall_s_profiled": round(step_wall, 4),
        "step_op_seconds": {k: round(v, 4) for k, v in sorted(step_ops.items(), key=lambda kv: -kv[1])},
        "step_op_seconds_total": round(profiled, 4),
    }
    name = "caption_profile" if args.int8_kernels == "fbgemm" else f"caption_profile_{args.int8_kernels}"
    write_report(args.out, name, report, markdown(report))
    return 0


def markdown(r: dict) -> str:
    steps = r["decode_steps"]
    decode = r["decode_s_per_token"] * steps
    lines = [
        f"# Profile of one {TOKENS}-token caption ({r['when']})",
        "",
        f"{r['model']} at {r['precision']} ({r.get('int8_kernels') or 'no int8'} kernels), {r['threads']} threads, load {r['load_1min']}; medians of the "
        "runs; phases timed by forward hooks on the app's engine (a new image each caption).",
        "",
        "| phase | seconds | share |",
        "|---|---:|---:|",
    ]
    for name, seconds in (
        ("vision encoder", r["vision_s"]),
        ("Q-Former + projection", r["qformer_s"]),
        ("prefill", r["prefill_s"]),
        (f"decode ({steps} steps)", decode),
        ("the rest (preprocessing, generate's own work, decoding text)", r["rest_s"]),
    ):
        lines.append(f"| {name} | {seconds:.3f} | {seconds / r['caption_s']:.0%} |")
    lines += [
        f"| **caption** | **{r['caption_s']:.3f}** | |",
        "",
        f"Decode: {r['decode_s_per_token']:.4f} s per token; floor (weights read at {r['read_bandwidth_gbs']} GB/s) "
        f"{r['decode_floor_s_per_token']:.4f} s: {r['decode_x_floor']}x the floor, so "
        f"{r['decode_s_per_token'] - r['decode_floor_s_per_token']:.4f} s per token is not weight reading.",
        "",
        f"One decode step stepped by hand under the profiler: {r['step_wall_s_profiled']:.4f} s wall; its ops "
        "(self CPU time; ops on both threads add up, so the sum can exceed the wall time; what is left of "
        "the wall time is Python and the model's glue):",
        "",
        "| op group, per decode step | CPU seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.4f} |" for k, v in r["step_op_seconds"].items()],
        f"| all ops | {r['step_op_seconds_total']:.4f} |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
