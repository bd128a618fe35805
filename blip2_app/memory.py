"""Will the model fit? Checked before a single weight is read.

The estimate comes from the checkpoint's safetensors headers (every tensor's name, dtype and
shape) and the precision each component will get; the budget from `--available-memory-mb`, the
GPU's free memory or MemAvailable. A model that certainly cannot fit is refused with one sentence
(a `ModelLoadError`) instead of being killed by the kernel halfway through loading.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoints import (
    SafetensorsHeaderError,
    TensorInfo,
    cached_snapshot,
    checkpoint_location,
    component_of,
    describe,
    hub_fetch_errors,
    read_safetensors_header,
    require_hub,
)
from .config import Settings
from .errors import ModelLoadError
from .precisions import DYNAMIC_INT8, INT8_LINEAR_PRECISIONS, INT8_WEIGHT_ONLY, ComponentPrecisions

if TYPE_CHECKING:
    import torch

    from .loading import LoadedModel
    from .registry import ModelEntry

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
_FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # the float precisions of precisions.py
_QUANTIZED_WEIGHT_BYTES = {"int8": 1.0, "nf4": 0.5, DYNAMIC_INT8: 1.0, INT8_WEIGHT_ONLY: 1.0}

Tensor = tuple[str, str, tuple[int, ...]]  # name, stored dtype (safetensors), shape: a TensorInfo


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """How much memory the models may take, and where that figure came from (for the message)."""

    available_bytes: int | None  # None: unknown or checking turned off
    source: str
    used_bytes: int = 0


class TensorsUnknown(Exception):
    """The checkpoint's tensor list cannot be read, for the reason in the message; the memory
    check is then skipped (with a warning), and loading reports any real problem itself."""


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
        import torch

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
    try:
        tensors = checkpoint_tensors(entry)
    except TensorsUnknown as reason:
        log.warning("Skipping the memory check for %s: %s.", entry.name, reason)
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


def estimate_weight_bytes(
    tensors: Iterable[Tensor], precisions: ComponentPrecisions, skip: tuple[str, ...] = ()
) -> int:
    """Bytes the weights take once loaded with `precisions` (per component, see loading.py)."""
    floats = [p for p in precisions.as_dict().values() if p in _FLOAT_BYTES]
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
        component = component_of(name)
        precision = getattr(precisions, component) if component else "fp32"
        if precision in _FLOAT_BYTES:
            total += count * _FLOAT_BYTES[precision]
        elif len(shape) == 2 and "embed" not in name:  # a Linear weight: quantized
            total += count * _QUANTIZED_WEIGHT_BYTES[precision]
        elif precision in INT8_LINEAR_PRECISIONS:
            total += count * (2 if len(shape) == 2 else 4)  # embeddings bf16, norms and biases fp32
        else:
            total += count * load_bytes
    return int(total)


def checkpoint_tensors(entry: ModelEntry) -> list[TensorInfo]:
    """Every tensor's name, dtype and shape, from safetensors headers only: a local folder, the
    Hugging Face cache, or (for a hub id not yet downloaded) the hub's metadata API.

    Raises `TensorsUnknown` when the checkpoint has no safetensors files or its headers cannot be
    read or fetched; a missing folder or an unreachable hub raise what `checkpoint_location` raises.
    """
    location = checkpoint_location(entry)
    local = Path(location).expanduser()
    folder = local if local.is_dir() else cached_snapshot(location)
    if folder is None:  # a hub id not downloaded yet (and the hub answers): read the headers remotely
        return _hub_tensors(location)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TensorsUnknown(f"{location} has no safetensors files")
    try:
        return [tensor for path in files for tensor in read_safetensors_header(path).tensors()]
    except (OSError, SafetensorsHeaderError) as error:
        raise TensorsUnknown(f"cannot read a safetensors header ({error})") from error


def _hub_tensors(repo_id: str) -> list[TensorInfo]:
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

    # No safetensors, a gated repo, a network hiccup: the check is skipped, loading reports what matters.
    known: tuple[type[BaseException], ...] = (
        NotASafetensorsRepoError,
        SafetensorsParsingError,
        *hub_fetch_errors(),
    )
    require_hub(repo_id)  # fail fast on a dead network (its config.json may be cached, its weights not)
    try:
        metadata = get_safetensors_metadata(repo_id, timeout=10)
    except known as error:
        raise TensorsUnknown(
            f"the hub gave no safetensors metadata for {repo_id} ({describe(error)})"
        ) from error
    return [
        TensorInfo(name, info.dtype, tuple(info.shape))
        for file in metadata.files_metadata.values()
        for name, info in file.tensors.items()
    ]
