"""Dynamic int8 on CPU: the one module that touches torch's quantized ops (torch.ao, fbgemm).

torch 2.13 says `quantize_per_channel` and qint8 tensors are deprecated and will be removed; when
that happens, `check_quantized_ops` raises at start-up (and in CI) instead of the app silently
running fp32. Measured alternatives are slower here today (issue 20): fbgemm stays.

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


def check_quantized_ops() -> None:
    """Quantize one small layer and compare it with fp32; raise rather than fall back silently."""
    if not set(ENGINES) & set(torch.backends.quantized.supported_engines):
        raise QuantizedOpsUnavailableError(
            f"This PyTorch build ({torch.__version__}) has no x86 int8 kernels "
            f"(quantized engines: {torch.backends.quantized.supported_engines}): dynamic-int8 cannot run; "
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


def quantize_linears(module: torch.nn.Module) -> None:
    """Every plain nn.Linear under `module` becomes dynamic int8, in place."""
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear:
            setattr(module, name, dynamic_int8(child))
        else:
            quantize_linears(child)


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


def quantize_with_parts(linear: torch.nn.Linear) -> tuple[PackedLinear, dict[str, torch.Tensor]]:
    """`dynamic_int8`, and the int8 parts taken before packing (no unpacking to store them)."""
    weight = quantize_weight(linear.weight.detach().float())
    return packed_linear(weight, linear.bias), int8_parts_of(weight, linear.bias)


def from_int8_parts(parts: dict[str, torch.Tensor]) -> PackedLinear:
    weight = per_channel_tensor(parts["rows"], parts["scales"], parts["zero_points"])
    return packed_linear(weight, parts.get("bias"))


def packed_bytes(layer: PackedLinear) -> int:
    """int8 weights, a scale (fp64) and zero point (int32) per row, an fp32 bias: read off the
    layer's shape, since `layer.weight()` unpacks it (reporting OPT-2.7B that way took 70 s)."""
    return layer.in_features * layer.out_features + 12 * layer.out_features + 4 * layer.bias_numel


def packed_parameters(layer: PackedLinear) -> int:
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
    language_model: transformers.PreTrainedModel, read_rows: RowReader | None = None
) -> bool:
    """An LM head tied to the embedding table becomes dynamic-int8, quantized a block of rows at a
    time, and the table then reads the same int8 rows: the fp32 copy torch's `from_float` would
    make (515 MB on OPT-2.7B) never exists, and the table costs 1 byte per value. `read_rows`
    reads the table straight from the checkpoint when it was left unloaded (no bf16 copy either:
    without it, that copy was the peak of the whole load). Returns whether the head was tied."""
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
    linear = packed_linear(per_channel_tensor(rows, scales, zero_points), bias)
    language_model.set_output_embeddings(linear)
    language_model.set_input_embeddings(Int8Embedding(rows, scales.float()))
    return True
