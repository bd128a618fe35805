"""Where the peak anonymous memory of dynamic-int8 blip2-opt-2.7b comes from, phase by phase.

Loads the real-size random-weight checkpoint that benchmarks/real_size.py builds, samples RssAnon
every 10 ms, and reports per phase the peak and the level after it (and after `malloc_trim`, i.e.
what was free heap kept by glibc rather than memory in use). Memory only: timings here mean
nothing (run it beside other work if you like). Compare the allocator settings in one go:

    python benchmarks/memory_phases.py                        # app's allocator tuning on
    python benchmarks/memory_phases.py --no-allocator-tuning  # glibc defaults
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GB = 2**30


def rss_anon() -> int:
    return int(re.search(r"RssAnon:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


class Phases:
    def __init__(self) -> None:
        self.current, self.peaks, self.rows = "start", {}, []
        self.started = time.perf_counter()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), rss_anon())
            time.sleep(0.01)

    def end(self, name: str) -> None:
        seconds = time.perf_counter() - self.started
        time.sleep(0.05)
        after = rss_anon()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        row = {
            "phase": name,
            "peak_gb": round(self.peaks.get(self.current, after) / GB, 2),
            "after_gb": round(after / GB, 2),
            "after_trim_gb": round(rss_anon() / GB, 2),
            "seconds": round(seconds, 2),
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.current = name + " (next)"
        self.peaks[self.current] = 0
        self.started = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=str(Path("~/.cache/blip2-studio/real-size").expanduser()))
    parser.add_argument("--no-allocator-tuning", action="store_true")
    parser.add_argument(
        "--serving-mmap-mb",
        type=float,
        help="mmap threshold once loaded, in MB (default: the app's own, allocator.py)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_phases.jsonl"))
    args = parser.parse_args()
    phases = Phases()
    from PIL import Image

    import blip2_app.startup as startup
    from blip2_app import allocator
    from blip2_app.config import Settings
    from blip2_app.generation import GenerationSettings
    from blip2_app.prompts import ChatTurn

    if args.no_allocator_tuning:
        startup.tune_allocator = lambda serving=False: False
    if args.serving_mmap_mb is not None:
        allocator.SERVING_MMAP_THRESHOLD_BYTES = int(args.serving_mmap_mb * 2**20)
    phases.end("imports")
    workdir = Path(args.workdir)
    engine = startup.load_engine(
        Settings(
            model=str(workdir / "blip2-opt-2.7b-random"),
            retrieval_model=str(workdir / "blip2-itm-vit-g-random"),
            precision="dynamic-int8",
            packing="startup",  # the load phase includes packing, as it measured before
        )
    )
    phases.end("load captioner + retrieval model")
    image = Image.open(ROOT / "assets" / "examples" / "skimage_astronaut.jpg").convert("RGB")
    greedy = GenerationSettings(decoding="greedy", min_new_tokens=20, max_new_tokens=20)
    engine.caption([image], generation=greedy)
    phases.end("20-token greedy caption")
    engine.cache.clear()
    engine.caption(
        [image],
        generation=GenerationSettings(decoding="beam", num_beams=5, min_new_tokens=20, max_new_tokens=20),
    )
    phases.end("5-beam caption")
    engine.caption([image] * 4, generation=greedy)
    phases.end("batch of 4 captions")
    engine.chat(image, "what colour is it?", history=[ChatTurn("what is in the image?", "a cat")])
    phases.end("chat turn")
    engine.image_features([image] * 16)
    phases.end("index 16 images")
    record = {
        "allocator_tuning": not args.no_allocator_tuning,
        "serving_mmap_mb": allocator.SERVING_MMAP_THRESHOLD_BYTES / 2**20
        if not args.no_allocator_tuning
        else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "phases": phases.rows,
    }
    out = Path(args.out)
    with open(out, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    write_table(out)


def write_table(jsonl: Path) -> None:
    """memory_phases.md: every recorded run, one column pair per run."""
    every = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    latest = {_setting(run): run for run in every}  # the last run of each setting
    order = {_setting(run): (not run["allocator_tuning"], run.get("serving_mmap_mb") or 0) for run in every}
    runs = [latest[key] for key in sorted(latest, key=order.get)]
    titles = [f"{_setting(r)} ({r['date']})" for r in runs]
    lines = [
        "# Peak anonymous memory by phase: blip2-opt-2.7b + blip2-itm-vit-g, dynamic-int8, random weights",
        "",
        "`python benchmarks/memory_phases.py [--no-allocator-tuning]`. GiB (2^30 bytes) of RssAnon: the",
        "peak during the phase / the level after it / after `malloc_trim(0)` (the difference is free",
        "heap glibc kept), then the phase's seconds (one run, indicative only). The latest run of",
        "each setting; every run is in memory_phases.jsonl. The 16 indexed images are copies of one",
        "image: all but the first come from the vision-feature cache.",
        "",
        "| phase | " + " | ".join(titles) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for i, row in enumerate(runs[0]["phases"]):
        cells = []
        for run in runs:
            r = run["phases"][i]
            seconds = f", {r['seconds']} s" if "seconds" in r else ""
            cells.append(f"{r['peak_gb']} / {r['after_gb']} / {r['after_trim_gb']}{seconds}")
        lines.append(f"| {row['phase']} | " + " | ".join(cells) + " |")
    jsonl.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _setting(run: dict) -> str:
    if not run["allocator_tuning"]:
        return "tuning off"
    serving = run.get("serving_mmap_mb")
    if serving is None:  # runs from before the serving threshold existed: 1 MB throughout
        return "tuning on, 1 MB mmap threshold throughout"
    return f"tuning on, serving mmap threshold {serving:g} MB"


if __name__ == "__main__":
    main()
