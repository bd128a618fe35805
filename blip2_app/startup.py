"""Settings -> a ready Engine: resolve names, choose device and precisions, load the models.

Before any weights are read, two checks turn the usual start-up failures into one sentence each
(a `ModelLoadError`): a `--model` that looks like a folder but does not exist, and a model that
cannot fit in the memory available for the requested precisions (estimated from the checkpoint's
safetensors headers, which hold every tensor's shape, without reading a single weight).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image

from .allocator import tune_allocator
from .backends import BACKENDS, TextBackend
from .cache import FeatureCache
from .config import Settings
from .engine import Engine
from .errors import CheckpointUnreachableError, ModelLoadError
from .images import ImageLimits
from .loading import (
    COMPONENT_MODULES,
    DYNAMIC_INT8,
    FLOAT_DTYPES,
    ComponentPrecisions,
    LoadedModel,
    checkpoint_location,
    load_model,
    pick_device,
    resolve_precisions,
)
from .registry import TINY_PREFIX, ModelEntry, Registry, require_hub

log = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
# Python, PyTorch, Gradio, the processors and activations come on top of the weights.
RUNTIME_OVERHEAD_BYTES = 512 * 1024 * 1024
WEIGHT_MARGIN = 1.10  # tied copies, quantization scales, allocator slack
_STORED_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_FLOAT_BYTES = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in FLOAT_DTYPES.items()}
_QUANTIZED_WEIGHT_BYTES = {"int8": 1.0, "nf4": 0.5, DYNAMIC_INT8: 1.0}


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """How much memory the models may take, and where that figure came from (for the message)."""

    available_bytes: int | None  # None: unknown or checking turned off
    source: str
    used_bytes: int = 0


def load_engine(settings: Settings, registry: Registry | None = None) -> Engine:
    """Everything the app, the CLI and the benchmarks need; failures raise ModelLoadError.

    With `settings.fallback_model` (an explicit opt-in), a model that cannot be fetched (no
    network, not cached: `CheckpointUnreachableError`) is replaced by the fallback, with a warning
    in the log and a notice on the engine that the UI shows as a banner on every tab."""
    try:
        return _load_engine(settings, registry)
    except CheckpointUnreachableError as error:
        fallback = settings.fallback_model
        if not fallback or fallback == settings.model:
            raise
        log.warning("%s Starting on the fallback model %s instead (--fallback-model).", error, fallback)
        retrieval = "none" if settings.retrieval_model == "none" else "auto"
        engine = _load_engine(settings.replace(model=fallback, retrieval_model=retrieval), registry)
    engine.notices.append(
        f"{settings.model} could not be loaded here (a checkpoint it needs is not on disk or in the "
        f"Hugging Face cache, and could not be downloaded), so the app started on the fallback model "
        f"{fallback}."
    )
    return engine


def _load_engine(settings: Settings, registry: Registry | None = None) -> Engine:
    tune_allocator()  # before the first big tensor: see allocator.py
    try:
        return _load_models(settings, registry)
    finally:
        if not settings.low_memory:
            tune_allocator(serving=True)


def _load_models(settings: Settings, registry: Registry | None) -> Engine:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    registry = registry or Registry.load([settings.models_file] if settings.models_file else [])
    device = pick_device(settings.device)
    entry = resolve_model(registry, settings.model, "--model")
    budget = memory_budget(settings, device)

    text: TextBackend | None = None
    matcher = None
    matcher_entry: ModelEntry | None = None
    if entry.family.generates_text:

        def load_weights(text_entry: ModelEntry) -> LoadedModel:
            nonlocal budget
            precisions, notes = resolve_precisions(
                settings.precision, text_entry, device, settings.precision_overrides
            )
            budget = check_memory(text_entry, precisions, budget)
            loaded = load_model(text_entry, precisions, device)
            loaded.notes.extend(notes)
            return loaded

        text = BACKENDS[settings.backend](entry, settings, load_weights)
    elif settings.backend != "local":
        raise ModelLoadError(
            f"{entry.name} is a retrieval model; --backend {settings.backend} needs a captioning model (--model)."
        )
    else:
        matcher_entry = entry
    captioner = text.loaded if text is not None else None  # weights a retrieval model may share

    retrieval_name = settings.retrieval_model
    if text is not None:
        matcher_entry = None
        if retrieval_name == "auto":
            retrieval_name = entry.retrieval or "none"
        if retrieval_name != "none":
            matcher_entry = resolve_model(registry, retrieval_name, "--retrieval-model")
    if matcher_entry is not None:
        precisions, notes = resolve_precisions(
            settings.precision, matcher_entry, device, settings.precision_overrides
        )
        # A retrieval model has no language model: its "llm" precision must not trigger bitsandbytes.
        precisions = dataclasses.replace(precisions, llm=precisions.qformer)
        if captioner is not None and captioner.precisions.vision != precisions.vision:
            # Sharing the encoder needs one precision for it; the captioning model's wins.
            precisions = dataclasses.replace(precisions, vision=captioner.precisions.vision)
        check_memory(matcher_entry, precisions, budget, shares_vision_with=captioner)
        matcher = load_model(matcher_entry, precisions, device, share_vision_with=captioner)
        matcher.notes.extend(notes)

    cache = FeatureCache(max_entries=settings.cache_entries, max_bytes=settings.cache_mb * 1024 * 1024)
    allow_pillow_pixels(settings.max_image_pixels)
    limits = ImageLimits(max_pixels=settings.max_image_pixels, max_bytes=settings.max_upload_mb * 1024 * 1024)
    return Engine(text, matcher, cache, limits)


def allow_pillow_pixels(max_pixels: int) -> None:
    """images.py lowers Pillow's process-wide bomb guard to the default limit; a larger
    --max-image-pixels must raise it too, or Pillow would still refuse those images. (Smaller
    limits need nothing: the decoder checks the header against its own limit first.)"""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


# --------------------------------------------------------------------------- model names
def _looks_like_path(name: str) -> bool:
    """A folder rather than a hub id (owner/name has exactly one slash and no leading . / ~)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def resolve_model(registry: Registry, name: str, flag: str) -> ModelEntry:
    """`registry.resolve`, with a sentence of its own for a folder that does not exist."""
    if name not in registry.models and _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"The model folder {name!r} given to {flag} does not exist. Pass a checkpoint folder "
                "(one with config.json and the weights), a registry name such as blip2-opt-2.7b "
                "(python -m blip2_app models lists them) or a hub id such as Salesforce/blip2-opt-2.7b; "
                "--model tiny-random starts offline."
            )
        if not path.is_dir():
            raise ModelLoadError(
                f"{name!r} given to {flag} is a file, not a folder; pass the checkpoint folder that holds config.json."
            )
    return registry.resolve(name)


# --------------------------------------------------------------------------- memory check
def read_mem_available(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_budget(settings: Settings, device: torch.device) -> MemoryBudget:
    if settings.available_memory_mb == 0:
        return MemoryBudget(None, "the check is turned off (--available-memory-mb 0)")
    if settings.available_memory_mb is not None:
        return MemoryBudget(settings.available_memory_mb * 1024 * 1024, "--available-memory-mb")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return MemoryBudget(int(free), f"free memory on {device}")
    return MemoryBudget(read_mem_available(), "MemAvailable in /proc/meminfo")


def _gb(count: float) -> str:
    return f"{count / 1024**3:.1f} GB" if count >= 1024**3 else f"{count / 1024**2:.0f} MB"


def check_memory(
    entry: ModelEntry,
    precisions: ComponentPrecisions,
    budget: MemoryBudget,
    shares_vision_with: LoadedModel | None = None,
) -> MemoryBudget:
    """Refuse, before loading, a model whose weights alone cannot fit; returns the budget left.

    The estimate is a lower bound on purpose (weights at the chosen precisions plus a fixed
    overhead; a retrieval model's vision encoder is counted as shared), so the check only stops
    starts that would certainly run out of memory.
    """
    if budget.available_bytes is None:
        return budget
    tensors = checkpoint_tensors(entry)
    if tensors is None:
        log.info("Could not read the tensor list of %s; skipping the memory check.", entry.checkpoint)
        return budget
    skip = ("vision_model.",) if shares_vision_with is not None else ()
    weights = estimate_weight_bytes(tensors, precisions, skip=skip)
    needed = int(weights * WEIGHT_MARGIN) + (RUNTIME_OVERHEAD_BYTES if budget.used_bytes == 0 else 0)
    left = budget.available_bytes - budget.used_bytes
    if needed > left:
        what = ", ".join(f"{c} {p}" for c, p in precisions.as_dict().items())
        already = (
            f" ({_gb(budget.used_bytes)} of it already taken by the captioning model)"
            if budget.used_bytes
            else ""
        )
        raise ModelLoadError(
            f"Not enough memory to load {entry.name} ({what}): it needs about {_gb(needed)}, "
            f"but {_gb(budget.available_bytes)} is available ({budget.source}){already}. "
            "Choose a smaller precision (--precision int8, nf4 or dynamic-int8 on CPU), a smaller model, "
            "or free some memory; --available-memory-mb sets the figure (0 turns this check off)."
        )
    log.info("Memory check for %s: about %s needed, %s left.", entry.name, _gb(needed), _gb(left))
    return dataclasses.replace(budget, used_bytes=budget.used_bytes + needed)


Tensor = tuple[str, str, tuple[int, ...]]  # name, stored dtype (safetensors), shape


def estimate_weight_bytes(
    tensors: Iterable[Tensor], precisions: ComponentPrecisions, skip: tuple[str, ...] = ()
) -> int:
    """Bytes the weights take once loaded with `precisions` (per component, see loading.py)."""
    floats = [p for p in precisions.as_dict().values() if p in FLOAT_DTYPES]
    # bitsandbytes keeps a quantized component's non-Linear tensors in the load dtype.
    load_bytes = max((_FLOAT_BYTES[p] for p in floats), default=2)
    total = 0.0
    for name, dtype, shape in tensors:
        if skip and name.startswith(skip):
            continue
        count = math.prod(shape)
        if dtype not in ("F64", "F32", "F16", "BF16"):
            total += count * _STORED_BYTES.get(dtype, 4)
            continue
        top = name.split(".", 1)[0]
        component = next((c for c, names in COMPONENT_MODULES.items() if top in names), None)
        precision = getattr(precisions, component) if component else "fp32"
        if precision in _FLOAT_BYTES:
            total += count * _FLOAT_BYTES[precision]
        elif len(shape) == 2 and "embed" not in name:  # a Linear weight: quantized
            total += count * _QUANTIZED_WEIGHT_BYTES[precision]
        elif precision == DYNAMIC_INT8:
            total += count * (2 if len(shape) == 2 else 4)  # embeddings bf16, norms and biases fp32
        else:
            total += count * load_bytes
    return int(total)


def _header_tensors(path: Path) -> Iterator[Tensor]:
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
    for name, info in header.items():
        if name != "__metadata__":
            yield name, info["dtype"], tuple(info["shape"])


def checkpoint_tensors(entry: ModelEntry) -> list[Tensor] | None:
    """Every tensor's name, dtype and shape, from safetensors headers only: a local folder, the
    Hugging Face cache, or (for a hub id not yet downloaded) the hub's metadata API. None when the
    checkpoint has no safetensors files or its headers cannot be read."""
    location = checkpoint_location(entry) if entry.checkpoint.startswith(TINY_PREFIX) else entry.checkpoint
    folder = Path(location).expanduser()
    if not folder.is_dir():
        folder = _cached_snapshot(location)
    if folder is not None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return None
        try:
            return [t for path in files for t in _header_tensors(path)]
        except (OSError, ValueError, KeyError, struct.error):
            return None
    # Not downloaded yet: fail fast on an unreachable hub, then read the headers remotely.
    require_hub(location)
    try:
        from huggingface_hub import get_safetensors_metadata

        metadata = get_safetensors_metadata(location, timeout=10)
    except Exception as error:  # no safetensors, gated repo, network hiccup: load_model reports it
        log.info("No safetensors metadata for %s (%s).", location, type(error).__name__)
        return None
    return [
        (name, info.dtype, tuple(info.shape))
        for file in metadata.files_metadata.values()
        for name, info in file.tensors.items()
    ]


def _cached_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json"], local_files_only=True)
        )
    except Exception:  # not in the cache (or not a valid repo id)
        return None
    return folder if any(folder.glob("*.safetensors")) else None
