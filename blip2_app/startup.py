"""Settings -> a ready Engine: resolve names, choose device and precisions, load the models.

Before any weights are read, two checks turn the usual start-up failures into one sentence each
(a `ModelLoadError`): a `--model` that looks like a folder but does not exist, and a model that
cannot fit in the memory available for the requested precisions (memory.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from . import quantization
from .allocator import trim_heap, tune_allocator
from .backends import BACKENDS, TextBackend
from .cache import FeatureCache
from .checkpoints import looks_like_path
from .config import Settings
from .engine import Engine
from .errors import CheckpointUnreachableError, ModelLoadError
from .images import ImageLimits
from .loading import LoadedModel, load_model, pick_device, resolve_precisions
from .memory import check_memory, memory_budget
from .packing import BACKGROUND_MIN_BYTES, LayerPacker, slots_to_pack
from .registry import ModelEntry, Registry
from .weight_cache import WeightCache

log = logging.getLogger(__name__)


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

    def serving_allocator() -> None:
        trim_heap()
        if not settings.low_memory:
            tune_allocator(serving=True)

    try:
        return _load_models(settings, registry, serving_allocator)
    except BaseException:
        serving_allocator()
        raise


def _load_models(settings: Settings, registry: Registry | None, when_packed: Callable[[], None]) -> Engine:
    """The engine; `when_packed` is called once its int8 layers are packed (at once if none are
    left to pack when it returns)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    registry = registry or Registry.load([settings.models_file] if settings.models_file else [])
    device = pick_device(settings.device)
    if device.type == "cpu":  # before any layer is packed: a packed layer keeps its library
        log.info("int8 kernels: %s", quantization.use_int8_kernels(settings.int8_kernels))
    entry = resolve_model(registry, settings.model, "--model")
    budget = memory_budget(settings, device)
    weights = WeightCache.from_setting(settings.weight_cache)

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
            loaded = load_model(text_entry, precisions, device, cache=weights, pack=False)
            loaded.notes.extend(notes)
            return loaded

        text = BACKENDS[settings.backend](entry, settings, load_weights)
    elif settings.backend != "local":
        raise ModelLoadError(
            f"{entry.name} is a retrieval model; --backend {settings.backend} needs a captioning model (--model)."
        )
    captioner = text.loaded if text is not None else None  # weights a retrieval model may share

    retrieval_name = retrieval_model_for(entry, settings.retrieval_model)
    if retrieval_name is not None:
        matcher_entry = (
            entry
            if retrieval_name == entry.name
            else resolve_model(registry, retrieval_name, "--retrieval-model")
        )
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
        matcher = load_model(
            matcher_entry, precisions, device, share_vision_with=captioner, cache=weights, pack=False
        )
        matcher.notes.extend(notes)
    packer = pack_int8_layers([m for m in (captioner, matcher) if m is not None], settings.packing)

    cache = FeatureCache(max_entries=settings.cache_entries, max_bytes=settings.cache_mb * 1024 * 1024)
    allow_pillow_pixels(settings.max_image_pixels)
    limits = ImageLimits(max_pixels=settings.max_image_pixels, max_bytes=settings.max_upload_mb * 1024 * 1024)
    engine = Engine(text, matcher, cache, limits)
    if packer is None:
        when_packed()
    else:
        # What was computed while packing is keyed apart (LoadedModel.weights_final): free it.
        packer.when_done(engine.cache.clear)
        packer.when_done(when_packed)
    return engine


def pack_int8_layers(models: list[LoadedModel], when: str) -> LayerPacker | None:
    """Pack the models' dynamic-int8 layers (read as weight-only ones) with one packer: before
    returning, or with `when="background"` while the app serves, when the model is large enough
    for that to pay (packing.BACKGROUND_MIN_BYTES) and torch's weight-only kernel, which serves
    meanwhile, works here."""
    slots = {id(m): slots_to_pack(m.model, m.precisions) for m in models}
    packer = LayerPacker([slot for group in slots.values() for slot in group])
    if not packer.total:
        return None
    for model in models:
        model.packer = packer if slots[id(model)] else None
    if when == "background" and packer.bytes >= BACKGROUND_MIN_BYTES:
        try:
            quantization.check_weight_only_ops()
        except quantization.QuantizedOpsUnavailableError as error:
            log.warning("Packing before serving: %s", error)
        else:
            log.info("Packing %d int8 layers in the background; serving meanwhile", packer.total)
            packer.start()
            return packer
    packer.pack_now()
    return packer


def retrieval_model_for(entry: ModelEntry, requested: str = "auto") -> str | None:
    """The retrieval model that goes with `entry` (None: none). A retrieval-only model is its own;
    a captioning model gets `requested`: "auto" is its registry partner, "none" is none."""
    if not entry.family.generates_text:
        return entry.name
    if requested == "auto":
        return entry.retrieval
    return None if requested == "none" else requested


def allow_pillow_pixels(max_pixels: int) -> None:
    """images.py lowers Pillow's process-wide bomb guard to the default limit; a larger
    --max-image-pixels must raise it too, or Pillow would still refuse those images. (Smaller
    limits need nothing: the decoder checks the header against its own limit first.)"""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


# --------------------------------------------------------------------------- model names
def resolve_model(registry: Registry, name: str, flag: str) -> ModelEntry:
    """`registry.resolve`, with a sentence of its own for a folder that does not exist."""
    if name not in registry.models and looks_like_path(name):
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
