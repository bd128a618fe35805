"""`python app.py` that cannot start says why in one sentence, exits non-zero, shows no traceback.

Each case is a real subprocess (as users start the app); they run side by side to keep this fast.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMPTY_HF_HOME = tempfile.mkdtemp(prefix="blip2-empty-hf-")
NOT_A_CHECKPOINT = tempfile.mkdtemp(prefix="blip2-not-a-checkpoint-")
BUSY = socket.socket()
BUSY.bind(("127.0.0.1", 0))
BUSY.listen()
BUSY_PORT = BUSY.getsockname()[1]

CASES = {
    "unknown model name": (
        ["--model", "blip2-opt-99b"],
        {},
        "Unknown model 'blip2-opt-99b': it is not a registry name",
    ),
    "missing local folder": (
        ["--model", "/nonexistent/models/blip2-opt-2.7b"],
        {},
        "The model folder '/nonexistent/models/blip2-opt-2.7b' given to --model does not exist.",
    ),
    "folder without a checkpoint": (
        ["--model", NOT_A_CHECKPOINT],
        {},
        "is not a checkpoint folder: it has no config.json.",
    ),
    "unreachable hub (registry name)": (
        ["--model", "blip2-opt-2.7b"],
        {"HF_HUB_OFFLINE": "1", "HF_HOME": EMPTY_HF_HOME},
        "Could not load the model 'Salesforce/blip2-opt-2.7b': it is not in the local Hugging Face cache",
    ),
    "unreachable hub (hub id)": (
        ["--model", "someone/blip2-never-downloaded"],
        {"HF_HUB_OFFLINE": "1", "HF_HOME": EMPTY_HF_HOME},
        "Could not load the model 'someone/blip2-never-downloaded'",
    ),
    "not enough memory for the precision": (
        ["--model", "tiny-random", "--precision", "fp32"],
        {"BLIP2_AVAILABLE_MEMORY_MB": "64"},
        "Not enough memory to load tiny-random (vision fp32, qformer fp32, llm fp32): it needs about",
    ),
    "nonsense limit": (
        ["--model", "tiny-random", "--max-galleries", "0"],
        {},
        "max_galleries must be at least 1; got 0.",
    ),
    "port already taken": (
        ["--model", "tiny-random", "--port", str(BUSY_PORT), "--retrieval-model", "none"],
        {},
        f"cannot listen on 127.0.0.1:{BUSY_PORT}",
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """app.py with `args`, on a port of its own (the cases run at once; a later --port wins)."""
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(free_port()), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def results():
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(start, args, env) for name, (args, env, _) in CASES.items()}
        yield {name: future.result() for name, future in futures.items()}
    BUSY.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_clear_message_and_a_nonzero_exit(results, case):
    result = results[case]
    sentence = CASES[case][2]
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "Traceback" not in output, output[-4000:]
    messages = [line for line in result.stderr.splitlines() if line.startswith("blip2-studio: ")]
    assert len(messages) == 1, result.stderr[-2000:]
    assert sentence in messages[0], messages[0]


def test_no_model_is_loaded_when_memory_is_short(results):
    """The check runs before loading: nothing was loaded, so no 'Loaded ...' line was logged."""
    result = results["not enough memory for the precision"]
    assert "Loaded tiny-random" not in result.stderr
