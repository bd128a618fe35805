"""Per-component precision is what the loaded modules really hold."""

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt

from blip2_app.errors import ModelLoadError
from blip2_app.generation import GenerationSettings
from blip2_app.loading import ComponentPrecisions, resolve_precisions


def linear_classes_by_component(model) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            found.setdefault(name.split(".")[0], set()).add(type(module).__name__)
    return found


@pytest.mark.parametrize(("preset", "quantized_class"), [("int8", Linear8bitLt), ("nf4", Linear4bit)])
def test_quantized_preset_quantizes_only_the_language_model(load_tiny, images, preset, quantized_class):
    engine = load_tiny("tiny-random", precision=preset, retrieval_model="none")
    model = engine.text.loaded.model
    quantized = {
        name.split(".")[0] for name, module in model.named_modules() if isinstance(module, quantized_class)
    }
    assert quantized == {"language_model"}
    classes = linear_classes_by_component(model)
    assert classes["vision_model"] == {"Linear"} and classes["qformer"] == {"Linear"}
    assert {p.dtype for p in model.vision_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}
    report = engine.text.loaded.report()["components"]
    assert report["llm"]["requested"] == preset
    assert report["llm"]["linear_layers"][quantized_class.__name__] > 0
    assert report["vision"]["dtypes"] == {"bfloat16": report["vision"]["dtypes"]["bfloat16"]}
    # And it still generates.
    out = engine.caption([images[0]], generation=GenerationSettings(decoding="greedy", max_new_tokens=4))
    assert len(out[0][0].token_ids) >= 1


def test_per_component_overrides(load_tiny):
    engine = load_tiny("tiny-random", precision="fp32", vision_precision="bf16", retrieval_model="none")
    model = engine.text.loaded.model
    assert {p.dtype for p in model.vision_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}
    assert {p.dtype for p in model.language_model.parameters()} == {torch.float32}
    assert not any(isinstance(m, (Linear8bitLt, Linear4bit)) for m in model.modules())


def test_fp16_on_cpu_becomes_bf16_with_a_note(load_tiny):
    engine = load_tiny("tiny-random", precision="fp16", retrieval_model="none")
    assert engine.text.loaded.precisions == ComponentPrecisions("bf16", "fp32", "bf16")
    assert any("fp16 is not supported on CPU" in note for note in engine.text.loaded.notes)
    assert torch.float16 not in {p.dtype for p in engine.text.loaded.model.parameters()}


def test_int8_and_nf4_together_are_refused():
    with pytest.raises(ModelLoadError, match="one quantization mode"):
        ComponentPrecisions("nf4", "fp32", "int8")


def test_unknown_precision_is_refused():
    with pytest.raises(ModelLoadError, match="Unknown precision 'int3'"):
        ComponentPrecisions("int3", "fp32", "fp32")


def test_auto_uses_the_registry_default(load_tiny):
    from blip2_app.registry import Registry

    registry = Registry.load()
    cpu = torch.device("cpu")
    assert resolve_precisions("auto", registry.resolve("blip2-opt-2.7b"), cpu)[0].llm == "dynamic-int8"
    assert (
        resolve_precisions("auto", registry.resolve("blip2-opt-2.7b"), torch.device("cuda"))[0].llm == "fp16"
    )
    assert resolve_precisions("auto", registry.resolve("tiny-random"), cpu)[0] == ComponentPrecisions(
        "fp32", "fp32", "fp32"
    )


def test_a_registry_entry_can_set_a_precision_per_component(tmp_path):
    """A user's entry sets its default per component (and per device); `auto` loads exactly that,
    an explicit --precision still wins, and a bad entry is refused with a sentence naming it."""
    import json

    from blip2_app.config import Settings
    from blip2_app.registry import Registry
    from blip2_app.startup import load_engine

    per_component = {"vision": "bf16", "qformer": "fp32", "llm": "nf4"}
    models = {
        "mixed": {"checkpoint": "tiny:blip2-opt", "family": "blip2-opt", "precision": per_component},
        "by-device": {
            "checkpoint": "tiny:blip2-opt",
            "family": "blip2-opt",
            "precision": {"cpu": {"vision": "fp32", "qformer": "bf16", "llm": "fp32"}, "cuda": "fp16"},
        },
        "broken": {"checkpoint": "tiny:blip2-opt", "family": "blip2-opt", "precision": {"vision": "int3"}},
    }
    user = tmp_path / "models.json"
    user.write_text(json.dumps({"models": {k: v for k, v in models.items() if k != "broken"}}))
    registry = Registry.load([user])
    cpu = torch.device("cpu")
    assert resolve_precisions("auto", registry.resolve("mixed"), cpu)[0] == ComponentPrecisions(
        **per_component
    )
    assert resolve_precisions("auto", registry.resolve("by-device"), cpu)[0] == ComponentPrecisions(
        "fp32", "bf16", "fp32"
    )
    assert resolve_precisions("auto", registry.resolve("by-device"), torch.device("cuda"))[0].llm == "fp16"
    assert resolve_precisions("bf16", registry.resolve("mixed"), cpu)[0].llm == "bf16"
    engine = load_engine(Settings(model="mixed", models_file=str(user), retrieval_model="none"))
    classes = linear_classes_by_component(engine.text.loaded.model)
    assert "Linear4bit" in classes["language_model"] and classes["vision_model"] == {"Linear"}
    assert engine.text.loaded.report()["components"]["llm"]["requested"] == "nf4"
    assert {p.dtype for p in engine.text.loaded.model.vision_model.parameters()} == {torch.bfloat16}

    user.write_text(json.dumps({"models": {"broken": models["broken"]}}))
    with pytest.raises(ModelLoadError, match="registry is invalid: a precision per component names vision"):
        Registry.load([user])
    models["broken"]["precision"] = {"vision": "int3", "qformer": "fp32", "llm": "fp32"}
    user.write_text(json.dumps({"models": {"broken": models["broken"]}}))
    with pytest.raises(ModelLoadError, match="default precision for broken: Unknown precision 'int3'"):
        resolve_precisions("auto", Registry.load([user]).resolve("broken"), cpu)


@pytest.mark.parametrize("amx", [True, False])
def test_auto_runs_the_vision_encoder_in_bf16_on_a_cpu_with_amx(monkeypatch, amx):
    """Only `auto` moves the vision encoder off int8 (with a note for the Model tab); an explicit
    preset or --vision-precision is kept as asked, and a GPU is not concerned."""
    from blip2_app import loading
    from blip2_app.registry import Registry

    monkeypatch.setattr(loading, "cpu_has_amx_bf16", lambda: amx)
    entry = Registry.load().resolve("blip2-opt-2.7b")
    cpu = torch.device("cpu")
    precisions, notes = resolve_precisions("auto", entry, cpu)
    expected_vision = "bf16" if amx else "dynamic-int8"
    assert precisions == ComponentPrecisions(expected_vision, "dynamic-int8", "dynamic-int8")
    assert any("AMX" in note for note in notes) == amx
    assert resolve_precisions("dynamic-int8", entry, cpu)[0].vision == "dynamic-int8"
    kept, kept_notes = resolve_precisions("auto", entry, cpu, {"vision": "dynamic-int8"})
    assert kept.vision == "dynamic-int8" and not any("AMX" in note for note in kept_notes)
    assert resolve_precisions("auto", entry, torch.device("cuda"))[0].vision == "fp16"
    # A model whose registry default is not int8 keeps it (tiny-random: fp32).
    assert resolve_precisions("auto", Registry.load().resolve("tiny-random"), cpu)[0].vision == "fp32"


@pytest.mark.parametrize(
    "name", ["tiny-random", "tiny-random-t5", "tiny-random-instructblip", "tiny-random-instructblip-t5"]
)
def test_a_bf16_vision_encoder_feeds_an_int8_q_former(load_tiny, images, name):
    """auto's mix on a CPU with AMX, for every family: InstructBLIP's Q-Former does not cast the
    vision features to its own dtype, so the engine does."""
    engine = load_tiny(name, precision="dynamic-int8", vision_precision="bf16", retrieval_model="none")
    assert engine.text.loaded.precisions == ComponentPrecisions("bf16", "dynamic-int8", "dynamic-int8")
    out = engine.caption([images[0]], generation=GenerationSettings(decoding="greedy", max_new_tokens=3))
    assert out[0][0].token_ids
