"""Checkpoint -> model + processor, with a precision per component, on the chosen device.

BLIP-2 has three components: the vision encoder (ViT-g, ~1B parameters), the Q-Former bridge
(~100M, with its query tokens and projections) and the language model (2.7B-13B). Each gets its
own precision: fp32, bf16, fp16, int8 or nf4 (bitsandbytes; 0.50 runs both on CPU too).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from .errors import ModelLoadError
from .registry import TINY_PREFIX, ModelEntry, unreachable_checkpoint_message

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4")
QUANTIZED = ("int8", "nf4")
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPONENTS = ("vision", "qformer", "llm")
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
}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine.")
    return torch.device(requested)


def resolve_precisions(
    preset: str,
    entry: ModelEntry,
    device: torch.device,
    overrides: dict[str, str | None] | None = None,
) -> tuple[ComponentPrecisions, list[str]]:
    """Preset (or the entry's default for "auto") + per-component overrides, made safe for `device`.

    Returns the precisions and notes on anything that was changed (e.g. fp16 on CPU -> bf16).
    """
    name = entry.precision if preset == "auto" else preset
    if name == "auto":
        name = "fp16" if device.type == "cuda" else "bf16"
    if name not in PRESETS:
        raise ModelLoadError(f"Unknown precision preset {name!r}; choose from auto, {', '.join(PRESETS)}.")
    chosen = PRESETS[name].as_dict()
    chosen.update({k: v for k, v in (overrides or {}).items() if v})
    notes = []
    if device.type == "cpu":
        for component, value in chosen.items():
            if value == "fp16":
                # Half precision kernels are missing or very slow on CPU (LAVIS#162, #556).
                chosen[component] = "bf16"
                notes.append(f"fp16 is not supported on CPU: the {component} component runs in bf16 instead.")
    return ComponentPrecisions(**chosen), notes


@dataclass
class LoadedModel:
    """A model ready for inference, and the truth about how it was loaded."""

    entry: ModelEntry
    model: Any
    processor: Any
    device: torch.device
    precisions: ComponentPrecisions
    notes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    checkpoint_path: str = ""

    def component_dtype(self, component: str) -> torch.dtype:
        """The floating dtype computations in `component` run in (activations' dtype)."""
        precision = getattr(self.precisions, component)
        if precision in QUANTIZED:
            return torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return FLOAT_DTYPES[precision]

    def report(self) -> dict[str, Any]:
        """What each component really got, read off the loaded modules."""
        components = {}
        for component, names in COMPONENT_MODULES.items():
            modules = [getattr(self.model, n) for n in names if hasattr(self.model, n)]
            if not modules:
                continue
            params = [p for m in modules for p in (m.parameters() if isinstance(m, torch.nn.Module) else [m])]
            linear_types = Counter(
                type(sub).__name__
                for m in modules
                if isinstance(m, torch.nn.Module)
                for sub in m.modules()
                if isinstance(sub, torch.nn.Linear)
            )
            dtypes = Counter(str(p.dtype).replace("torch.", "") for p in params)
            components[component] = {
                "requested": getattr(self.precisions, component),
                "parameters": sum(p.numel() for p in params),
                "bytes": sum(p.numel() * p.element_size() for p in params),
                "dtypes": dict(dtypes),
                "linear_layers": dict(linear_types),
            }
        return {
            "name": self.entry.name,
            "checkpoint": self.entry.checkpoint,
            "family": self.entry.family.name,
            "device": str(self.device),
            "load_seconds": round(self.load_seconds, 2),
            "memory_bytes": int(self.model.get_memory_footprint()),
            "components": components,
            "notes": list(self.notes),
        }


def checkpoint_location(entry: ModelEntry) -> str:
    """Local folder or hub id to pass to `from_pretrained`; tiny checkpoints are built on demand."""
    if entry.checkpoint.startswith(TINY_PREFIX):
        from .testing import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint(entry.checkpoint[len(TINY_PREFIX) :]))
    return entry.checkpoint


def _quantization_config(precisions: ComponentPrecisions, model_class: type) -> Any | None:
    quantized = [c for c in COMPONENTS if getattr(precisions, c) in QUANTIZED]
    if not quantized:
        return None
    # Everything that is not asked to be quantized is listed as skipped, so e.g. `--precision int8`
    # gives Linear8bitLt layers in the language model only.
    skip = [name for c in COMPONENTS if c not in quantized for name in COMPONENT_MODULES[c]]
    skip.append("lm_head")  # the output projection stays in floating point, as transformers does
    mode = getattr(precisions, quantized[0])
    if mode == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=skip,
    )


def _load_dtype(precisions: ComponentPrecisions) -> torch.dtype:
    """The dtype weights are read in: the widest float asked for, so no component loses precision
    by a round trip (narrower components are cast down after loading)."""
    floats = [FLOAT_DTYPES[p] for p in precisions.as_dict().values() if p in FLOAT_DTYPES]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if dtype in floats:
            return dtype
    return torch.bfloat16


def load_model(entry: ModelEntry, precisions: ComponentPrecisions, device: torch.device) -> LoadedModel:
    """Load `entry` with one precision per component; errors become one clear ModelLoadError."""
    started = time.perf_counter()
    model_class = getattr(transformers, entry.family.architecture)
    processor_class = getattr(transformers, entry.family.processor)
    location = checkpoint_location(entry)
    quantization = _quantization_config(precisions, model_class)
    kwargs: dict[str, Any] = {"dtype": _load_dtype(precisions)}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": str(device)})
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
            processor = processor_class.from_pretrained(location)
            model = model_class.from_pretrained(location, **kwargs)
    except OSError as error:
        raise ModelLoadError(unreachable_checkpoint_message(entry.checkpoint, error)) from error
    except torch.OutOfMemoryError as error:
        raise ModelLoadError(
            f"Not enough memory to load {entry.name} with precisions {precisions.as_dict()}: "
            "try --precision int8 or nf4, or a smaller model."
        ) from error
    except ImportError as error:
        raise ModelLoadError(f"Loading {entry.name} needs a package that is missing: {error}") from error

    for component in COMPONENTS:
        dtype = FLOAT_DTYPES.get(getattr(precisions, component))
        if dtype is None:
            continue
        for name in COMPONENT_MODULES[component]:
            part = getattr(model, name, None)
            if isinstance(part, torch.nn.Parameter):
                part.data = part.data.to(dtype)
            elif isinstance(part, torch.nn.Module):
                part.to(dtype)
    if quantization is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    loaded = LoadedModel(
        entry=entry,
        model=model,
        processor=processor,
        device=device,
        precisions=precisions,
        load_seconds=time.perf_counter() - started,
        checkpoint_path=location,
    )
    log.info("Loaded %s in %.1fs: %s", entry.name, loaded.load_seconds, precisions.as_dict())
    return loaded
