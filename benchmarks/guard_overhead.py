"""What the hardening costs a normal visitor: the same requests through the app's full middleware
stack and through the stack it had before (the body guard alone), side by side in one run.

Two copies of the app (`--model tiny-random`, one engine shared) listen on two loopback ports;
the client alternates between them request by request, so both see the same machine load. Each
round: upload one example photo (multipart, through the upload guard), caption it (queue join
through the fair-share check; 3 greedy tokens), and a request without the model
(`/gradio_api/info`, the middleware's pass-through path). Both copies are built by the same
`build_demo`, so StudioBlocks' input checks (a loop over the inputs) are in both.

    .venv/bin/python benchmarks/guard_overhead.py                 # 60 rounds
    .venv/bin/python benchmarks/guard_overhead.py --rounds 10 --out /tmp/x

Writes OUT/guard_overhead.json and .md (default OUT: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from blip2_app.config import Settings  # noqa: E402
from blip2_app.startup import load_engine  # noqa: E402
from blip2_app.ui import build_demo, launch_options  # noqa: E402
from blip2_app.ui.guard import RequestGuard, body_limit_bytes  # noqa: E402
from tests.running_app import free_port  # noqa: E402

PHOTO = str(sorted((ROOT / "assets" / "examples").glob("*.jpg"))[0])


def launch(settings: Settings, engine: Any, hardened: bool) -> tuple[gr.Blocks, str]:
    port = free_port()
    settings = settings.replace(port=port)
    options = launch_options(settings, engine=engine)
    if not hardened:  # the middleware before the hardening issue: the body guard alone
        limit = body_limit_bytes(settings.max_upload_mb)
        health = options["app_kwargs"]["middleware"][0]
        options["app_kwargs"] = {"middleware": [health, Middleware(RequestGuard, max_body_bytes=limit)]}
    options.update(prevent_thread_lock=True, quiet=True)
    demo = build_demo(settings, engine)
    demo.launch(**options)
    return demo, f"http://127.0.0.1:{port}/"


def one_round(url: str, client: Client) -> dict[str, float]:
    timings = {}
    with open(PHOTO, "rb") as photo:
        started = time.perf_counter()
        response = httpx.post(
            url + "gradio_api/upload", files=[("files", (Path(PHOTO).name, photo))], timeout=60
        )
        timings["upload"] = time.perf_counter() - started
    response.raise_for_status()
    started = time.perf_counter()
    client.predict(handle_file(PHOTO), "short", "", "greedy", 1, 1.0, 0.9, 0, 3, api_name="/caption")
    timings["caption"] = time.perf_counter() - started
    started = time.perf_counter()
    httpx.get(url + "gradio_api/info", timeout=30).raise_for_status()
    timings["info"] = time.perf_counter() - started
    return timings


def summarise(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        name: {
            "median_ms": statistics.median(s[name] for s in samples) * 1000,
            "p90_ms": sorted(s[name] for s in samples)[int(0.9 * (len(samples) - 1))] * 1000,
        }
        for name in samples[0]
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    settings = Settings(model="tiny-random")
    engine = load_engine(settings)
    demos = {name: launch(settings, engine, name == "hardened") for name in ("before", "hardened")}
    clients = {name: Client(url, verbose=False) for name, (_, url) in demos.items()}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in demos}
    for name in demos:  # warm-up
        one_round(demos[name][1], clients[name])
    for number in range(args.rounds):
        order = list(demos) if number % 2 == 0 else list(demos)[::-1]  # neither always goes first
        for name in order:
            samples[name].append(one_round(demos[name][1], clients[name]))
    for demo, _ in demos.values():
        demo.close()
    result = {
        "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "before": summarise(samples["before"]),
        "hardened": summarise(samples["hardened"]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "guard_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        f"| {op} | {result['before'][op]['median_ms']:.1f} | {result['hardened'][op]['median_ms']:.1f} "
        f"| {result['hardened'][op]['median_ms'] - result['before'][op]['median_ms']:+.1f} "
        f"| {result['before'][op]['p90_ms']:.1f} | {result['hardened'][op]['p90_ms']:.1f} |"
        for op in result["before"]
    ]
    (out / "guard_overhead.md").write_text(
        "# What the hardening costs a normal visitor\n\n"
        f"`python benchmarks/guard_overhead.py --rounds {args.rounds}`: the same requests through the "
        "app's middleware before the hardening issue (body guard only) and now (body guard, upload "
        "guard, fair share), alternating request by request (which goes first alternates too); tiny-random, "
        f"{os.cpu_count()} CPUs, load average at the end {result['machine']['load'][0]:.2f}.\n\n"
        "| request | before, median ms | hardened, median ms | difference | before, p90 ms | hardened, p90 ms |\n"
        "|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    print((out / "guard_overhead.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
