"""blip2_app/quantization.py: our dynamic int8 equals torch's own, and a broken torch fails loudly."""

import warnings

import pytest
import torch

from blip2_app import quantization
from blip2_app.config import Settings
from blip2_app.startup import load_engine


def torch_from_float(linear: torch.nn.Linear) -> torch.nn.Module:
    """torch's own conversion, the reference our two-step version must equal."""
    linear.qconfig = quantization.QCONFIG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.nn.quantized.dynamic.Linear.from_float(linear)


@pytest.mark.parametrize("bias", [True, False])
def test_dynamic_int8_equals_torchs_from_float(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=bias)
    with torch.no_grad():
        layer.weight[3] = 0.0  # a row of zeros: its scale is the observer's epsilon, not 0
    ours, theirs = quantization.dynamic_int8(layer), torch_from_float(layer)
    assert (ours.in_features, ours.out_features) == (48, 40)
    assert torch.equal(ours.weight().int_repr(), theirs.weight().int_repr())
    assert torch.equal(ours.weight().q_per_channel_scales(), theirs.weight().q_per_channel_scales())
    assert torch.equal(ours.weight().q_per_channel_zero_points(), theirs.weight().q_per_channel_zero_points())
    inputs = torch.randn(5, 48)
    assert torch.equal(ours(inputs), theirs(inputs))


def test_int8_parts_rebuild_the_same_layer():
    torch.manual_seed(1)
    layer = quantization.dynamic_int8(torch.nn.Linear(32, 24))
    parts = quantization.int8_parts(layer)
    assert parts["rows"].dtype == torch.int8
    rebuilt = quantization.from_int8_parts(parts)
    inputs = torch.randn(3, 32)
    assert torch.equal(rebuilt(inputs), layer(inputs))


def test_the_check_passes_on_this_torch():
    quantization.check_quantized_ops()


def test_a_torch_without_x86_int8_kernels_is_refused(monkeypatch):
    monkeypatch.setattr(quantization, "ENGINES", ("a-kernel-this-torch-lacks",))
    with pytest.raises(quantization.QuantizedOpsUnavailableError, match="no x86 int8 kernels"):
        quantization.check_quantized_ops()


def test_a_broken_int8_kernel_stops_the_load_instead_of_running_fp32(monkeypatch):
    def removed(*args, **kwargs):
        raise RuntimeError("quantized::linear_dynamic was removed")

    monkeypatch.setattr(quantization.DynamicLinear, "forward", removed)
    with pytest.raises(quantization.QuantizedOpsUnavailableError, match="no longer works"):
        load_engine(Settings(model="tiny-random", precision="dynamic-int8", retrieval_model="none"))


def test_a_wrong_int8_kernel_is_caught(monkeypatch):
    monkeypatch.setattr(quantization.DynamicLinear, "forward", lambda self, x: torch.zeros(*x.shape[:-1], 32))
    with pytest.raises(quantization.QuantizedOpsUnavailableError, match="off by"):
        quantization.check_quantized_ops()


def test_dynamic_int8_itc_equals_torchs_quantization_of_the_same_model(load_tiny, images):
    """The streamed, quantized retrieval model computes what torch's own `quantize_dynamic` of the
    fp32 model computes (same kernels, so equal on any CPU); its distance from fp32 is a property
    of the weights (random tiny ones amplify rounding), measured at real size in benchmarks/."""
    texts = ["a red cat", "a blue dog on the grass", "an astronaut in the sky"]
    quantized = load_engine(Settings(model="tiny-random-itm", precision="dynamic-int8"))
    reference = load_engine(Settings(model="tiny-random-itm"))  # its own: changed below, no caches shared
    model = reference.matcher.model
    linears = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]
    for name in linears:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, torch_from_float(model.get_submodule(name)))
    for module in model.modules():
        if type(module) is torch.nn.Embedding:  # tables of a dynamic-int8 component are kept in bf16
            module.to(torch.bfloat16).__class__ = quantization.Bf16Embedding
    # One image at a time, as the app encodes images at dynamic-int8 (its activation scales are
    # per batch: see the test below).
    expected = torch.cat([reference.itc([image], texts) for image in images])
    torch.testing.assert_close(quantized.itc(images, texts), expected, rtol=0, atol=1e-5)
    assert linears and not torch.equal(expected, load_tiny("tiny-random-itm").itc(images, texts))


def test_the_model_report_reads_sizes_without_unpacking_a_layer(monkeypatch):
    """`layer.weight()` unpacks fbgemm's packed weight: the Model tab did it for every layer on
    every visit (70 s at real size). Sizes now come from the layer's shape."""
    loaded = load_engine(
        Settings(model="tiny-random", precision="dynamic-int8", retrieval_model="none")
    ).text.loaded
    layers = [m for m in loaded.model.modules() if quantization.is_dynamic_int8(m)]
    expected = [
        (layer.weight().numel() + (layer.bias().numel() if layer.bias() is not None else 0), layer)
        for layer in layers
    ]

    def unpacks(self):
        raise AssertionError("unpacked a layer")

    monkeypatch.setattr(quantization.DynamicLinear, "weight", unpacks)
    assert loaded.report()["components"]["llm"]["parameters"] > 0
    for numel, layer in expected:
        assert quantization.packed_parameters(layer) == numel


def test_at_dynamic_int8_an_images_tokens_do_not_depend_on_the_images_beside_it(images):
    """fbgemm quantizes activations with one scale for the whole batch, so the vision encoder and
    Q-Former run one image at a time at dynamic-int8: an image's cached image tokens (and so its
    greedy caption) are the same whichever images it came with."""
    engine = load_engine(Settings(model="tiny-random", precision="dynamic-int8", retrieval_model="none"))
    backend = engine.text
    prepared = engine.prepare(images)
    alone = backend._language_inputs(prepared[:1], [""])
    engine.cache.clear()
    together = backend._language_inputs(prepared, [""] * len(prepared))
    assert torch.equal(together[0], alone[0])
    engine.cache.clear()
    batched_vision = engine.vision.vision_embeds(backend.loaded, prepared)
    engine.cache.clear()
    assert torch.equal(engine.vision.vision_embeds(backend.loaded, prepared[:1])[0], batched_vision[0])


def test_at_dynamic_int8_retrieval_features_of_an_image_do_not_depend_on_its_gallery(images):
    engine = load_engine(Settings(model="tiny-random-itm", precision="dynamic-int8"))
    together = engine.image_features(images)
    engine.cache.clear()
    alone = engine.image_features(images[2:3])
    assert torch.equal(alone.projections[0], together.projections[2])
