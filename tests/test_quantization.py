"""blip2_app/quantization.py: our dynamic int8 equals torch's own, and a broken torch fails loudly."""

import warnings

import pytest
import torch

from blip2_app import quantization
from blip2_app.config import INT8_KERNELS_CHOICES, Settings
from blip2_app.errors import SettingsError
from blip2_app.startup import load_engine
from blip2_app.ui.report import model_report_markdown
from tests.conftest import GENERATING_MODELS


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


# --------------------------------------------------------------------------- int8-weight-only
def bf16_reference(layer: quantization.WeightOnlyInt8Linear, inputs: torch.Tensor, kernel: bool):
    """What the layer computes, in fp32 from the stored parts: bf16-rounded inputs times the exact
    int8 rows, each output channel scaled (by the bf16-rounded scale on the kernel's path), and
    the bias; returned without and with the bias."""
    scales = layer.kernel_scales.float() if kernel else layer.scales
    product = inputs.bfloat16().float() @ layer.rows.float().T * scales
    return product, product if layer.bias is None else product + layer.bias


@pytest.mark.parametrize("in_features", [48, 40])  # 40: not a multiple of 16, never the kernel
@pytest.mark.parametrize("rows", [1, 3, quantization.KERNEL_MAX_ROWS + 5])  # + 5: dequantizing
@pytest.mark.parametrize("bias", [True, False])
def test_the_weight_only_layer_equals_its_int8_rows_times_scales(in_features, rows, bias):
    torch.manual_seed(2)
    linear = torch.nn.Linear(in_features, 40, bias=bias)
    layer = quantization.weight_only_int8(linear)
    assert layer.uses_kernel == (in_features % 16 == 0)
    inputs = torch.randn(2, rows, in_features)  # a batch of sequences, as the models call it
    with torch.no_grad():
        out = layer(inputs)
    assert out.shape == (2, rows, 40) and out.dtype == torch.float32
    kernel = layer.uses_kernel and 2 * rows <= quantization.KERNEL_MAX_ROWS  # 2 sequences
    product, reference = bf16_reference(layer, inputs, kernel)
    # The only rounding left is the bf16 product's (8 significant bits): 2^-9 of it at most.
    torch.testing.assert_close(out, reference, rtol=0, atol=product.abs().max().item() * 2**-8)
    # Against the int8 weight in fp32 with unrounded inputs: the inputs' bf16 rounding on top.
    dequantized = inputs @ (layer.rows.float() * layer.scales[:, None]).T + (linear.bias if bias else 0)
    torch.testing.assert_close(out, dequantized, rtol=0, atol=dequantized.abs().max().item() * 1e-2)


def test_weight_only_holds_the_int8_rows_and_scales_of_dynamic_int8():
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 32)
    packed, weight_only = quantization.dynamic_int8(linear).weight(), quantization.weight_only_int8(linear)
    assert torch.equal(weight_only.rows, packed.int_repr())
    assert torch.equal(weight_only.scales, packed.q_per_channel_scales().float())
    assert not packed.q_per_channel_zero_points().any()  # symmetric: what the weight-only math assumes


def test_weight_only_inputs_that_need_a_gradient_get_one():
    """Grad-CAM (explain.py) differentiates through the Q-Former: the kernel has no gradient, so
    such inputs take the dequantizing path."""
    layer = quantization.weight_only_int8(torch.nn.Linear(64, 32))
    inputs = torch.randn(1, 64, requires_grad=True)
    layer(inputs).sum().backward()
    assert inputs.grad is not None and inputs.grad.abs().sum() > 0


def test_the_weight_only_check_passes_on_this_torch():
    quantization.check_weight_only_ops()


def removed_kernel(*args, **kwargs):
    raise AttributeError("'_OpNamespace' 'aten' object has no attribute '_weight_int8pack_mm'")


def test_a_torch_without_the_weight_only_kernel_stops_the_load(monkeypatch):
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", removed_kernel)
    with pytest.raises(
        quantization.QuantizedOpsUnavailableError, match=r"_weight_int8pack_mm\) no longer works"
    ):
        load_engine(Settings(model="tiny-random", precision="int8-weight-only", retrieval_model="none"))


def test_a_wrong_weight_only_kernel_is_caught(monkeypatch):
    monkeypatch.setattr(
        torch.ops.aten, "_weight_int8pack_mm", lambda x, rows, scales: torch.zeros(x.shape[0], rows.shape[0])
    )
    with pytest.raises(quantization.QuantizedOpsUnavailableError, match="weight-only int8 kernel is off by"):
        quantization.check_weight_only_ops()


def image_tokens(engine, images) -> torch.Tensor:
    prepared = engine.prepare(images)
    return torch.cat([engine.text._language_inputs(prepared[i : i + 1], [""])[0] for i in range(len(images))])


@pytest.mark.parametrize("name", GENERATING_MODELS)
def test_int8_weight_only_is_closer_to_fp32_than_dynamic_int8(name, images):
    """The same int8 weights, activations not quantized: the image tokens the language model gets
    (vision encoder, Q-Former and projection, every Linear layer int8) are nearer fp32's. Measured
    on the tiny models: relative error 0.020-0.042 against dynamic-int8's 0.050-0.080 (ratio
    0.39-0.60); asserted with margin."""
    tokens = {
        precision: image_tokens(
            load_engine(
                Settings(model=name, precision=precision, retrieval_model="none", weight_cache="off")
            ),
            images,
        )
        for precision in ("fp32", "dynamic-int8", "int8-weight-only")
    }
    reference = tokens["fp32"]
    error = {p: ((t - reference).norm() / reference.norm()).item() for p, t in tokens.items() if p != "fp32"}
    assert 0 < error["int8-weight-only"] < 0.8 * error["dynamic-int8"], error


# --------------------------------------------------------------------------- --int8-kernels
SUPPORTED_ENGINES = set(torch.backends.quantized.supported_engines)
KERNELS_HERE = [
    kernels
    for kernels, engines in (("fbgemm", set(quantization.ENGINES)), ("onednn", {"onednn"}))
    if engines & SUPPORTED_ENGINES
]


@pytest.fixture
def keep_engine():
    """torch keeps one quantized engine per process: give the next test the one it had."""
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def test_an_unknown_library_is_refused():
    with pytest.raises(ValueError, match="int8 kernels must be one of fbgemm, onednn"):
        quantization.use_int8_kernels("mkl")


def test_the_settings_offer_the_choices_quantization_knows():
    assert INT8_KERNELS_CHOICES == quantization.INT8_KERNELS
    with pytest.raises(SettingsError, match="int8_kernels must be one of"):
        Settings(int8_kernels="mkl")
    assert Settings.from_sources([], env={}).int8_kernels == "fbgemm"
    assert Settings.from_sources(["--int8-kernels", "onednn"], env={}).int8_kernels == "onednn"
    assert Settings.from_sources([], env={"BLIP2_INT8_KERNELS": "onednn"}).int8_kernels == "onednn"


def test_a_library_this_torch_lacks_is_refused_with_a_sentence(monkeypatch, keep_engine):
    monkeypatch.setattr(quantization, "supported_engines", lambda: ["qnnpack", "none"])
    with pytest.raises(quantization.QuantizedOpsUnavailableError, match="has no onednn int8 kernels"):
        quantization.use_int8_kernels("onednn")


@pytest.mark.parametrize("kernels", KERNELS_HERE)
def test_each_library_packs_the_same_int8_weights(kernels, keep_engine):
    """A packed layer unpacks to the int8 rows `quantize_weight` made (so the weight cache, which
    stores rows before packing, serves both), and the two libraries' products agree."""
    torch.manual_seed(0)
    layer, inputs = torch.nn.Linear(256, 128), torch.randn(9, 256)
    assert quantization.use_int8_kernels(kernels) == kernels == quantization.active_int8_kernels()
    packed = quantization.dynamic_int8(layer)
    assert torch.equal(
        quantization.int8_parts(packed)["rows"],
        quantization.quantize_weight(layer.weight.detach()).int_repr(),
    )
    quantization.check_quantized_ops()
    quantization.use_int8_kernels(KERNELS_HERE[0])
    other = quantization.dynamic_int8(layer)
    torch.testing.assert_close(packed(inputs), other(inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernels", KERNELS_HERE)
def test_the_model_tab_says_which_library_runs_dynamic_int8(kernels, keep_engine):
    engine = load_engine(
        Settings(model="tiny-random", precision="dynamic-int8", retrieval_model="none", int8_kernels=kernels)
    )
    report = engine.text.loaded.report()
    assert report["int8_kernels"] == kernels
    shown = {"onednn": "oneDNN", "fbgemm": "fbgemm"}[kernels]
    assert f"| int8 kernels (dynamic-int8) | {shown} |" in model_report_markdown(
        engine.info(), engine, Settings()
    )
    fp32 = load_engine(Settings(model="tiny-random", precision="fp32", retrieval_model="none"))
    assert fp32.text.loaded.report()["int8_kernels"] == ""
