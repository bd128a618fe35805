"""The fast CPU paths: tensor-by-tensor loading, dynamic int8, one shared vision encoder."""

import copy

import pytest
import torch
import transformers

from blip2_app import loading, quantization
from blip2_app.backends.local import LocalBackend
from blip2_app.config import Settings
from blip2_app.engine import Engine
from blip2_app.generation import GenerationSettings
from blip2_app.loading import PRESETS, checkpoint_location, load_model, weight_files
from blip2_app.registry import Registry
from blip2_app.startup import load_engine
from tests.conftest import GENERATING_MODELS
from tests.test_quantization import torch_from_float

CPU = torch.device("cpu")
GREEDY = GenerationSettings(decoding="greedy", max_new_tokens=8)


@pytest.mark.parametrize("name", GENERATING_MODELS)
def test_streamed_load_equals_from_pretrained(images, name):
    entry = Registry.load().resolve(name)
    streamed = load_model(entry, PRESETS["fp32"], CPU)
    reference = getattr(transformers, entry.family.architecture).from_pretrained(checkpoint_location(entry))
    # Every tensor, non-persistent buffers included (transformers fills some in _init_weights).
    streamed_tensors = {**dict(streamed.model.named_parameters()), **dict(streamed.model.named_buffers())}
    for key, value in [*reference.named_parameters(), *reference.named_buffers()]:
        assert torch.equal(streamed_tensors[key], value), key
    engine = Engine(LocalBackend(streamed))
    assert engine.caption(images[:2], generation=GREEDY) == Engine(
        LocalBackend(load_model(entry, PRESETS["fp32"], CPU))
    ).caption(images[:2], generation=GREEDY)


def test_dynamic_int8_quantizes_every_component(images):
    engine = load_engine(Settings(model="tiny-random", precision="dynamic-int8"))
    for loaded in (engine.text.loaded, engine.matcher):
        for component, info in loaded.report()["components"].items():
            assert set(info["linear_layers"]) == {"DynamicInt8Linear"}, (loaded.entry.name, component)
    head = engine.text.loaded.model.language_model.get_output_embeddings()
    assert isinstance(head, torch.ao.nn.quantized.dynamic.Linear)  # the tied LM head too
    assert len(engine.caption(images[:2], generation=GREEDY)[1][0].token_ids) > 0


@pytest.mark.parametrize("name", GENERATING_MODELS)
def test_every_generating_family_loads_and_captions_at_dynamic_int8(images, name):
    """OPT, T5 and both InstructBLIP families: every Linear quantized, the LM head within half a
    quantization step of the fp32 head, and a caption comes back (T5's own weight init once
    wrote into quantized layers)."""
    entry = Registry.load().resolve(name)
    loaded = load_model(entry, PRESETS["dynamic-int8"], CPU)
    for component, info in loaded.report()["components"].items():
        assert set(info["linear_layers"]) == {"DynamicInt8Linear"}, component
    fp32_head = load_model(entry, PRESETS["fp32"], CPU).model.language_model.get_output_embeddings().weight
    head = loaded.model.language_model.get_output_embeddings().weight()
    scales = head.q_per_channel_scales().float().unsqueeze(1)
    assert ((head.dequantize() - fp32_head.detach()).abs() <= scales / 2 + 1e-6).all()
    assert len(Engine(LocalBackend(loaded)).caption(images[:1], generation=GREEDY)[0][0].token_ids) > 0


def test_tied_lm_head_is_quantized_in_chunks_exactly_as_torch_does(load_tiny, monkeypatch):
    """The tied head is quantized row block by row block, read straight from the fp32 checkpoint
    (no fp32 or bf16 copy of the table): its packed weight equals torch's own `from_float` on the
    fp32 table, and the embedding table reads the same int8 rows, each within half a quantization
    step of the fp32 values."""
    monkeypatch.setattr(quantization, "TIED_HEAD_CHUNK_ROWS", 7)  # several chunks, a ragged last one
    quantized = load_engine(Settings(model="tiny-random", precision="dynamic-int8", retrieval_model="none"))
    language_model = quantized.text.loaded.model.language_model
    head, table = language_model.get_output_embeddings(), language_model.get_input_embeddings()
    fp32_table = load_tiny("tiny-random").text.loaded.model.language_model.get_input_embeddings().weight
    reference = torch.nn.Linear(fp32_table.shape[1], fp32_table.shape[0], bias=False)
    reference.weight.data = fp32_table.detach().clone()
    expected = torch_from_float(reference).weight()
    assert torch.equal(head.weight().int_repr(), expected.int_repr())
    assert torch.equal(head.weight().q_per_channel_scales(), expected.q_per_channel_scales())
    assert torch.equal(table.rows, expected.int_repr())  # one int8 table, read by both
    ids = torch.arange(fp32_table.shape[0]).view(1, -1)
    error = (table(ids)[0] - fp32_table.detach()).abs()
    assert (error <= table.scales.unsqueeze(1) / 2 + 1e-6).all()


def test_a_loaded_tied_table_is_quantized_the_same_way(load_tiny):
    """When the table is already in memory (no stored table to read rows from), the head is
    quantized from it, and its floating-point copy is released."""
    model = load_tiny("tiny-random").text.loaded.model
    language_model = copy.deepcopy(model.language_model)
    fp32_table = language_model.get_input_embeddings().weight.detach().clone()
    assert quantization.quantize_tied_head(language_model)
    reference = torch.nn.Linear(fp32_table.shape[1], fp32_table.shape[0], bias=False)
    reference.weight.data = fp32_table
    expected = torch_from_float(reference).weight()
    head, table = language_model.get_output_embeddings(), language_model.get_input_embeddings()
    assert torch.equal(head.weight().int_repr(), expected.int_repr())
    assert torch.equal(table.rows, expected.int_repr())
    assert not any(
        t.dtype.is_floating_point and t.shape == fp32_table.shape for t in language_model.parameters()
    )
    assert not quantization.quantize_tied_head(language_model)  # nothing tied any more


def test_vision_encoder_is_shared_when_weights_are_identical(images):
    engine = load_engine(Settings(model="tiny-random"))
    assert engine.matcher.model.vision_model is engine.text.loaded.model.vision_model
    assert any("shared with tiny-random" in note for note in engine.matcher.notes)
    assert engine.matcher.vision_fingerprint == engine.text.loaded.vision_fingerprint != ""
    calls = [0]
    engine.text.loaded.model.vision_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    engine.caption([images[3]], generation=GREEDY)
    engine.image_features([images[3]])
    assert calls[0] == 1  # captioning and retrieval encoded the image once
    separate = load_engine(Settings(model="tiny-random-itm"))
    torch.testing.assert_close(engine.itc(images, ["a cat"]), separate.itc(images, ["a cat"]))


def test_different_vision_weights_are_not_shared(tmp_path):
    registry = Registry.load()
    t5 = registry.resolve("tiny-random-t5")
    folder = tmp_path / "itm"
    reference = transformers.Blip2ForImageTextRetrieval.from_pretrained(
        checkpoint_location(registry.resolve("tiny-random-itm"))
    )
    with torch.no_grad():
        reference.vision_model.post_layernorm.weight.add_(1.0)
    reference.save_pretrained(folder)
    transformers.Blip2Processor.from_pretrained(
        checkpoint_location(registry.resolve("tiny-random-itm"))
    ).save_pretrained(folder)
    captioner = load_model(t5, PRESETS["fp32"], CPU)
    matcher = load_model(registry.resolve(str(folder)), PRESETS["fp32"], CPU, share_vision_with=captioner)
    assert matcher.model.vision_model is not captioner.model.vision_model
    assert weight_files(str(folder))


def _untied_t5_checkpoint(folder):
    """tiny-random-t5 saved with an LM head of its own (-1.5 x the table), as flan-t5 stores one."""
    entry = Registry.load().resolve("tiny-random-t5")
    reference = transformers.Blip2ForConditionalGeneration.from_pretrained(checkpoint_location(entry))
    language_model = reference.language_model
    language_model.lm_head.weight = torch.nn.Parameter(language_model.shared.weight.detach() * -1.5)
    reference.config.text_config.tie_word_embeddings = False
    reference.save_pretrained(folder)
    transformers.Blip2Processor.from_pretrained(checkpoint_location(entry)).save_pretrained(folder)
    return reference


def test_a_stored_untied_lm_head_keeps_its_own_weights(tmp_path):
    """flan-t5 checkpoints store an LM head that differs from the embedding table, while
    transformers' T5 config always says "tied": the stored head is loaded, as transformers does."""
    reference = _untied_t5_checkpoint(tmp_path)
    streamed = load_model(Registry.load().resolve(str(tmp_path)), PRESETS["fp32"], CPU).model
    expected = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path).language_model
    language_model = streamed.language_model
    assert torch.equal(language_model.lm_head.weight, reference.language_model.lm_head.weight)
    assert torch.equal(language_model.lm_head.weight, expected.lm_head.weight)
    assert language_model.lm_head.weight is not language_model.shared.weight
    assert language_model.encoder.embed_tokens.weight is language_model.shared.weight
    assert language_model.decoder.embed_tokens.weight is language_model.shared.weight


def test_a_stored_untied_lm_head_is_quantized_from_its_own_weights(tmp_path, images):
    """At dynamic-int8 the stored head is quantized from its own weights; the table (bf16) stays
    shared by encoder and decoder, which read it as fp32."""
    reference = _untied_t5_checkpoint(tmp_path).language_model
    loaded = load_model(Registry.load().resolve(str(tmp_path)), PRESETS["dynamic-int8"], CPU)
    language_model = loaded.model.language_model
    shared = language_model.get_input_embeddings()
    assert language_model.encoder.embed_tokens.weight is shared.weight
    assert language_model.decoder.embed_tokens.weight is shared.weight
    ids = torch.arange(shared.num_embeddings).view(1, -1)
    for table in (shared, language_model.encoder.embed_tokens, language_model.decoder.embed_tokens):
        assert table(ids).dtype == torch.float32
    assert torch.allclose(shared.weight.float(), reference.shared.weight, rtol=1e-2, atol=1e-6)
    head = language_model.get_output_embeddings()
    assert isinstance(head, torch.ao.nn.quantized.dynamic.Linear)
    scales = head.weight().q_per_channel_scales().float().unsqueeze(1)
    error = (head.weight().dequantize() - reference.lm_head.weight.detach()).abs()
    assert (error <= scales / 2 + 1e-6).all()
    assert len(Engine(LocalBackend(loaded)).caption(images[:1], generation=GREEDY)[0][0].token_ids) > 0


def test_vision_weights_are_hashed_only_when_a_retrieval_model_may_share_them(monkeypatch):
    """Hashing the vision weights (4 GB at real size, 7 s) decides sharing; a captioner loaded
    alone never needs it."""
    hashed = []
    real = loading.vision_fingerprint
    monkeypatch.setattr(loading, "vision_fingerprint", lambda files: hashed.append(files) or real(files))
    load_engine(Settings(model="tiny-random", retrieval_model="none", weight_cache="off"))
    assert hashed == []
    engine = load_engine(Settings(model="tiny-random", weight_cache="off"))
    assert len(hashed) == 2  # the captioner's and the retrieval model's, once each
    assert engine.matcher.model.vision_model is engine.text.loaded.model.vision_model
