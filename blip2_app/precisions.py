"""Precision names, the three BLIP-2 components and the `--precision` presets.

Plain data with no torch import, so `config.py` can validate flags (and the loading page can
answer) before torch is imported; `loading.py` maps these names onto dtypes and kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelLoadError

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4", "dynamic-int8", "int8-weight-only")
QUANTIZED = ("int8", "nf4")  # bitsandbytes, applied by transformers while loading
DYNAMIC_INT8 = "dynamic-int8"  # torch's dynamic int8 Linear (fbgemm, CPU), applied by stream_load
# The same int8 rows and scales as dynamic-int8, multiplied as they are (no fbgemm packing) and
# with activations not quantized: for one-shot CLI runs (decision 0009), CPU only.
INT8_WEIGHT_ONLY = "int8-weight-only"
INT8_LINEAR_PRECISIONS = frozenset({DYNAMIC_INT8, INT8_WEIGHT_ONLY})  # int8 rows per channel, fp32 around
COMPONENTS = ("vision", "qformer", "llm")
# Precisions whose batched rows depend on their batch-mates. fbgemm's dynamic int8 quantizes the
# activations with one scale per tensor, the whole batch's (on the tiny model 3 of 8 greedy
# captions changed in a batch of 8); bitsandbytes' int8 picks its fp16 outlier columns over the
# whole batch. int8-weight-only picks its kernel by the number of rows in a call.
BATCH_DEPENDENT_PRECISIONS = frozenset({DYNAMIC_INT8, INT8_WEIGHT_ONLY, "int8"})
# Top-level module names of each component, for every BLIP-2 / InstructBLIP / ITM class.
COMPONENT_MODULES: dict[str, tuple[str, ...]] = {
    "vision": ("vision_model",),
    "qformer": (
        "qformer",
        "query_tokens",
        "language_projection",
        "embeddings",
        "vision_projection",
        "text_projection",
        "itm_head",
    ),
    "llm": ("language_model",),
}


@dataclass(frozen=True)
class ComponentPrecisions:
    vision: str
    qformer: str
    llm: str

    def __post_init__(self) -> None:
        for component in COMPONENTS:
            value = getattr(self, component)
            if value not in PRECISIONS:
                raise ModelLoadError(
                    f"Unknown precision {value!r} for the {component} component; choose from "
                    f"{', '.join(PRECISIONS)}."
                )
        quantized = {getattr(self, c) for c in COMPONENTS} & set(QUANTIZED)
        if len(quantized) > 1:
            raise ModelLoadError(
                "bitsandbytes loads one quantization mode per model: use int8 or nf4 for the "
                f"quantized components, not both ({', '.join(sorted(quantized))})."
            )

    def as_dict(self) -> dict[str, str]:
        return {c: getattr(self, c) for c in COMPONENTS}


# `--precision` presets. The Q-Former stays fp32 (it is small and BLIP-2 keeps it in fp32);
# int8/nf4 quantize only the language model, which holds most of the weights.
PRESETS: dict[str, ComponentPrecisions] = {
    "fp32": ComponentPrecisions("fp32", "fp32", "fp32"),
    "bf16": ComponentPrecisions("bf16", "fp32", "bf16"),
    "fp16": ComponentPrecisions("fp16", "fp32", "fp16"),
    "int8": ComponentPrecisions("bf16", "fp32", "int8"),
    "nf4": ComponentPrecisions("bf16", "fp32", "nf4"),
    # CPU: int8 weights per output channel, activations quantized on the fly (fbgemm VNNI kernels).
    # The fastest CPU path measured (benchmarks/results/real_size.md) and the smallest in memory.
    "dynamic-int8": ComponentPrecisions(DYNAMIC_INT8, DYNAMIC_INT8, DYNAMIC_INT8),
    # CPU, one-shot: dynamic-int8's weights read from the weight cache without packing them.
    "int8-weight-only": ComponentPrecisions(INT8_WEIGHT_ONLY, INT8_WEIGHT_ONLY, INT8_WEIGHT_ONLY),
}


def cache_key_precisions(precisions: ComponentPrecisions) -> dict[str, str]:
    """The precisions a weight cache entry is keyed by: int8-weight-only stores what dynamic-int8
    stores (the same int8 rows and scales), so the two share one entry."""
    return {c: DYNAMIC_INT8 if p == INT8_WEIGHT_ONLY else p for c, p in precisions.as_dict().items()}


def as_loaded(precisions: ComponentPrecisions) -> ComponentPrecisions:
    """The precisions the loader reads at: a dynamic-int8 component is read as int8-weight-only
    (the same rows and scales, usable before packing) and packed afterwards (packing.py)."""
    return ComponentPrecisions(
        **{c: INT8_WEIGHT_ONLY if p == DYNAMIC_INT8 else p for c, p in precisions.as_dict().items()}
    )
