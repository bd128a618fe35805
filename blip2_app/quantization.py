"""Int8 on CPU: the one module that touches torch's quantized ops (torch.ao, fbgemm, and the
weight-only int8 kernel `aten._weight_int8pack_mm`).

torch 2.13 says `quantize_per_channel` and qint8 tensors are deprecated and will be removed; when
that happens, `check_quantized_ops` raises at start-up (and in CI) instead of the app silently
running fp32. Measured alternatives are slower per token here today (issue 20): fbgemm stays for
the server; the weight-only layers (`WeightOnlyInt8Linear`, decision 0009) serve one-shot CLI runs,
which cannot afford fbgemm's packing at start.

A layer is int8 weights per output channel (symmetric, the observer of torch's
`per_channel_dynamic_qconfig`), activations quantized per call. `quantize_weight` and
`packed_linear` are the two steps of torch's `Linear.from_float`, without its placeholder: the
module it builds first packs a zero weight of full size (a second prepack per layer, the largest
cost of loading OPT-2.7B).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeGuard

import torch
import transformers

from .errors import ModelLoadError

DynamicLinear = torch.ao.nn.quantized.dynamic.Linear
QCONFIG = torch.ao.quantization.per_channel_dynamic_qconfig
ENGINES = ("x86", "fbgemm")  # the int8 kernels for x86 CPUs, in torch's order of preference


class QuantizedOpsUnavailableError(ModelLoadError):
    """torch's quantized ops are missing or wrong: dynamic-int8 cannot run on this torch build."""


# --int8-kernels: which of torch's two int8 libraries packs and multiplies the dynamic-int8 layers.
# fbgemm by default; oneDNN (AMX on this machine) is faster at many rows and slower at one row and
# at packing (decision 0010).
INT8_KERNELS = ("fbgemm", "onednn")


def supported_engines() -> list[str]:
    return list(torch.backends.quantized.supported_engines)


def use_int8_kernels(kernels: str = "fbgemm") -> str:
    """Make `kernels`' library the one that packs dynamic-int8 layers from now on (torch keeps one
    quantized engine per process; a packed layer keeps the library that packed it). Returns it."""
    if kernels not in INT8_KERNELS:
        raise ValueError(f"int8 kernels must be one of {', '.join(INT8_KERNELS)}; got {kernels!r}.")
    supported = supported_engines()
    engine = "onednn" if kernels == "onednn" else next((e for e in ENGINES if e in supported), None)
    if engine is None or engine not in supported:
        raise QuantizedOpsUnavailableError(
            f"This PyTorch build ({torch.__version__}) has no {kernels} int8 kernels "
            f"(quantized engines: {supported}); choose the other --int8-kernels."
        )
    torch.backends.quantized.engine = engine
    return kernels


def active_int8_kernels() -> str:
    """The library that packs dynamic-int8 layers now ("x86" is torch's name for fbgemm's linear)."""
    return "onednn" if torch.backends.quantized.engine == "onednn" else "fbgemm"


def check_quantized_ops() -> None:
    """Quantize one small layer and compare it with fp32; raise rather than fall back silently."""
    if not set(ENGINES) & set(supported_engines()):
        raise QuantizedOpsUnavailableError(
            f"This PyTorch build ({torch.__version__}) has no x86 int8 kernels "
            f"(quantized engines: {supported_engines()}): dynamic-int8 cannot run; "
            "choose --precision fp32 or bf16, or a PyTorch version that still ships torch.ao."
        )
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=generator) * 0.1)
    inputs = torch.randn(4, 64, generator=generator)
    try:
        quantized = dynamic_int8(layer)
        error = (quantized(inputs) - layer(inputs)).abs().max().item()
    except (RuntimeError, AttributeError, NotImplementedError) as failure:
        raise QuantizedOpsUnavailableError(
            f"torch {torch.__version__}: its dynamic int8 Linear no longer works ({failure})."
        ) from failure
    if not error < 0.05:  # int8 rounding of this layer is ~0.01; nan fails too
        raise QuantizedOpsUnavailableError(
            f"torch {torch.__version__}: its dynamic int8 Linear is off by {error:.3g} from fp32."
        )


def check_weight_only_ops() -> None:
    """Quantize one small layer to a weight-only int8 layer and compare it with fp32, through both
    of its paths (torch's kernel for a few rows, dequantizing for many); raise rather than fall
    back silently when torch's weight-only int8 kernel is gone or wrong."""
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=generator) * 0.1)
    error = 0.0
    try:
        quantized = weight_only_int8(layer)
        for rows in (1, KERNEL_MAX_ROWS + 1):
            inputs = torch.randn(rows, 64, generator=generator)
            with torch.no_grad():
                error = max(error, (quantized(inputs) - layer(inputs)).abs().max().item())
    except (RuntimeError, AttributeError, NotImplementedError) as failure:
        raise QuantizedOpsUnavailableError(
            f"torch {torch.__version__}: its weight-only int8 kernel (aten._weight_int8pack_mm) no "
            f"longer works ({failure}); choose --precision dynamic-int8, fp32 or bf16."
        ) from failure
    if not error < 0.05:  # int8 and bf16 rounding of this layer is ~0.01; nan fails too
        raise QuantizedOpsUnavailableError(
            f"torch {torch.__version__}: its weight-only int8 kernel is off by {error:.3g} from fp32; "
            "choose --precision dynamic-int8, fp32 or bf16."
        )


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """fp32 [out, in] -> qint8 per output channel, the same values as torch's `from_float`."""
    observer = QCONFIG.weight()
    low, high = torch.aminmax(weight, dim=1)
    scales, zero_points = observer._calculate_qparams(low, high)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "deprecated": check_quantized_ops tells when it is gone
        return torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)


def per_channel_tensor(rows: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    """Stored int8 rows and their per-row scale and zero point -> a qint8 tensor (no arithmetic)."""
    return torch._make_per_channel_quantized_tensor(rows, scales.double(), zero_points.long(), 0)


class PackedLinear(DynamicLinear):
    """torch's dynamic int8 Linear, knowing its bias size without unpacking its weights."""

    bias_numel: int = 0


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    """A dynamic int8 Linear around a qint8 weight, packed for fbgemm once."""
    # Built 1 x 1, then given the weight: built at full size, it would pack a zero placeholder too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's "migrate to torchao" notice
        linear = PackedLinear(1, 1, bias_=bias is not None, dtype=torch.qint8)
        linear.set_weight_bias(weight, None if bias is None else bias.detach().float())
    linear.out_features, linear.in_features = weight.shape
    linear.bias_numel = 0 if bias is None else bias.numel()  # known here without unpacking
    return linear


def dynamic_int8(linear: torch.nn.Linear) -> PackedLinear:
    """An fp32/bf16 nn.Linear -> its dynamic int8 twin."""
    return packed_linear(quantize_weight(linear.weight.detach().float()), linear.bias)


def quantize_linears(module: torch.nn.Module, weight_only: bool = False) -> None:
    """Every plain nn.Linear under `module` becomes dynamic int8 (or weight-only int8), in place."""
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear:
            setattr(module, name, weight_only_int8(child) if weight_only else dynamic_int8(child))
        else:
            quantize_linears(child, weight_only)


def is_dynamic_int8(module: torch.nn.Module) -> TypeGuard[PackedLinear]:
    """Every dynamic int8 layer of the app is built by `packed_linear`."""
    return isinstance(module, PackedLinear)


def int8_parts_of(weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A qint8 weight (and bias) as storable tensors: int8 rows, scales, zero points, bias."""
    parts = {
        "rows": weight.int_repr(),
        "scales": weight.q_per_channel_scales().float(),
        "zero_points": weight.q_per_channel_zero_points().to(torch.int8),
    }
    if bias is not None:
        parts["bias"] = bias.detach().float()
    return parts


def int8_parts(layer: DynamicLinear) -> dict[str, torch.Tensor]:
    """What a packed layer is made of, unpacked once (`weight()` and `bias()` unpack each)."""
    weight, bias = layer._weight_bias()
    return int8_parts_of(weight, bias)


def from_int8_parts(parts: dict[str, torch.Tensor]) -> PackedLinear:
    weight = per_channel_tensor(parts["rows"], parts["scales"], parts["zero_points"])
    return packed_linear(weight, parts.get("bias"))


def packed_from_weight_only(layer: WeightOnlyInt8Linear) -> PackedLinear:
    """The dynamic-int8 (packed) layer of the same int8 rows and scales (packing.py)."""
    return from_int8_parts(layer_int8_parts(layer))


# --------------------------------------------------------------------------- weight-only int8
# torch's weight-only kernel is fast for a few rows (decoding: one row per sequence) and slow for
# many (a ViT-g layer at 257 rows: 1.4x dequantizing and multiplying in bf16, measured in decision
# 0009); above this many rows the layer dequantizes instead.
KERNEL_MAX_ROWS = 64
# torch 2.13's CPU kernel crashes or returns garbage (nan) unless in_features is a multiple of 16
# (measured: 16, 32, ... 272 right; 4, 8, 12, 24, 36, 40, 50, 60 wrong); other layers dequantize.
KERNEL_IN_FEATURES_MULTIPLE = 16
# ... and crashes on int8 rows that do not start at a multiple of 16 bytes (4 rows or more); the
# weight cache aligns what it stores to 64 (weight_cache.ALIGNMENT), as torch's allocator does.
KERNEL_ALIGNMENT = 64


class WeightOnlyInt8Linear(torch.nn.Module):
    """A Linear layer of int8 weights with one fp32 scale per output channel (the rows and scales
    of `quantize_weight`, so of the dynamic-int8 layers too), used as they are: nothing is packed,
    so rows read from the weight cache stay memory-mapped. Activations are not quantized: each
    call multiplies bf16 inputs by the exact int8 rows (fp32 accumulation), scales each output
    channel (torch's kernel: by the scale rounded to bf16, in its bf16 result; dequantizing: in
    fp32) and returns fp32; everything around the layer stays fp32. Few operations per call: at
    one row each is a noticeable share of the layer's time."""

    rows: torch.Tensor  # buffers, declared so the type checker knows them
    scales: torch.Tensor
    kernel_scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, rows: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = rows.shape
        self.register_buffer("rows", rows)
        self.register_buffer("scales", scales.float())
        self.register_buffer("kernel_scales", scales.to(torch.bfloat16))  # the kernel takes its input's dtype
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.bias_numel = 0 if bias is None else bias.numel()
        self.uses_kernel = (
            self.in_features % KERNEL_IN_FEATURES_MULTIPLE == 0
            and rows.is_contiguous()
            and rows.data_ptr() % KERNEL_ALIGNMENT == 0
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        flat = inputs.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        # The kernel has no gradient: inputs that need one (Grad-CAM) take the dequantizing path.
        if (
            self.uses_kernel
            and flat.shape[0] <= KERNEL_MAX_ROWS
            and not flat.requires_grad
            and flat.data_ptr() % KERNEL_ALIGNMENT == 0
        ):
            product = torch.ops.aten._weight_int8pack_mm(flat, self.rows, self.kernel_scales)
        else:  # int8 values are exact in bf16
            product = torch.nn.functional.linear(flat, self.rows.to(torch.bfloat16)).float() * self.scales
        # One operation to fp32, with the bias when there is one.
        out = product.float() if self.bias is None else torch.add(self.bias, product)
        return out.view(*inputs.shape[:-1], self.out_features)

    def weight(self) -> torch.Tensor:
        """The dequantized fp32 weight; a method, as on torch's dynamic int8 Linear, so that code
        asking a layer for its input dtype (`engine.input_dtype`) treats both kinds alike."""
        return self.rows.float() * self.scales.unsqueeze(1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def weight_only_from_parts(parts: dict[str, torch.Tensor]) -> WeightOnlyInt8Linear:
    """Stored int8 parts (the weight cache's, those of `int8_parts_of`) as a weight-only layer,
    without copying the rows. The quantizer is symmetric: a zero point other than 0 is not ours."""
    if parts["zero_points"].any():
        raise ValueError("int8 rows with non-zero zero points (not symmetric)")
    return WeightOnlyInt8Linear(parts["rows"], parts["scales"], parts.get("bias"))


def weight_only_with_parts(linear: torch.nn.Linear) -> tuple[WeightOnlyInt8Linear, dict[str, torch.Tensor]]:
    """A weight-only int8 layer and its int8 parts (for the weight cache): the rows and scales
    dynamic-int8 packs."""
    parts = int8_parts_of(quantize_weight(linear.weight.detach().float()), linear.bias)
    return weight_only_from_parts(parts), parts


def weight_only_int8(linear: torch.nn.Linear) -> WeightOnlyInt8Linear:
    return weight_only_with_parts(linear)[0]


Int8Linear = PackedLinear | WeightOnlyInt8Linear


def is_int8_linear(module: torch.nn.Module) -> TypeGuard[Int8Linear]:
    """A dynamic int8 (packed) or weight-only int8 layer: both are int8 rows and scales."""
    return isinstance(module, (PackedLinear, WeightOnlyInt8Linear))


def layer_int8_parts(layer: Int8Linear) -> dict[str, torch.Tensor]:
    """`int8_parts` of either kind of int8 layer (for the weight cache)."""
    if isinstance(layer, WeightOnlyInt8Linear):
        parts = {
            "rows": layer.rows,
            "scales": layer.scales,
            "zero_points": torch.zeros(layer.out_features, dtype=torch.int8),
        }
        if layer.bias is not None:
            parts["bias"] = layer.bias
        return parts
    return int8_parts(layer)


def packed_bytes(layer: Int8Linear) -> int:
    """int8 weights, their per-row scale and zero point (packed: fp64 and int32; weight-only: an
    fp32 scale and a bf16 one), an fp32 bias: read off the layer's shape, since `layer.weight()`
    unpacks a packed layer (reporting OPT-2.7B that way took 70 s)."""
    per_row = 6 if isinstance(layer, WeightOnlyInt8Linear) else 12
    return layer.in_features * layer.out_features + per_row * layer.out_features + 4 * layer.bias_numel


def packed_parameters(layer: Int8Linear) -> int:
    return layer.in_features * layer.out_features + layer.bias_numel


class Int8Embedding(torch.nn.Module):
    """An embedding table read from int8 rows with one scale each: the LM head's quantized weight,
    when the two are tied (OPT), so the table costs 1 byte per value instead of 2 (bf16) or 4."""

    rows: torch.Tensor  # buffers, declared so the type checker knows them
    scales: torch.Tensor

    def __init__(self, rows: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("rows", rows)
        self.register_buffer("scales", scales)
        self.num_embeddings, self.embedding_dim = rows.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        values = self.rows.index_select(0, flat).float() * self.scales.index_select(0, flat).unsqueeze(1)
        return values.view(*input_ids.shape, self.embedding_dim)


class Bf16Embedding(torch.nn.Embedding):
    """An embedding table kept in bf16 (half the memory) whose output is fp32, for components
    whose Linear layers are dynamic-int8 and so compute in fp32."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids).float()


TIED_HEAD_CHUNK_ROWS = 4096  # rows quantized at a time: no fp32 copy of a 50k x 2560 table
RowReader = Callable[[int, int], torch.Tensor]  # (start, end) -> those rows of a table, in fp32


def quantize_tied_head(
    language_model: transformers.PreTrainedModel,
    read_rows: RowReader | None = None,
    weight_only: bool = False,
) -> bool:
    """An LM head tied to the embedding table becomes dynamic-int8, quantized a block of rows at a
    time, and the table then reads the same int8 rows: the fp32 copy torch's `from_float` would
    make (515 MB on OPT-2.7B) never exists, and the table costs 1 byte per value. `read_rows`
    reads the table straight from the checkpoint when it was left unloaded (no bf16 copy either:
    without it, that copy was the peak of the whole load). With `weight_only` the head is a
    weight-only int8 layer over the same rows. Returns whether the head was tied."""
    head, table = language_model.get_output_embeddings(), language_model.get_input_embeddings()
    if not (
        type(head) is torch.nn.Linear
        and isinstance(table, torch.nn.Embedding)
        and head.weight is table.weight
    ):
        return False
    if read_rows is None:
        read_rows = lambda start, end: head.weight[start:end].detach().float()
    shape = head.weight.shape
    rows = torch.empty(shape, dtype=torch.int8)
    scales = torch.empty(shape[0], dtype=torch.float64)
    zero_points = torch.empty(shape[0], dtype=torch.long)
    # Scales are per row, so a block of rows at a time gives the same values as the whole table.
    for start in range(0, shape[0], TIED_HEAD_CHUNK_ROWS):
        chunk = quantize_weight(read_rows(start, start + TIED_HEAD_CHUNK_ROWS))
        end = start + chunk.shape[0]
        rows[start:end] = chunk.int_repr()
        scales[start:end], zero_points[start:end] = (
            chunk.q_per_channel_scales(),
            chunk.q_per_channel_zero_points(),
        )
    bias = None if head.bias is None else head.bias.detach().float()
    del head.weight, table.weight  # the bf16 table, when it was loaded: freed before packing
    linear: torch.nn.Module
    if weight_only:
        linear = WeightOnlyInt8Linear(rows, scales.float(), bias)
    else:
        linear = packed_linear(per_channel_tensor(rows, scales, zero_points), bias)
    language_model.set_output_embeddings(linear)
    language_model.set_input_embeddings(Int8Embedding(rows, scales.float()))
    return True
