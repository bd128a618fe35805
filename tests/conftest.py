"""Shared test set-up: offline, tiny checkpoints built once per run into a temporary folder."""

import os
import tempfile

# Set before anything imports huggingface_hub / gradio, and inherited by subprocesses (CLI, app).
os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Cached example outputs (--cache-examples lazy) go to a temporary folder, not .gradio/ in the checkout.
os.environ.setdefault("GRADIO_EXAMPLES_CACHE", tempfile.mkdtemp(prefix="blip2-examples-"))

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).parent / "data"
GENERATING_MODELS = (
    "tiny-random",
    "tiny-random-t5",
    "tiny-random-instructblip",
    "tiny-random-instructblip-t5",
)


@pytest.fixture(scope="session")
def load_tiny():
    """load_tiny(name, **settings) -> Engine, cached per arguments for the whole run."""
    from blip2_app.config import Settings
    from blip2_app.startup import load_engine

    engines = {}

    def load(name: str = "tiny-random", **changes):
        key = (name, tuple(sorted(changes.items())))
        if key not in engines:
            engines[key] = load_engine(Settings(model=name, **changes))
        return engines[key]

    return load


@pytest.fixture(scope="session")
def images():
    """Five small, distinct RGB images (noise of different seeds, plus two flat colours)."""
    noise = [
        Image.fromarray((np.random.RandomState(i).rand(40 + i, 50, 3) * 255).astype("uint8"))
        for i in range(3)
    ]
    return [*noise, Image.new("RGB", (30, 30), "red"), Image.new("RGB", (64, 32), "blue")]
