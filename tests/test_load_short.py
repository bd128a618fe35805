"""The load test's short form: 4 gradio_client clients for 10 s against the app (tiny-random).

The full run (8 clients, 240 s) is `python benchmarks/load_test.py`, with its results committed
in benchmarks/results/load_test.{json,md}. Here: no crash, no error other than "queue full", every
main endpoint served, memory bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))

ROOT = Path(__file__).resolve().parents[1]


def test_short_load_run(tmp_path):
    command = [
        sys.executable, "benchmarks/load_test.py",
        "--clients", "4", "--duration", "10", "--warmup", "4", "--max-requests", "2000", "--out", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "load_test.json").read_text())
    total = result["total"]
    assert result["verdict"]["no_crash"]
    assert total["errors"] == 0, result["error_samples"]
    assert total["served"] >= 10
    served = {name for name, row in total["by_endpoint"].items() if row["served"]}
    assert {"/caption", "/answer", "/chat", "/index_gallery", "/search_text"} <= served, served
    assert total["p95_s"] is not None and total["p50_s"] <= total["p95_s"]
    assert 0 < result["memory"]["peak_mb"] < 3000
    assert (tmp_path / "load_test.md").read_text().startswith("# Load test")
