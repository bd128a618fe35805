"""Caption throughput and p95 latency at 1, 4 and 16 concurrent requests: local engine vs vLLM.

Same tiny checkpoint (tiny-random, BLIP-2/OPT, float32), same images, same greedy decoding with
the output length forced (min_new_tokens = max_new_tokens), same run. Requests go to the engine
API (`Engine.caption`, local or vLLM backend) from N threads, so what is measured is the backend,
not Gradio. The local engine runs its requests side by side in threads (PyTorch releases the GIL);
the vLLM server batches them (continuous batching). Each level is warmed up first.

    .venv/bin/python benchmarks/vllm_vs_local.py                 # starts vLLM from .venv-vllm itself
    .venv/bin/python benchmarks/vllm_vs_local.py --vllm-url http://127.0.0.1:8000/v1  # a running one

Writes OUT/vllm_vs_local.json and OUT/vllm_vs_local.md (default OUT: benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PHOTOS = sorted(str(p) for p in (ROOT / "assets" / "examples").glob("*.*"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def measure(engine, generation, concurrency: int, requests: int) -> dict[str, Any]:
    images = [engine.prepare(p)[0] for p in PHOTOS]

    def one(i: int) -> float:
        started = time.perf_counter()
        result = engine.caption(images[i % len(images)], "short", generation=generation)
        assert result[0][0].token_ids, "no tokens"
        return time.perf_counter() - started

    with ThreadPoolExecutor(concurrency) as pool:  # warm-up: one round at this concurrency
        list(pool.map(one, range(concurrency)))
        started = time.perf_counter()
        latencies = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": requests,
        "wall_s": round(wall, 3),
        "throughput_rps": round(requests / wall, 2),
        "tokens_per_s": round(requests * generation.max_new_tokens / wall, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p95_ms": round(percentile(latencies, 95) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-url", help="a running server (default: start one from .venv-vllm)")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests", type=int, default=48, help="requests per level (at least the level)")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per caption (forced)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the local engine")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from blip2_app.config import Settings
    from blip2_app.startup import load_engine
    from blip2_app.testing import ensure_tiny_checkpoint

    levels = [int(x) for x in args.levels.split(",")]
    stack = contextlib.ExitStack()
    url = args.vllm_url
    if url is None:
        from vllm_server import vllm_command, vllm_server

        log_dir = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
        server = stack.enter_context(vllm_server(ensure_tiny_checkpoint("blip2-opt"), log_dir))
        url = server.url
        command = "python " + " ".join(vllm_command(Path("TINY_OPT_FOLDER"), 0)[1:])
        command = command.replace("--port 0", "--port FREE").replace(str(ROOT) + "/", "")
    else:
        command = f"(running server at {url})"
    with stack:
        local = load_engine(Settings(model="tiny-random", retrieval_model="none", threads=args.threads))
        remote = load_engine(
            Settings(model="tiny-random", retrieval_model="none", backend="vllm", vllm_url=url)
        )
        generation = dataclasses.replace(
            local.default_generation(),
            decoding="greedy",
            num_captions=1,
            no_repeat_ngram_size=0,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
        )
        rows = []
        for level in levels:
            requests = max(args.requests, level)
            for name, engine in (("local", local), ("vllm", remote)):
                row = {"backend": name, **measure(engine, generation, level, requests)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    write(Path(args.out), rows, args, command)
    return 0


def write(out: Path, rows: list[dict[str, Any]], args, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "checkpoint": "tiny-random (BLIP-2/OPT, 128 wide, 2 layers, 8 query tokens), float32",
        "decoding": f"greedy, {args.tokens} new tokens forced",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "local_threads": args.threads,
        "vllm": command,
    }
    (out / "vllm_vs_local.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Captions: local engine vs vLLM (same tiny checkpoint, same run)",
        "",
        f"`python benchmarks/vllm_vs_local.py{f' --threads {args.threads}' if args.threads else ''}` — "
        f"{meta['checkpoint']}; {meta['decoding']}; {meta['cpus']} CPUs shared by the app process and the "
        f"vLLM server; local engine: {args.threads or 'default'} torch thread(s); vLLM binds its engine "
        f"core to one CPU (VLLM_CPU_OMP_THREADS_BIND=auto); CPython {meta['python']}. Requests go to the "
        "engine API from N threads (no Gradio); each level is warmed up first. vLLM: `" + command + "`.",
        "",
        "| concurrent | backend | requests | throughput req/s | tokens/s | p50 ms | p95 ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['concurrency']} | {row['backend']} | {row['requests']} | {row['throughput_rps']:.2f} "
            f"| {row['tokens_per_s']:.0f} | {row['p50_ms']:,.0f} | {row['p95_ms']:,.0f} |"
        )
    lines += [
        "",
        "A tiny model says little about real sizes: here the work per token is small, so HTTP, image "
        "encoding (PNG, base64) and scheduling weigh much more than with a 2.7b or 6.7b model, where "
        "vLLM's batching of the language model is what counts.",
    ]
    (out / "vllm_vs_local.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":  # vLLM spawns processes: nothing may run on import
    sys.exit(main())
