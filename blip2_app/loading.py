"""Checkpoint -> model + processor, with a precision per component, on the chosen device.

BLIP-2 has three components: the vision encoder (ViT-g, ~1B parameters), the Q-Former bridge
(~100M, with its query tokens and projections) and the language model (2.7B-13B). Each gets its
own precision: fp32, bf16, fp16, int8 or nf4 (bitsandbytes; 0.50 runs both on CPU too).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import mmap
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import transformers

from . import quantization
from .allocator import trim_heap
from .checkpoints import (
    SafetensorsHeaderError,
    checkpoint_location,
    component_of,
    hub_fetch_errors,
    read_safetensors_header,
    unreachable_checkpoint_message,
    weight_files,
)
from .errors import CheckpointUnreachableError, ModelLoadError
from .packing import LayerPacker, slots_to_pack
from .precisions import (
    BATCH_DEPENDENT_PRECISIONS,
    COMPONENT_MODULES,
    COMPONENTS,
    DYNAMIC_INT8,
    INT8_LINEAR_PRECISIONS,
    INT8_WEIGHT_ONLY,
    PRESETS,
    QUANTIZED,
    ComponentPrecisions,
    as_loaded,
)
from .registry import ModelEntry
from .weight_cache import WeightCache

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine.")
    return torch.device(requested)


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices on AMX tiles (Intel Xeon since Sapphire Rapids)."""
    return bool(torch.cpu._is_amx_tile_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def auto_vision_precision(device: torch.device) -> str | None:
    """The vision encoder's precision under `--precision auto` where it differs from the preset's:
    bf16 on a CPU with AMX, where its 257 rows an image run about twice as fast as at dynamic-int8,
    and concurrent images can share one pass (a float precision: no scale shared by the batch, as
    int8 activations have). Decoding (one row a sequence) stays on fbgemm's int8, faster there
    (decision 0012, benchmarks/results/vision_precision.md)."""
    return "bf16" if device.type == "cpu" and cpu_has_amx_bf16() else None


def resolve_precisions(
    preset: str,
    entry: ModelEntry,
    device: torch.device,
    overrides: dict[str, str | None] | None = None,
) -> tuple[ComponentPrecisions, list[str]]:
    """Preset (or the entry's default for "auto") + per-component overrides, made safe for `device`.

    Returns the precisions and notes on anything that was changed (e.g. fp16 on CPU -> bf16).
    """
    name = entry.precision.get(device.type, "auto") if preset == "auto" else preset
    if name == "auto":
        name = "fp16" if device.type == "cuda" else DYNAMIC_INT8
    if isinstance(name, dict):  # the entry's own precision per component
        try:
            chosen = ComponentPrecisions(**name).as_dict()
        except ModelLoadError as error:
            raise ModelLoadError(f"The registry's default precision for {entry.name}: {error}") from error
    elif name in PRESETS:
        chosen = PRESETS[name].as_dict()
    else:
        raise ModelLoadError(f"Unknown precision preset {name!r}; choose from auto, {', '.join(PRESETS)}.")
    overrides = overrides or {}
    chosen.update({k: v for k, v in overrides.items() if v})
    notes = []
    faster_vision = auto_vision_precision(device) if preset == "auto" else None
    if faster_vision and chosen["vision"] in INT8_LINEAR_PRECISIONS and not overrides.get("vision"):
        chosen["vision"] = faster_vision
        notes.append(
            f"The vision encoder runs in {faster_vision}: this CPU has AMX tiles, on which it is about "
            "twice as fast as at dynamic-int8 (--vision-precision dynamic-int8 to keep int8)."
        )
    for cpu_only in sorted(INT8_LINEAR_PRECISIONS & set(chosen.values())):
        if device.type != "cpu":
            raise ModelLoadError(f"{cpu_only} runs on CPU only; on a GPU use fp16, int8 or nf4.")
    if DYNAMIC_INT8 in chosen.values():
        quantization.check_quantized_ops()
    if INT8_WEIGHT_ONLY in chosen.values():
        quantization.check_weight_only_ops()
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
    int8_kernels: str = ""  # the library that packed the dynamic-int8 layers ("": none)
    # The vision fingerprint is computed when first asked (hashing 4 GB of vision weights takes
    # seconds, and only a retrieval model that may share the encoder needs it).
    fingerprint_source: Callable[[], str] | None = field(default=None, repr=False, compare=False)
    # Packs the dynamic-int8 layers (read as weight-only ones); None: nothing to pack.
    packer: LayerPacker | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def vision_fingerprint(self) -> str:
        """sha256 of the vision encoder's stored tensors ("" without safetensors files)."""
        return self.fingerprint_source() if self.fingerprint_source is not None else ""

    @property
    def weights_final(self) -> bool:
        """False while dynamic-int8 layers are still being packed (packing.py): results computed
        meanwhile are not the packed model's, so caches key them apart."""
        return self.packer is None or self.packer.finished

    @property
    def pixel_signature(self) -> str:
        """Identifies the image preprocessing (size, normalisation): equal pixels in, equal out."""
        config = self.processor.image_processor.to_dict()
        keys = ("size", "image_mean", "image_std", "rescale_factor", "resample", "do_normalize", "do_resize")
        return hashlib.sha256(
            json.dumps({k: config.get(k) for k in keys}, sort_keys=True).encode()
        ).hexdigest()

    def batch_dependent(self, *components: str) -> bool:
        """Whether a row's result in these components depends on the rest of its batch."""
        return any(getattr(self.precisions, c) in BATCH_DEPENDENT_PRECISIONS for c in components)

    def component_dtype(self, component: str) -> torch.dtype:
        """The floating dtype computations in `component` run in (activations' dtype)."""
        precision = getattr(self.precisions, component)
        if precision in INT8_LINEAR_PRECISIONS:
            return torch.float32
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
            packed = [  # int8 layers keep their int8 weights outside .parameters()
                sub
                for m in modules
                if isinstance(m, torch.nn.Module)
                for sub in m.modules()
                if quantization.is_int8_linear(sub)
            ]
            linear_types = Counter(
                _linear_kind(sub) for m in modules if isinstance(m, torch.nn.Module) for sub in m.modules()
            )
            linear_types.pop(None, None)
            dtypes = Counter(str(p.dtype).replace("torch.", "") for p in params)
            for layer in packed:
                dtypes["qint8" if quantization.is_dynamic_int8(layer) else "int8"] += 1
            components[component] = {
                "requested": getattr(self.precisions, component),
                "parameters": sum(p.numel() for p in params)
                + sum(quantization.packed_parameters(q) for q in packed),
                "bytes": sum(p.numel() * p.element_size() for p in params)
                + sum(quantization.packed_bytes(q) for q in packed),
                "dtypes": dict(dtypes),
                "linear_layers": dict(linear_types),
            }
        return {
            "name": self.entry.name,
            "checkpoint": self.entry.checkpoint,
            "family": self.entry.family.name,
            "device": str(self.device),
            "load_seconds": round(self.load_seconds, 2),
            "int8_kernels": self.int8_kernels,
            "packing": self.packer.status() if self.packer is not None else None,
            "memory_bytes": sum(c["bytes"] for c in components.values()),
            "components": components,
            "notes": list(self.notes),
        }


def _linear_kind(module: torch.nn.Module) -> str | None:
    """Class name of a Linear-like layer (nn.Linear, bitsandbytes, torch dynamic int8), else None."""
    if quantization.is_dynamic_int8(module):
        return "DynamicInt8Linear"
    if isinstance(module, quantization.WeightOnlyInt8Linear):
        return "WeightOnlyInt8Linear"
    return type(module).__name__ if isinstance(module, torch.nn.Linear) else None


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


def load_model(
    entry: ModelEntry,
    precisions: ComponentPrecisions,
    device: torch.device,
    share_vision_with: LoadedModel | None = None,
    cache: WeightCache | None = None,
    pack: bool = True,
) -> LoadedModel:
    """Load `entry` with one precision per component; errors become one clear ModelLoadError.

    With `share_vision_with`, the vision encoder of that model is reused when the two checkpoints'
    vision weights are byte-identical (BLIP-2 keeps the image encoder frozen): ~1 B parameters saved.
    With `cache`, a dynamic-int8 model is read from (or written to) the weight cache.
    Dynamic-int8 layers are read as weight-only int8 ones and packed before returning, or with
    `pack=False` left as they are (startup.pack_int8_layers packs them, possibly while serving).
    """
    started = time.perf_counter()
    model_class = getattr(transformers, entry.family.architecture)
    processor_class = getattr(transformers, entry.family.processor)
    log.info("Loading %s (%s) on %s: %s", entry.name, entry.checkpoint, device, precisions.as_dict())
    location = checkpoint_location(entry)
    log.info("Reading the weights of %s from %s", entry.name, location)
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
            processor = processor_class.from_pretrained(location)
            files = weight_files(location)

            @functools.cache
            def fingerprint() -> str:
                if not files:
                    return ""
                return (
                    cache.vision_fingerprint(files, vision_fingerprint)
                    if cache
                    else vision_fingerprint(files)
                )

            shared = None
            if (
                share_vision_with is not None
                and share_vision_with.vision_fingerprint
                and fingerprint() == share_vision_with.vision_fingerprint
            ):
                shared = share_vision_with.model.vision_model
                notes.append(
                    f"Vision encoder shared with {share_vision_with.entry.name} (identical weights)."
                )
            model = None
            if files and not _uses_bitsandbytes(precisions):
                model, cache_state = _cached_stream_load(
                    model_class, location, files, as_loaded(precisions), shared, device, cache
                )
                if cache_state:
                    notes.append(cache_state)
            if model is None:
                model = _load_with_transformers(model_class, location, as_loaded(precisions), device)
                if shared is not None:
                    model.vision_model = shared
    except hub_fetch_errors() as error:
        if Path(location).is_dir():  # on disk: nothing to fetch, so no fallback either
            raise ModelLoadError(
                f"Cannot read the checkpoint of {entry.name} in {location}: {error}"
            ) from error
        raise CheckpointUnreachableError(unreachable_checkpoint_message(entry.checkpoint, error)) from error
    except SafetensorsHeaderError as error:
        raise ModelLoadError(f"The checkpoint of {entry.name} is damaged: {error}.") from error
    except torch.OutOfMemoryError as error:
        raise ModelLoadError(
            f"Not enough memory to load {entry.name} with precisions {precisions.as_dict()}: "
            "try --precision int8 or nf4, or a smaller model."
        ) from error
    except ImportError as error:
        raise ModelLoadError(f"Loading {entry.name} needs a package that is missing: {error}") from error

    if not _uses_bitsandbytes(precisions):
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    loaded = LoadedModel(
        entry=entry,
        model=model,
        processor=processor,
        device=device,
        precisions=precisions,
        notes=notes,
        load_seconds=time.perf_counter() - started,
        checkpoint_path=location,
        int8_kernels=quantization.active_int8_kernels()
        if DYNAMIC_INT8 in precisions.as_dict().values()
        else "",
        fingerprint_source=fingerprint,
    )
    to_pack = slots_to_pack(model, precisions) if pack else []
    if to_pack:
        loaded.packer = LayerPacker(to_pack)
        loaded.packer.pack_now()
        loaded.load_seconds = time.perf_counter() - started
    log.info("Loaded %s in %.1fs: %s", entry.name, loaded.load_seconds, precisions.as_dict())
    return loaded


def _cached_stream_load(
    model_class: type[transformers.PreTrainedModel],
    location: str,
    files: list[Path],
    precisions: ComponentPrecisions,
    shared: torch.nn.Module | None,
    device: torch.device,
    cache: WeightCache | None,
) -> tuple[Any | None, str]:
    """stream_load, through the weight cache when it pays (a large checkpoint, dynamic-int8 or
    int8-weight-only on CPU); also returns a sentence for the Model tab saying what the cache did."""
    entry = None
    if (
        cache is not None
        and device.type == "cpu"
        and INT8_LINEAR_PRECISIONS & set(precisions.as_dict().values())
    ):
        entry = cache.entry_for(model_class, files, precisions, shares_vision=shared is not None)
    if cache is None or entry is None:
        return stream_load(model_class, location, files, precisions, shared, device), ""
    started = time.perf_counter()
    model = cache.load(
        entry,
        lambda: _skeleton(model_class, location),
        shared,
    )
    if model is not None:
        took = time.perf_counter() - started
        return (
            model,
            f"Read from the weight cache in {took:.1f}s: {entry.path} ({entry.size_bytes / 1e9:.2f} GB).",
        )
    pending = cache.begin(entry)
    try:
        model = stream_load(
            model_class,
            location,
            files,
            precisions,
            shared,
            device,
            record=pending.record if pending else None,
        )
        skip = "vision_model." if shared is not None else None
        written = model is not None and pending is not None and cache.finish(pending, model, skip)
    finally:
        if pending is not None:  # no half entry, no writer thread left waiting
            pending.abandon()
    if model is None:
        return None, ""
    if not written:
        return (
            model,
            "The weight cache could not be written (see the server log): the next start quantizes again.",
        )
    # The streamed model holds every tensor in anonymous memory (a bf16 vision encoder: 2 GB at real
    # size); the entry just written maps the same values from the page cache, as a second start does.
    cache.remap(entry, model)
    return (
        model,
        f"Quantized and written to the weight cache: {entry.path} ({entry.size_bytes / 1e9:.2f} GB).",
    )


def _uses_bitsandbytes(precisions: ComponentPrecisions) -> bool:
    return any(p in QUANTIZED for p in precisions.as_dict().values())


def _load_with_transformers(
    model_class: type[transformers.PreTrainedModel], location: str, precisions: ComponentPrecisions, device
) -> Any:
    """transformers' own loader (bitsandbytes quantizes while loading), then per-component casts."""
    kwargs: dict[str, Any] = {"dtype": _load_dtype(precisions)}
    bitsandbytes_config = _quantization_config(precisions, model_class)
    if bitsandbytes_config is not None:
        kwargs.update(quantization_config=bitsandbytes_config, device_map={"": str(device)})
    model = model_class.from_pretrained(location, **kwargs)
    for component in COMPONENTS:
        precision = getattr(precisions, component)
        for name in COMPONENT_MODULES[component]:
            part = getattr(model, name, None)
            if precision in INT8_LINEAR_PRECISIONS and isinstance(part, torch.nn.Module):
                part.float()
                quantization.quantize_linears(part, weight_only=precision == INT8_WEIGHT_ONLY)
            elif precision in FLOAT_DTYPES and isinstance(part, torch.nn.Parameter):
                part.data = part.data.to(FLOAT_DTYPES[precision])
            elif precision in FLOAT_DTYPES and isinstance(part, torch.nn.Module):
                part.to(FLOAT_DTYPES[precision])
            elif precision in INT8_LINEAR_PRECISIONS and isinstance(part, torch.nn.Parameter):
                part.data = part.data.float()
    return model


def vision_fingerprint(files: list[Path]) -> str:
    """sha256 over the vision encoder's tensors exactly as stored (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    entries = []
    for path in files:
        header = read_safetensors_header(path)
        entries += [
            (k, v, path, header.data_start)
            for k, v in header.entries.items()
            if k.startswith("vision_model.")
        ]
    if not entries:
        return ""
    for key, info, path, offset in sorted(entries, key=lambda e: e[0]):
        start, end = info["data_offsets"]
        digest.update(f"{key}|{info['dtype']}|{info['shape']}|".encode())
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            digest.update(data[offset + start : offset + end])
    return digest.hexdigest()


def stream_load(
    model_class: type[transformers.PreTrainedModel],
    location: str,
    files: list[Path],
    precisions: ComponentPrecisions,
    shared_vision: torch.nn.Module | None = None,
    device: torch.device | None = None,
    record: Callable[[str, dict[str, torch.Tensor]], None] | None = None,
) -> Any | None:
    """Load tensor by tensor, casting or quantizing each as it is read, so peak memory is the final
    model plus one tensor (a 15 GB fp32 checkpoint never sits in memory in full). On a GPU each
    cast tensor goes straight to it: the host holds one tensor at a time, not the whole model.

    The model is built without initialising its weights: untouched storage costs no resident
    memory. Returns None when the checkpoint's tensor names do not match the model's (e.g. an
    old format transformers renames while loading); the caller then uses transformers' loader.
    `record(name, int8 parts)` gets each Linear layer quantized while streaming (the weight cache).
    """
    plan = _plan_stream_load(model_class, location, files, shared_vision)
    if plan is None:
        return None
    stream = _TensorStream(plan, precisions, device, record=record)
    if shared_vision is not None:
        stream.loaded_ids |= {id(t) for t in [*shared_vision.parameters(), *shared_vision.buffers()]}
    stream.read_checkpoint()
    return _finish_stream_load(stream, shared_vision, location)


@dataclass
class _StreamPlan:
    """What a streaming load reads and where each tensor goes, decided before any tensor is read."""

    model: transformers.PreTrainedModel  # built without initialising its weights
    stored: dict[str, Path]  # tensor name -> the file that stores it
    ties: dict[str, str]  # {target: source} the checkpoint really has
    wanted: set[str]  # the model's tensors to fill (not those of a shared vision encoder)
    tie_sources: set[str]
    head_tables: set[str]  # embedding tables an LM head (a Linear layer) is tied to

    def keys_by_file(self) -> dict[Path, list[str]]:
        """The tensors to read, grouped by file so that each file is opened once."""
        by_file: dict[Path, list[str]] = {}
        for key in sorted(self.wanted & set(self.stored) - set(self.ties)):  # a tied copy is not read twice
            by_file.setdefault(self.stored[key], []).append(key)
        return by_file


def _plan_stream_load(
    model_class: type[transformers.PreTrainedModel],
    location: str,
    files: list[Path],
    shared_vision: torch.nn.Module | None,
) -> _StreamPlan | None:
    """The model skeleton and what to read into it; None when the checkpoint's tensor names do
    not match the model's."""
    model = _skeleton(model_class, location)
    expected = set(model.state_dict())
    stored = {key: path for path in files for key in read_safetensors_header(path).entries}
    skip = "vision_model." if shared_vision is not None else None
    wanted = {k for k in expected if not (skip and k.startswith(skip))}
    if set(stored) - expected:
        log.info("Tensor names of %s differ from the model's; using transformers' loader.", location)
        return None
    ties = _checkpoint_ties(dict(getattr(model, "all_tied_weights_keys", {}) or {}), stored)
    if wanted - set(stored) - set(ties):
        log.info("Tensor names of %s differ from the model's; using transformers' loader.", location)
        return None
    # A Linear weight that a table is tied to (a checkpoint storing the head, not the table) stays
    # fp32 until tied, then is quantized with its table.
    tie_sources = set(ties.values())
    head_tables = {
        source
        for target, source in ties.items()
        if type(model.get_submodule(target.rpartition(".")[0])) is torch.nn.Linear
    }
    return _StreamPlan(model, stored, ties, wanted, tie_sources, head_tables)


def _skeleton(model_class: type[transformers.PreTrainedModel], location: str) -> transformers.PreTrainedModel:
    """The model built without initialising its weights (untouched storage costs no memory)."""
    from transformers.initialization import no_init_weights, no_tie_weights

    config = transformers.AutoConfig.from_pretrained(location)
    with no_init_weights(), no_tie_weights():
        return model_class._from_config(config, dtype=torch.float32)


def _precision_of(precisions: ComponentPrecisions, key: str) -> str:
    component = component_of(key)
    return getattr(precisions, component) if component else "fp32"


@dataclass
class _TensorStream:
    """The streaming read: each stored tensor goes into the model as it is read, cast to its
    component's precision, and a dynamic-int8 Linear layer is quantized as soon as its weight
    (and bias) arrived."""

    plan: _StreamPlan
    precisions: ComponentPrecisions
    device: torch.device | None
    # Dynamic-int8 Linear layers whose weight or bias has not been read yet: {layer: {attr: tensor}}.
    pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # Embedding tables an LM head is tied to, left unread (untouched storage) until the head is quantized.
    untied_tables: dict[torch.nn.Module, tuple[Path, str]] = field(default_factory=dict)
    # Tensors holding checkpoint values: `initialize_weights` must not overwrite them.
    loaded_ids: set[int] = field(default_factory=set)
    record: Callable[[str, dict[str, torch.Tensor]], None] | None = None
    # Layers being quantized on every core while the next tensors are read: (name, job).
    quantizing: deque[
        tuple[str, Future[tuple[quantization.WeightOnlyInt8Linear, dict[str, torch.Tensor]]]]
    ] = field(default_factory=deque)
    workers: int = field(default_factory=lambda: max(1, torch.get_num_threads()))
    pool: ThreadPoolExecutor = field(init=False)

    def read_checkpoint(self) -> None:
        from safetensors import safe_open

        with ThreadPoolExecutor(self.workers) as self.pool:
            for path, keys in self.plan.keys_by_file().items():
                with safe_open(str(path), framework="pt") as handle:
                    for key in keys:
                        self._read_tensor(handle, path, key)
                        # One layer per core waits at most: each holds its fp32 weight until done.
                        while len(self.quantizing) > self.workers:
                            self._place_quantized()
            while self.quantizing:
                self._place_quantized()

    def _place_quantized(self) -> None:
        name, job = self.quantizing.popleft()
        layer, parts = job.result()
        if self.record is not None:
            self.record(name, parts)
        self.loaded_ids |= {id(t) for t in layer.buffers()}  # a weight-only layer's: not to initialise
        parent_name, _, child = name.rpartition(".")
        model = self.plan.model
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)

    def _read_tensor(self, handle: Any, path: Path, key: str) -> None:
        model = self.plan.model
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        precision = _precision_of(self.precisions, key)
        if precision in INT8_LINEAR_PRECISIONS and type(owner) is torch.nn.Embedding:
            self._read_dynamic_int8_table(handle, path, key, owner, attr)
            return
        tensor = handle.get_tensor(key)
        if (
            precision in INT8_LINEAR_PRECISIONS
            and type(owner) is torch.nn.Linear
            and key not in self.plan.tie_sources
        ):
            self._collect_linear_part(owner_name, owner, attr, tensor)
            return
        dtype = FLOAT_DTYPES.get(precision, torch.float32)
        if not tensor.is_floating_point():
            dtype = tensor.dtype
        self.loaded_ids.add(id(_assign(owner, attr, tensor.to(device=self.device, dtype=dtype))))

    def _read_dynamic_int8_table(
        self, handle: Any, path: Path, key: str, owner: torch.nn.Module, attr: str
    ) -> None:
        if key in self.plan.head_tables:  # read later, straight into int8 rows
            self.untied_tables[owner] = (path, key)
            # Flagged as loaded so that no init writes (and makes resident) its
            # never-touched fp32 storage: 515 MB on OPT-2.7B.
            self.loaded_ids.add(id(cast(torch.nn.Embedding, owner).weight))
            return
        owner.__class__ = quantization.Bf16Embedding
        self.loaded_ids.add(id(_assign(owner, attr, _read_cast(handle, key, torch.bfloat16))))

    def _collect_linear_part(
        self, owner_name: str, owner: torch.nn.Module, attr: str, tensor: torch.Tensor
    ) -> None:
        """Quantizes the layer once its weight and (if it has one) bias have both arrived."""
        parts = self.pending.setdefault(owner_name, {})
        parts[attr] = tensor
        if "weight" in parts and ("bias" in parts or cast(torch.nn.Linear, owner).bias is None):
            layer = _fp32_linear(cast(torch.nn.Linear, owner), parts)
            # Weight-only int8 (its parts are its own tensors: recorded without a copy); a
            # dynamic-int8 layer is packed from it afterwards (packing.py).
            job = self.pool.submit(quantization.weight_only_with_parts, layer)
            self.quantizing.append((owner_name, job))
            del self.pending[owner_name]


def _finish_stream_load(
    stream: _TensorStream, shared_vision: torch.nn.Module | None, location: str
) -> transformers.PreTrainedModel:
    """Tie, fill what the checkpoint does not hold, quantize what is left, check nothing is missing."""
    model = stream.plan.model
    if shared_vision is not None:
        model.vision_model = shared_vision
    _tie(model, stream.plan.ties)
    _initialize_unloaded(model, stream.loaded_ids)
    _quantize_remaining_linears(model, stream.precisions, shared_vision, stream.untied_tables, location)
    trim_heap()  # quantizing layer by layer leaves freed blocks in the heap (~150 MB on OPT-2.7B)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if stream.pending or leftover:
        raise ModelLoadError(
            f"Incomplete checkpoint {location}: missing {sorted([*stream.pending, *leftover])[:5]}."
        )
    return model


def _initialize_unloaded(model: transformers.PreTrainedModel, loaded_ids: set[int]) -> None:
    # transformers v5 fills some buffers (position ids, rotary frequencies) in `_init_weights`, which
    # no_init_weights skipped: run it now; its init functions skip tensors flagged as loaded.
    # (`_is_hf_initialized` is transformers' flag, set on torch objects that do not declare it.)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "meta" and id(tensor) in loaded_ids:
            tensor._is_hf_initialized = True  # type: ignore[attr-defined]
    # A module with nothing left to fill is skipped whole: some inits (T5 attention) write to
    # `layer.weight`, which a dynamic-int8 Linear no longer has as a tensor.
    for module in model.modules():
        if all(id(t) in loaded_ids for t in [*module.parameters(), *module.buffers()]):
            module._is_hf_initialized = True  # type: ignore[assignment]
    model.initialize_weights()


def _quantize_remaining_linears(
    model: transformers.PreTrainedModel,
    precisions: ComponentPrecisions,
    shared_vision: torch.nn.Module | None,
    untied_tables: dict[torch.nn.Module, tuple[Path, str]],
    location: str,
) -> None:
    # An LM head tied to its embedding table is quantized now, with the table (one int8 copy for
    # both); then every Linear layer not quantized while streaming.
    for component, names in COMPONENT_MODULES.items():
        precision = getattr(precisions, component)
        if precision not in INT8_LINEAR_PRECISIONS:
            continue
        weight_only = precision == INT8_WEIGHT_ONLY
        for name in names:
            part = getattr(model, name, None)
            if isinstance(part, torch.nn.Module) and part is not shared_vision:
                if component == "llm":
                    language_model = cast(transformers.PreTrainedModel, part)
                    source = untied_tables.pop(language_model.get_input_embeddings(), None)
                    with _row_reader(source) as read_rows:
                        if (
                            not quantization.quantize_tied_head(language_model, read_rows, weight_only)
                            and source is not None
                        ):
                            raise ModelLoadError(f"{location}: the LM head is not tied to {source[1]}.")
                quantization.quantize_linears(part, weight_only)
    if untied_tables:
        raise ModelLoadError(
            f"{location}: tied tables left unread: {sorted(k for _, k in untied_tables.values())}."
        )


READ_CHUNK_ROWS = 4096


def _checkpoint_ties(tie_targets: dict[str, str], stored: dict[str, Path]) -> dict[str, str]:
    """The ties ({target: source}) this checkpoint really has, by the rules of transformers'
    `from_pretrained`: a target stored with values of its own keeps them (flan-t5 stores its own
    LM head, though transformers' T5 config always says "tied"); one stored with its source's
    values is tied; a source missing from the checkpoint is taken from a stored target."""
    groups: dict[str, list[str]] = {}
    for target, source in tie_targets.items():
        groups.setdefault(source, []).append(target)
    ties = {}
    for source, targets in groups.items():
        present = [key for key in (source, *targets) if key in stored]
        if not present:
            continue  # reported as missing by the caller
        root = present[0]
        for key in (source, *targets):
            if key != root and (key not in stored or _same_stored_tensor(stored, key, root)):
                ties[key] = root
    return ties


def _same_stored_tensor(stored: dict[str, Path], first: str, second: str) -> bool:
    """Whether two stored tensors hold the same values, compared a block of rows at a time."""
    from safetensors import safe_open

    with (
        safe_open(str(stored[first]), framework="pt") as a,
        safe_open(str(stored[second]), framework="pt") as b,
    ):
        x, y = a.get_slice(first), b.get_slice(second)
        if x.get_shape() != y.get_shape() or x.get_dtype() != y.get_dtype():
            return False
        if not x.get_shape():
            return torch.equal(a.get_tensor(first), b.get_tensor(second))
        rows = x.get_shape()[0]
        return all(
            torch.equal(x[start : start + READ_CHUNK_ROWS], y[start : start + READ_CHUNK_ROWS])
            for start in range(0, rows, READ_CHUNK_ROWS)
        )


def _tie(model: torch.nn.Module, ties: dict[str, str]) -> None:
    """Point each tied target at its source; a table tied to a bf16 table also returns fp32."""
    for target, source in ties.items():
        source_owner_name, _, source_attr = source.rpartition(".")
        source_owner = model.get_submodule(source_owner_name)
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, attr, getattr(source_owner, source_attr))
        if type(source_owner) is quantization.Bf16Embedding and type(owner) is torch.nn.Embedding:
            owner.__class__ = quantization.Bf16Embedding


def _read_cast(handle: Any, key: str, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor cast to `dtype`, read a block of rows at a time: casting a 50k x 2560 fp32
    embedding table whole would hold its fp32 copy (515 MB) next to the result."""
    part = handle.get_slice(key)
    shape = part.get_shape()
    out = torch.empty(shape, dtype=dtype)
    for start in range(0, shape[0], READ_CHUNK_ROWS):
        out[start : start + READ_CHUNK_ROWS] = part[start : start + READ_CHUNK_ROWS]
    return out


@contextlib.contextmanager
def _row_reader(source: tuple[Path, str] | None) -> Iterator[quantization.RowReader | None]:
    """Reads rows of a stored table as fp32, or None when there is no stored table to read."""
    if source is None:
        yield None
        return
    from safetensors import safe_open

    path, key = source
    with safe_open(str(path), framework="pt") as handle:
        part = handle.get_slice(key)
        yield lambda start, end: part[start:end].float()


def _assign(owner: torch.nn.Module, attr: str, value: torch.Tensor) -> torch.Tensor:
    if attr in owner._buffers:
        owner._buffers[attr] = value
        return value
    parameter = torch.nn.Parameter(value, requires_grad=False)
    if attr in owner._parameters:
        owner._parameters[attr] = parameter
    else:  # a bare nn.Parameter attribute such as query_tokens
        setattr(owner, attr, parameter)
    return parameter


def _fp32_linear(old: torch.nn.Linear, parts: dict[str, torch.Tensor]) -> torch.nn.Linear:
    """A Linear layer of `old`'s shape holding the weight and bias read for it, in fp32."""
    fresh = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
    fresh.weight = torch.nn.Parameter(parts["weight"].float(), requires_grad=False)
    if old.bias is not None:
        fresh.bias = torch.nn.Parameter(parts["bias"].float(), requires_grad=False)
    return fresh
