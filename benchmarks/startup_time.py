"""Start-up time of `python app.py`: from process start to the port's first answer, and to /healthz 200.

    python benchmarks/startup_time.py --checkout after=. [--checkout before=/tmp/old-checkout] [--runs 5]

Each checkout is a folder holding app.py (a `git worktree add /tmp/old <commit>` compares against an
older commit); all run with this interpreter. Runs alternate between checkouts (A, B, A, B, ...) so a
change in the machine's load hits both alike, and one unmeasured run per checkout first warms the
page cache. "first answer" is any HTTP answer on /healthz (the loading page's 503 or the app's 200);
"ready" is the first 200. The load average before each run is kept with it, since on a shared
machine it explains most of the spread. Writes benchmarks/results/startup_time.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
POLL_S = 0.005
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthz_status(port: int) -> int | None:
    """The HTTP status of GET /healthz, or None while nothing answers on the port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status
    except OSError:  # refused, reset, or the loading server closing while Gradio takes over
        return None
    finally:
        connection.close()


def measure(checkout: Path, model: str) -> dict[str, float]:
    """Seconds from starting `python app.py` in `checkout` to the first answer and to /healthz 200."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "app.py", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    first = None
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py in {checkout} exited: {process.stderr.read().decode()[-2000:]}")
            status = healthz_status(port)
            now = time.perf_counter() - started
            if status is not None and first is None:
                first = now
            if status == 200:
                assert first is not None
                return {"first_answer_s": round(first, 3), "ready_s": round(now, 3), "load_1min": load}
            if now > TIMEOUT_S:
                raise RuntimeError(f"app.py in {checkout} was not ready after {TIMEOUT_S} s")
            time.sleep(POLL_S)
    finally:
        process.terminate()
        process.wait(timeout=30)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def git_head(checkout: Path) -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=checkout, capture_output=True, text=True)
    return done.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def markdown(report: dict) -> str:
    lines = [
        "# Start-up time of `python app.py`",
        "",
        f"`python benchmarks/startup_time.py {report['arguments']}`, {report['date']}, "
        f"{report['machine']}. Model `{report['model']}`, page cache warm (one unmeasured run per "
        "checkout first), runs interleaved between checkouts. Seconds from process start to the "
        "port's first HTTP answer (`/healthz`, any status) and to `/healthz` 200 (the app serves).",
        "",
        "| checkout | commit | first answer: median (min-max) | /healthz 200: median (min-max) | runs |",
        "|---|---|---|---|---|",
    ]
    for name, result in report["checkouts"].items():
        first, ready = result["first_answer_s"], result["ready_s"]
        lines.append(
            f"| {name} | {result['commit']} | {first['median']:.2f} s ({first['min']:.2f}-{first['max']:.2f}) "
            f"| {ready['median']:.2f} s ({ready['min']:.2f}-{ready['max']:.2f}) | {len(result['runs'])} |"
        )
    loads = [run["load_1min"] for result in report["checkouts"].values() for run in result["runs"]]
    lines += [
        "",
        f"1-minute load average before the runs: {min(loads):.2f} to {max(loads):.2f} on "
        f"{report['cpus']} CPUs (other jobs shared the machine; see the JSON for each run).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", required=True, help="NAME=FOLDER holding app.py")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--out", type=Path, default=RESULTS / "startup_time")
    args = parser.parse_args(argv)
    checkouts = {
        name: Path(folder).resolve() for name, _, folder in (c.partition("=") for c in args.checkout)
    }

    commits = {name: git_head(folder) for name, folder in checkouts.items()}  # before: edits may follow
    for name, folder in checkouts.items():
        print(f"warm-up: {name}", flush=True)
        measure(folder, args.model)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    for round_number in range(args.runs):
        for name, folder in checkouts.items():
            runs[name].append(measure(folder, args.model))
            print(f"run {round_number + 1} {name}: {runs[name][-1]}", flush=True)

    report = {
        "arguments": " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "cpus": os.cpu_count(),
        "model": args.model,
        "checkouts": {
            name: {
                "commit": commits[name],
                "first_answer_s": summary([run["first_answer_s"] for run in runs[name]]),
                "ready_s": summary([run["ready_s"] for run in runs[name]]),
                "runs": runs[name],
            }
            for name in checkouts
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
