"""Cold start at real size: the model card's script vs the app's CLI and server, side by side.

Each row is its own process, timed from its start to its end (CLI, script) or to `/healthz` 200
(app), with its peak RssAnon sampled from /proc. The weight cache (blip2_app/weight_cache.py)
starts empty in a folder of its own: the first CLI run and the first app start quantize and write
it, the second ones read it. The checkpoint is read once before the runs (page cache warm, as the
issue measures).

The CLI rows run `caption` of one photo at `--precision auto`, which for a checkpoint folder on a
CPU is int8-weight-only (decision 0009: the cache's int8 rows mapped, nothing packed);
`cli-dynamic-int8` is the same command at `--precision dynamic-int8` (the cache read and packed
for fbgemm, what `auto` ran before; the vision encoder at auto's precision, bf16 with AMX, so that
it reads the same entry), side by side in the same run.

    python benchmarks/cold_start.py --model ~/.cache/blip2-studio/real-size/blip2-opt-2.7b-random
    python benchmarks/cold_start.py --model "$(python -c 'from blip2_app.testing import ensure_tiny_checkpoint as t; print(t("blip2-opt"))')" --out /tmp/cold
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from concurrent_captions import caption, client  # noqa: E402
from report_files import write_report  # noqa: E402
from startup_time import free_port, healthz_status  # noqa: E402

TOKENS = 20
TIMEOUT_S = 900
ONCE = {"cli-first", "app-first"}  # they need an empty weight cache: one run each
ROWS = {  # what each row runs, for the table
    "model-card": "the model card's script (fp32 `from_pretrained`)",
    "cli-first": "`caption photo.jpg` (auto: int8-weight-only), quantizes and writes the cache",
    "cli-second": "the same, maps the cache",
    "cli-dynamic-int8": "`caption --precision dynamic-int8 photo.jpg`, reads the cache and packs",
    "app-first": "`app.py` to `/healthz` 200, empty cache",
    "app-second": "the same, maps the cache, serves, packs in the background",
    "app-second-startup": "the same with `--packing startup` (packs before serving)",
    "app-second-onednn": "the same with `--int8-kernels onednn` (packs for oneDNN in the background)",
}

# The model card's snippet, as a user would run it (fp32, CPU), with the caption length forced.
MODEL_CARD = f"""
import sys
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor
processor = Blip2Processor.from_pretrained(sys.argv[1])
model = Blip2ForConditionalGeneration.from_pretrained(sys.argv[1])
inputs = processor(images=Image.open(sys.argv[2]).convert("RGB"), return_tensors="pt")
out = model.generate(**inputs, max_new_tokens={TOKENS}, min_new_tokens={TOKENS})
print(processor.decode(out[0], skip_special_tokens=True).strip())
"""


class PeakAnon:
    """Peak RssAnon of a process, sampled every 50 ms from /proc/<pid>/status."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_to_end(command: list[str], env: dict[str, str]) -> dict[str, float | str]:
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sampler = PeakAnon(process.pid)
    out, err = process.communicate(timeout=TIMEOUT_S)
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed: {err[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_anon_gb": round(peak / 1e9, 2), "output": out.strip()[-200:]}


def app_ready(model: str, image: str, env: dict[str, str], *flags: str) -> dict[str, float | str | None]:
    port = free_port()
    command = [sys.executable, "app.py", "--model", model, "--host", "127.0.0.1", "--port", str(port), *flags]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = PeakAnon(process.pid)
    try:
        while healthz_status(port) != 200:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if time.perf_counter() - started > TIMEOUT_S:
                raise RuntimeError(f"app.py was not ready after {TIMEOUT_S} s")
            time.sleep(0.1)
        ready = round(time.perf_counter() - started, 2)
        packing = healthz_json(port).get("packing")  # None: nothing to pack
        # A visitor's first caption, sent at once (20 tokens, greedy; with background packing it
        # runs beside the packing threads).
        caption(client(f"http://127.0.0.1:{port}/", 0), image)
        first_caption = round(time.perf_counter() - started, 2)
        packed = None if packing is None else ready  # `--packing startup`: packed before it answered
        if packing is not None and packing["background"]:
            # Also time until /healthz says packing is done (the steady speed from then on).
            while (packing := healthz_json(port)["packing"])["seconds"] is None:
                if packing["error"] or time.perf_counter() - started > TIMEOUT_S:
                    raise RuntimeError(f"packing did not finish: {packing}")
                time.sleep(0.1)
            packed = round(time.perf_counter() - started, 2)
        return {
            "seconds": ready,
            "first_caption_s": first_caption,
            "packed_s": packed,
            "peak_anon_gb": round(sampler.peak / 1e9, 2),
        }
    finally:
        process.terminate()
        process.wait(timeout=60)
        sampler.stop()


def healthz_json(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/healthz")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def warm_page_cache(folder: Path) -> None:
    for path in folder.rglob("*.safetensors"):
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a BLIP-2 checkpoint folder (OPT family)")
    parser.add_argument("--image", default=str(ROOT / "assets" / "examples" / "skimage_astronaut.jpg"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--repeats", type=int, default=3, help="runs of each row but the first ones (median)")
    args = parser.parse_args(argv)
    model = str(Path(args.model).expanduser().resolve())
    image = args.image
    cache = Path(tempfile.mkdtemp(prefix="weight-cache-"))
    env = {
        **os.environ,
        "BLIP2_WEIGHT_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONPATH": str(ROOT),
    }
    cli = [sys.executable, "-m", "blip2_app", "caption", image, "--model", model, "--decoding", "greedy"]
    cli += ["--max-new-tokens", str(TOKENS), "--min-new-tokens", str(TOKENS)]
    # The vision precision `auto` picks here (bf16 on a CPU with AMX, decision 0012), so that the
    # dynamic-int8 row reads the entry the auto rows wrote instead of writing its own.
    from blip2_app.loading import auto_vision_precision

    vision = auto_vision_precision(torch.device("cpu"))
    auto_vision = ["--vision-precision", vision] if vision else []
    commands = {
        "model-card": lambda: run_to_end([sys.executable, "-c", MODEL_CARD, model, image], env),
        "cli-first": lambda: run_to_end(cli, env),
        "cli-second": lambda: run_to_end(cli, env),
        "cli-dynamic-int8": lambda: run_to_end([*cli, "--precision", "dynamic-int8", *auto_vision], env),
        "app-first": lambda: app_ready(model, image, env),
        "app-second": lambda: app_ready(model, image, env),
        "app-second-startup": lambda: app_ready(model, image, env, "--packing", "startup"),
        "app-second-onednn": lambda: app_ready(model, image, env, "--int8-kernels", "onednn"),
    }
    rows: dict[str, dict] = {}
    try:
        for name in args.rows.split(","):
            if name == "app-first":  # the app starts on an empty cache too
                shutil.rmtree(cache, ignore_errors=True)
                cache.mkdir()
            runs = []
            for _ in range(1 if name in ONCE else args.repeats):
                # Page cache warm, as the issue measures, and the previous run's cache writes on
                # disk: a start must not pay for the last one's writeback of 3.9 GB of dirty pages.
                os.sync()
                warm_page_cache(Path(model))
                warm_page_cache(cache)
                runs.append({**commands[name](), "load_1min": round(os.getloadavg()[0], 2)})
            runs.sort(key=lambda run: run["seconds"])
            rows[name] = {**runs[len(runs) // 2], "runs_s": [run["seconds"] for run in runs]}
            print(name, rows[name], flush=True)
    finally:
        cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        shutil.rmtree(cache, ignore_errors=True)
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "model": model,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "caption_tokens": TOKENS,
        "repeats": args.repeats,
        "weight_cache_gb": round(cache_bytes / 1e9, 2),
        "rows": rows,
    }
    write_report(args.out, "cold_start", report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    rows = report["rows"]
    base = rows.get("model-card", {}).get("seconds")
    lines = [
        f"# Cold start ({report['when']})",
        "",
        f"{report['model']}, {report['machine']}; {report['caption_tokens']}-token greedy caption; page "
        f"cache warm; the weight cache empty before the first CLI run and before the first app start "
        f"({report['weight_cache_gb']} GB once written). Each row is one process: CLI and script to "
        "their exit, app to `/healthz` 200 (then *first caption at*: one 20-token caption sent through the API at once; *packed at*: until /healthz says packing ended). Rows after a first run: the median of "
        f"{report.get('repeats', 1)} runs (all of them in the last column), each after `sync` and "
        "with the page cache warmed again.",
        "",
        "| run | what | seconds | vs model card | first caption at s | packed at s | peak RssAnon GB "
        "| load (1 min) | runs s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in rows.items():
        ratio = f"{row['seconds'] / base:.2f}x" if base else ""
        runs = ", ".join(str(s) for s in row.get("runs_s", [row["seconds"]]))
        lines.append(
            f"| {name} | {ROWS.get(name, '')} | {row['seconds']} | {ratio} | {row.get('first_caption_s') or ''} | {row.get('packed_s') or ''} "
            f"| {row['peak_anon_gb']} "
            f"| {row['load_1min']} | {runs} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
