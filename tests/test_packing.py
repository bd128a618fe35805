"""Packing dynamic-int8 layers (blip2_app/packing.py): before serving, or in the background while
the engine already answers; either way the finished model is the one packing at start-up gives."""

import threading

import pytest
import torch

from blip2_app import packing, quantization, startup
from blip2_app.config import Settings, SettingsError
from blip2_app.generation import GenerationSettings
from blip2_app.ui.report import model_report_markdown

GREEDY = GenerationSettings(decoding="greedy", max_new_tokens=8)
TEXTS = ["a red cat", "a blue dog on the grass", "an astronaut in the sky"]


def load(**changes):
    changes.setdefault("precision", "dynamic-int8")
    return startup.load_engine(Settings(model="tiny-random", weight_cache="off", **changes))


def kinds(engine) -> tuple[int, int]:
    """(packed, weight-only) int8 layers over both models, each layer once."""
    models = [m.model for m in (engine.text.loaded, engine.matcher) if m is not None]
    layers = {id(m): m for model in models for m in model.modules()}.values()
    return (
        sum(quantization.is_dynamic_int8(m) for m in layers),
        sum(isinstance(m, quantization.WeightOnlyInt8Linear) for m in layers),
    )


@pytest.fixture
def gate(monkeypatch):
    """Background packing counts as paying at tiny size, and waits for `gate.set()` before the
    first layer, so a test sees the engine while nothing is packed yet."""
    monkeypatch.setattr(startup, "BACKGROUND_MIN_BYTES", 0)
    opened = threading.Event()
    pack = quantization.packed_from_weight_only

    def gated(layer):
        assert opened.wait(60), "the test never opened the gate"
        return pack(layer)

    monkeypatch.setattr(quantization, "packed_from_weight_only", gated)
    return opened


def test_startup_packing_leaves_no_weight_only_layer_and_counts_a_shared_encoder_once():
    engine = load(packing="startup")
    packer = engine.text.loaded.packer
    assert packer is not None and packer is engine.matcher.packer and packer.finished
    assert "Vision encoder shared" in " ".join(engine.matcher.notes)
    packed, weight_only = kinds(engine)
    assert weight_only == 0 and packed == packer.total == packer.done > 0
    assert packer.slots == [None] * packer.total  # no weight-only layer (its rows) kept alive
    assert not packer.background and engine.text.loaded.report()["packing"]["seconds"] is not None


def test_a_model_below_the_threshold_is_packed_before_serving_even_in_background_mode():
    engine = load(packing="background")
    packer = engine.text.loaded.packer
    assert packer.finished and not packer.background and kinds(engine)[1] == 0


def test_background_packing_serves_at_once_and_ends_as_startup_packing(gate, images):
    gate.set()
    reference = load(packing="startup")
    gate.clear()
    engine = load(packing="background")
    packer = engine.text.loaded.packer
    assert packer.background and not packer.finished
    assert kinds(engine) == (0, packer.total)  # nothing packed yet, and the engine answers
    captions = engine.caption(images, generation=GREEDY)
    assert len(captions) == len(images) and all(c[0].text for c in captions)
    report = model_report_markdown(engine.info(), engine, Settings(model="tiny-random"))
    assert f"0 of {packer.total} layers so far, in the background" in report

    gate.set()
    assert packer.wait(60) and packer.error is None
    assert kinds(engine) == (packer.total, 0)
    # The same packed layers as packing at start-up: equal results, to the last bit.
    assert engine.caption(images, generation=GREEDY) == reference.caption(images, generation=GREEDY)
    torch.testing.assert_close(
        engine.itc(images[:2], TEXTS), reference.itc(images[:2], TEXTS), rtol=0, atol=0
    )
    report = model_report_markdown(engine.info(), engine, Settings(model="tiny-random"))
    assert f"all {packer.total} layers, in " in report and "in the background" in report


def test_a_packing_failure_keeps_the_unpacked_layers_serving(monkeypatch, images):
    monkeypatch.setattr(startup, "BACKGROUND_MIN_BYTES", 0)
    calls = []

    def fails_second(layer):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("prepack failed")
        return packing.quantization.from_int8_parts(quantization.layer_int8_parts(layer))

    monkeypatch.setattr(quantization, "packed_from_weight_only", fails_second)
    engine = load(packing="background", retrieval_model="none")
    packer = engine.text.loaded.packer
    assert packer.wait(60) and isinstance(packer.error, RuntimeError)
    assert kinds(engine)[1] >= 1 and engine.caption(images[:1], generation=GREEDY)
    report = model_report_markdown(engine.info(), engine, Settings(model="tiny-random"))
    assert "stopped after" in report and "prepack failed" in report


def test_without_torchs_weight_only_kernel_packing_happens_before_serving(monkeypatch):
    monkeypatch.setattr(startup, "BACKGROUND_MIN_BYTES", 0)

    def gone():
        raise quantization.QuantizedOpsUnavailableError("no weight-only kernel")

    monkeypatch.setattr(quantization, "check_weight_only_ops", gone)
    engine = load(packing="background", retrieval_model="none")
    assert engine.text.loaded.packer.finished and not engine.text.loaded.packer.background


def test_the_packing_setting():
    assert Settings.from_sources([], env={}).packing == "background"
    assert Settings.from_sources(["--packing", "startup"], env={}).packing == "startup"
    assert Settings.from_sources([], env={"BLIP2_PACKING": "startup"}).packing == "startup"
    with pytest.raises(SettingsError, match="packing must be one of"):
        Settings(packing="lazy")


def test_fp32_models_have_nothing_to_pack():
    engine = startup.load_engine(Settings(model="tiny-random", weight_cache="off"))
    assert engine.text.loaded.packer is None and engine.text.loaded.report()["packing"] is None


def test_stop_packs_no_further_layer(gate):
    engine = load(packing="background", retrieval_model="none")
    packer = engine.text.loaded.packer
    threading.Timer(0.2, gate.set).start()  # the layers in flight finish after stop() is called
    packer.stop()
    assert packer.finished and not any(t.is_alive() for t in packer._threads)
    assert packer.done < packer.total and packer.seconds is None and packer.error is None


EXITS_WHILE_PACKING = """
import torch
from PIL import Image
from blip2_app import quantization, startup
from blip2_app.config import Settings
from blip2_app.generation import GenerationSettings

startup.BACKGROUND_MIN_BYTES = 0
pack = quantization.packed_from_weight_only
big = torch.randn(1200, 1200)
# Each layer spends a while inside torch's C++ code, as packing a real-size layer does.
quantization.packed_from_weight_only = lambda layer: (big @ big @ big, pack(layer))[1]
engine = startup.load_engine(
    Settings(model="tiny-random", precision="dynamic-int8", retrieval_model="none", weight_cache="off")
)
engine.caption(Image.new("RGB", (32, 32), "red"), generation=GenerationSettings(max_new_tokens=2))
packer = engine.text.loaded.packer
assert packer.background and not packer.finished
print("exiting with", packer.done, "of", packer.total, "packed")
"""


def test_a_process_that_ends_while_packing_exits_cleanly(tmp_path):
    """A CLI job done before packing is: the packer's threads stop at exit (a thread left inside
    a packing call while Python shuts down aborted the process: 'terminate called...')."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", EXITS_WHILE_PACKING],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exiting with" in result.stdout and "terminate called" not in result.stderr


def test_the_cli_packs_before_its_job_starts(monkeypatch):
    """A CLI job's results all come from the same layers, whatever BLIP2_PACKING says."""
    from blip2_app import cli

    monkeypatch.setattr(startup, "BACKGROUND_MIN_BYTES", 0)
    monkeypatch.setenv("BLIP2_PACKING", "background")
    args = cli._parser().parse_args(
        ["caption", "photo.png", "--model", "tiny-random", "--precision", "dynamic-int8"]
    )
    packer = cli._engine(args, retrieval=False).text.loaded.packer
    assert packer.finished and not packer.background and packer.done == packer.total
