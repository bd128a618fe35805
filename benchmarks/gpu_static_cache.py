"""GPU decoding: a static key/value cache with compiled decoding (CUDA graphs) vs the naive baseline.

Issue 20, point 5. On one H200 fp16 decoded at 12 ms/token at batch 1, 9.6x its memory floor, and
a 20-token caption (0.29 s) was no faster than naive fp32 (0.26 s): the GPU waits on Python and
kernel launches, not on memory. A static cache keeps every tensor shape and address fixed from one
token to the next, so the decoding step can be compiled and replayed as one CUDA graph.

One run measures, side by side, a 20-token greedy caption (length forced: min = max new tokens)
at each batch size (1 and 8 by default), with:
  naive-fp32      the model card's code: fp32 weights, `generate` with its default dynamic cache
  dynamic         --dtype weights, `generate` with the default dynamic cache
  static          --dtype weights, `generate(cache_implementation="static")`: transformers builds a
                  StaticCache per call and compiles the decoding forward itself (its CompileConfig,
                  mode "reduce-overhead" = CUDA graphs) when the model is on a GPU
  static-reused   the same, but ONE StaticCache per batch size, passed in and reset between calls:
                  new cache tensors each call can make torch.compile recompile or re-record its
                  CUDA graphs (it guards on the cache tensors' identity), a reused cache cannot
(static-reused runs before static, each compiling afresh) and reports per-token decode time, its
floor (the language model's weight bytes / memory bandwidth measured with a large device copy),
x floor, caption seconds, speed-up vs naive, new tokens per second, and whether the static
variants' greedy tokens equal the dynamic cache's.

    python benchmarks/gpu_static_cache.py --model /path/blip2-opt-2.7b-random       # on a GPU
    bash benchmarks/gpu.sh static-cache                                              # same, built
    python benchmarks/gpu_static_cache.py --model <tiny> --device cpu --dtype fp32 --no-compile --out /tmp/x

Needs torch, transformers and pillow only (not the app), so that it runs on a GPU machine's own
Python. On CPU --out is required: the committed results are GPU results.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.real_size import _sync, bytes_read_per_token, test_images  # noqa: E402

CAPTION_TOKENS = 20
PROMPT = "Question: what is in the image? Answer:"  # as in real_size.py, so the figures compare
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = ("naive-fp32", "dynamic", "static-reused", "static")  # the surer static variant first
TESTED_TRANSFORMERS = "5.19.0"  # the version this script was written against (requirements.txt)


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str  # a key of DTYPES
    cache: str  # "dynamic", "static" (a cache per call) or "static-reused" (one, reset each call)

    @property
    def static(self) -> bool:
        return self.cache != "dynamic"


def variants_of(names: list[str], dtype: str) -> list[Variant]:
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"Unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}.")
    return [
        Variant(name, "fp32", "dynamic") if name == "naive-fp32" else Variant(name, dtype, name)
        for name in VARIANTS
        if name in names
    ]


# ----------------------------------------------------------------------------- measuring
def copy_bandwidth_gbs(device: str, gib: float) -> float:
    """Memory bandwidth of `device`: a copy of a buffer far larger than the caches, counting the
    bytes read and written, best of 5 after one untimed copy (the first sets up kernels)."""
    source = torch.ones(int(gib * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    _sync()
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        target.copy_(source)
        _sync()
        best = max(best, 2 * source.numel() / (time.perf_counter() - started) / 1e9)
    del source, target
    return best


def significant(value: float, digits: int = 4) -> float:
    """Rounded to `digits` significant digits: GPU figures run from 1e-5 s (a floor) to seconds."""
    return float(f"{value:.{digits}g}")


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compile_counts() -> dict[str, int]:
    """Graphs torch.compile has compiled so far in this process (0: nothing was compiled), and the
    times it ran a graph without CUDA graphs (an in-place write to an unmarked tensor, say)."""
    from torch._dynamo.utils import counters

    return {
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


class Captioner:
    """One variant's forced-length greedy `generate` on a fixed batch of images."""

    def __init__(self, model, inputs: dict, variant: Variant, compile_decoding: bool):
        self.model, self.inputs, self.variant = model, inputs, variant
        self.compile_decoding = compile_decoding
        self.cache = None
        if variant.cache == "static-reused":
            from transformers import StaticCache

            prompt_length = inputs["input_ids"].shape[1]
            # Room for the longest call (the caption plus one): one size, so one compiled graph.
            self.cache = StaticCache(
                config=model.language_model.config, max_cache_len=prompt_length + CAPTION_TOKENS + 1
            )

    def generate_kwargs(self, tokens: int) -> dict:
        kwargs: dict = {
            "max_new_tokens": tokens,
            "min_new_tokens": tokens,
            "do_sample": False,
            "num_beams": 1,
        }
        if not self.variant.static:
            return kwargs
        if self.cache is not None:
            self.cache.reset()  # in place: the tensors keep their addresses, the graphs stay valid
            kwargs["past_key_values"] = self.cache
        else:
            kwargs["cache_implementation"] = "static"
        if self.compile_decoding:
            from transformers import CompileConfig

            kwargs["compile_config"] = CompileConfig(mode="reduce-overhead")
        else:
            kwargs["disable_compile"] = True
        return kwargs

    def __call__(self, tokens: int = CAPTION_TOKENS, **extra):
        return self.model.generate(**self.inputs, **self.generate_kwargs(tokens), **extra)  # no_grad inside

    def new_tokens_and_cache(self) -> tuple[torch.Tensor, str]:
        """The caption's new token ids, and the class of the cache `generate` decoded with."""
        out = self(CAPTION_TOKENS, return_dict_in_generate=True)
        return out.sequences[:, -CAPTION_TOKENS:].cpu(), type(out.past_key_values).__name__


def measure(captioner: Captioner, repeats: int, warmup: int) -> dict:
    """Caption seconds, decode seconds per token (21 forced tokens minus 1, over 20: the vision
    encoder and the prefill cancel out) and the greedy tokens, of one variant at one batch size."""
    counts_before = compile_counts()
    started = time.perf_counter()
    # The longest call first: transformers sizes later static caches to the largest so far, so
    # the decoding graph is compiled once, for one cache length.
    captioner(CAPTION_TOKENS + 1)
    _sync()
    row: dict = {"first_call_s": significant(time.perf_counter() - started)}  # compiling included
    for _ in range(warmup):  # CUDA graphs are recorded on a call after the compiling one
        captioner(), captioner(1), captioner(CAPTION_TOKENS + 1)
    _sync()
    row["caption_s"] = significant(median_seconds(captioner, repeats))
    one = median_seconds(lambda: captioner(1), repeats)
    many = median_seconds(lambda: captioner(CAPTION_TOKENS + 1), repeats)
    row["decode_s_per_token"] = significant((many - one) / CAPTION_TOKENS)
    tokens, row["cache_class"] = captioner.new_tokens_and_cache()
    row["tokens"] = tokens.tolist()
    row.update({key: count - counts_before[key] for key, count in compile_counts().items()})
    return row


# ----------------------------------------------------------------------------- loading
def load(folder: str, dtype: str, device: str):
    from transformers import Blip2ForConditionalGeneration

    started = time.perf_counter()
    model = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=DTYPES[dtype])
    model.to(device).eval()
    _sync()
    return model, round(time.perf_counter() - started, 1)


def batch_inputs(processor, batch: int, device: str, dtype: torch.dtype) -> dict:
    # The same prompt for every image: no padding, so one shape for the whole batch.
    inputs = processor(images=test_images(batch), text=[PROMPT] * batch, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return dict(inputs)


def run_variant(args, variant: Variant, model, processor, load_s: float) -> list[dict]:
    rows = []
    if variant.static and not args.no_compile:
        # Each static variant compiles afresh: one that recompiled per call up to torch.compile's
        # recompile limit would otherwise leave the next one running eagerly.
        torch._dynamo.reset()
    for batch in args.batches:
        row: dict = {"variant": variant.name, "dtype": variant.dtype, "cache": variant.cache, "batch": batch}
        row["load_s"] = load_s
        print(f"== {variant.name} ({variant.dtype}), batch {batch}", flush=True)
        captioner = Captioner(
            model,
            batch_inputs(processor, batch, args.device, model.vision_model.dtype),
            variant,
            compile_decoding=not args.no_compile,
        )
        try:
            row.update(measure(captioner, args.repeats, args.warmup))
        except Exception as error:
            # One variant failing (a compile error on an untried torch, say) must not cost the
            # others' figures on a GPU lent for minutes: the error is recorded in its row.
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        row["compiled"] = row.get("compiled_graphs", 0) > 0
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    return rows


# ----------------------------------------------------------------------------- results
def add_derived(rows: list[dict], bandwidth_gbs: float, weight_bytes: dict[str, int]) -> None:
    """Floors, speed-ups against the naive row and greedy agreement with the dynamic row, in place."""

    def find(name: str, batch: int) -> dict | None:
        return next(
            (r for r in rows if r["variant"] == name and r["batch"] == batch and "error" not in r), None
        )

    for row in rows:
        if "error" in row:
            continue
        floor = weight_bytes[row["dtype"]] / (bandwidth_gbs * 1e9)
        row["lm_weight_bytes"] = weight_bytes[row["dtype"]]
        row["floor_s_per_token"] = significant(floor)
        row["x_floor"] = (
            significant(row["decode_s_per_token"] / floor, 3) if row["decode_s_per_token"] > 0 else None
        )
        row["new_tokens_per_s"] = significant(row["batch"] * CAPTION_TOKENS / row["caption_s"])
        naive = find("naive-fp32", row["batch"])
        if naive:
            row["speedup_vs_naive"] = significant(naive["caption_s"] / row["caption_s"], 3)
        dynamic = find("dynamic", row["batch"])
        if dynamic and row["variant"] not in ("dynamic", "naive-fp32"):
            row.update(compare_tokens(row["tokens"], dynamic["tokens"]))


def compare_tokens(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    mismatched = [i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b]
    out: dict = {"tokens_equal_dynamic": not mismatched, "mismatched_sequences": len(mismatched)}
    if mismatched:
        first, ref = tokens[mismatched[0]], reference[mismatched[0]]
        out["first_mismatch"] = {
            "sequence": mismatched[0],
            "position": next(i for i, (a, b) in enumerate(zip(first, ref, strict=True)) if a != b),
        }
    return out


def targets(rows: list[dict]) -> dict:
    """Issue 20's GPU targets, judged on the best static row at batch 1."""
    static = [r for r in rows if r["batch"] == 1 and r["cache"] != "dynamic" and "caption_s" in r]
    if not static:
        return {}
    best = min(static, key=lambda r: r["caption_s"])
    return {
        "judged_on": best["variant"],
        "decode_within_3x_floor": best.get("x_floor") is not None and best["x_floor"] <= 3,
        "caption_3x_faster_than_naive": best.get("speedup_vs_naive", 0) >= 3,
        "greedy_equal_to_dynamic": all(r.get("tokens_equal_dynamic", True) for r in rows),
    }


COLUMNS = [
    ("variant", "variant"),
    ("dtype", "weights"),
    ("cache_class", "cache"),
    ("compiled", "compiled"),
    ("compiled_graphs", "graphs compiled"),
    ("cudagraph_skips", "CUDA graph skips"),
    ("batch", "batch"),
    ("first_call_s", "first call s"),
    ("caption_s", "20-token caption s"),
    ("speedup_vs_naive", "speed-up vs naive"),
    ("decode_s_per_token", "decode s/token"),
    ("floor_s_per_token", "floor s/token"),
    ("x_floor", "x floor"),
    ("new_tokens_per_s", "new tokens/s"),
    ("tokens_equal_dynamic", "greedy = dynamic"),
    ("error", "error"),
]


def write_results(out_dir: Path, machine: dict, rows: list[dict]) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "targets": targets(rows), "rows": rows}
    (out_dir / "gpu_static_cache.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Static cache and compiled decoding ({machine['date']})",
        "",
        f"Model {machine['model']}, device {machine['device']} ({machine.get('gpu') or machine['cpu']}), "
        f"torch {machine['torch']}, transformers {machine['transformers']}; measured copy bandwidth "
        f"{machine['copy_bandwidth_gbs']} GB/s (bytes read and written). Prompt {PROMPT!r}, "
        f"{CAPTION_TOKENS} new tokens forced, greedy; medians of {machine['repeats']} calls after "
        f"{machine['warmup']} warm-up rounds. Decode s/token: (21 tokens - 1 token) / 20. Floor: the "
        "language model's Linear weight bytes / bandwidth. 'first call': 21 tokens, compiling included.",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "")) for key, _ in COLUMNS) + " |")
    if result["targets"]:
        lines += ["", "Targets (batch 1): " + json.dumps(result["targets"])]
    markdown = "\n".join(lines) + "\n"
    (out_dir / "gpu_static_cache.md").write_text(markdown)
    return markdown


def machine_facts(args, bandwidth_gbs: float) -> dict:
    import transformers

    facts = {
        "model": str(args.model),
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tested_transformers": TESTED_TRANSFORMERS,
        "copy_bandwidth_gbs": significant(bandwidth_gbs),
        "compile": not args.no_compile,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def run(args) -> str:
    from transformers import Blip2Processor

    processor = Blip2Processor.from_pretrained(args.model)
    bandwidth = copy_bandwidth_gbs(args.device, args.copy_gib)
    machine = machine_facts(args, bandwidth)
    rows: list[dict] = []
    weight_bytes: dict[str, int] = {}
    loaded: tuple | None = None  # (dtype, model, seconds): one model on the device at a time
    for variant in variants_of(args.variants, args.dtype):
        if loaded is None or loaded[0] != variant.dtype:
            loaded = None
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()  # the fp32 model's 15 GB go back before fp16 loads
            loaded = (variant.dtype, *load(args.model, variant.dtype, args.device))
            weight_bytes[variant.dtype] = bytes_read_per_token(loaded[1].language_model)
        rows += run_variant(args, variant, loaded[1], processor, loaded[2])
        add_derived(rows, bandwidth, weight_bytes)
        write_results(args.out, machine, rows)  # so that a run cut short keeps its rows
    return write_results(args.out, machine, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a BLIP-2 OPT checkpoint folder (model + processor)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp16", help="weights of all but naive-fp32"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds after the first call")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="buffer size of the bandwidth copy")
    parser.add_argument(
        "--no-compile", action="store_true", help="static cache without torch.compile (the CPU test path)"
    )
    parser.add_argument("--out", type=Path, help="results folder; default benchmarks/results, on CUDA only")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.out is None:
        if args.device != "cuda":
            parser.error("--out is required on CPU: benchmarks/results holds the GPU figures.")
        args.out = ROOT / "benchmarks" / "results"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no CUDA GPU here (use --device cpu --no-compile).")
    return args


def main() -> None:
    from transformers.utils import logging as hf_logging

    args = parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(run(args))


if __name__ == "__main__":
    main()
